"""The null library: independently trained models (same architecture, same data, other seeds) at several widths.

They are the hardest negatives a model hub holds: two labs training the same network on the same data. The
codec's false-match rate is measured on them (bench/null_bench.py) and its fitted null ships with the codec
(hashdb/codec/null.json). Every model here is trained from its own seed (init and data order), on the same
task per architecture, and cached as safetensors under bench/cache/null/ (not committed):

    python3 -m bench.null train                  # every group, 30 seeds (resumes; --jobs 2 on two cores)
    python3 -m bench.null train --groups resnet18 --seeds 8

Architectures (``GROUPS``): plain (conv-ReLU stack), vgg (deeper conv-ReLU with pools), resnet (basic blocks
with BatchNorm and 1x1 shortcuts), mobilenet (depthwise 3x3 + pointwise 1x1 with BatchNorm), conv1d (1-D
kernels over the digit rows), each at base widths 8, 32 and 64 (widest layers 16..128 channels) on
scikit-learn's digits; and resnet18 (11.2M parameters, ResNet-18's layout) on a synthetic 32x32 RGB task.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bench.zoo.nets import Block, MobileNet, ResNet, SeqNet, ZooNet
from bench.zoo.training import train

RECIPE = "n1"  # bump when an architecture, a task or the training recipe changes: part of every cache name
CACHE = Path(__file__).resolve().parent / "cache" / "null"
WIDTHS = (8, 32, 64)


class ResNet18(ZooNet):
    """ResNet-18's layout for 32x32 inputs (3x3 stem, four stages of two basic blocks, 64..512 channels)."""

    def __init__(self, arch: str = "resnet18", width: int = 64) -> None:
        super().__init__()
        self.arch = arch
        self.stem = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.stem_bn = nn.BatchNorm2d(width)
        layers: list[nn.Module] = []
        cin = width
        for i, w in enumerate((width, 2 * width, 4 * width, 8 * width)):
            for b in range(2):
                layers.append(Block(cin, w, 2 if (i > 0 and b == 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(cin, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem_bn(self.stem(x)))
        return self.head(self.layers(h).mean(dim=(2, 3)))

    channel_groups = ResNet.channel_groups
    bn_pairs = ResNet.bn_pairs


def _plain(w: int) -> ZooNet:
    return SeqNet("plain", [w, w, "M", 2 * w], bn=False, size=8)


def _vgg(w: int) -> ZooNet:
    return SeqNet("vgg", [w, w, "M", 2 * w, 2 * w, "M", 2 * w], bn=False, size=8)


def _resnet(w: int) -> ZooNet:
    return ResNet("resnet", (w, 2 * w), 1, size=8)


def _mobilenet(w: int) -> ZooNet:
    return MobileNet("mobilenet", ((w, 1), (2 * w, 1), (2 * w, 2), (2 * w, 1)), size=8)


def _conv1d(w: int) -> ZooNet:
    return SeqNet("conv1d", [w, 2 * w, 2 * w], bn=False, size=8, width_in=8, dim=1)


@dataclass(frozen=True)
class Group:
    """One architecture at one width: ``make()`` a fresh net, trained on ``task`` for ``steps`` Adam steps."""

    arch: str
    width: int
    make: Callable[[], ZooNet]
    task: str
    steps: int
    lr: float
    batch: int = 32

    @property
    def name(self) -> str:
        return self.arch if self.arch == "resnet18" else f"{self.arch}-w{self.width}"


_BUILDERS = {"plain": _plain, "vgg": _vgg, "resnet": _resnet, "mobilenet": _mobilenet, "conv1d": _conv1d}


def _group(arch: str, w: int) -> Group:
    return Group(arch, w, lambda: _BUILDERS[arch](w), "digits", 300, 3e-3)


GROUPS: dict[str, Group] = {g.name: g for g in [_group(a, w) for a in _BUILDERS for w in WIDTHS]}
GROUPS["resnet18"] = Group("resnet18", 64, ResNet18, "synth32", 40, 1e-3)


def synth32(n: int = 2560, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A synthetic 32x32 RGB task: ten smooth random colour prototypes, each sample shifted by up to 4 pixels
    and flipped at random, plus noise. Smooth so that convolutions find structure; fixed for every seed."""
    rng = np.random.default_rng(2000 + seed)
    proto = rng.standard_normal((10, 3, 40, 40)).astype(np.float32)
    k = np.array([1, 4, 6, 4, 1], dtype=np.float32) / 16
    for axis in (2, 3):
        for _ in range(2):
            proto = np.apply_along_axis(lambda r: np.convolve(r, k, mode="same"), axis, proto)
    proto /= proto.std()
    y = rng.integers(0, 10, n)
    dx, dy = rng.integers(0, 9, n), rng.integers(0, 9, n)
    x = np.stack([proto[c, :, a : a + 32, b : b + 32] for c, a, b in zip(y, dx, dy, strict=True)])
    flip = rng.random(n) < 0.5
    x[flip] = x[flip, :, :, ::-1]
    x = x + 0.3 * rng.standard_normal(x.shape).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), torch.from_numpy(y.astype(np.int64))


def task_data(task: str) -> tuple[torch.Tensor, torch.Tensor]:
    if task == "synth32":
        return synth32()
    from bench.zoo.data import dataset

    return dataset(task)


def cache_path(group: str, seed: int) -> Path:
    digest = hashlib.sha1(f"{RECIPE}|{group}|{seed}".encode()).hexdigest()[:12]
    return CACHE / f"{RECIPE}-{group}-s{seed}-{digest}.safetensors"


def make(group: str, seed: int) -> ZooNet:
    """A fresh (untrained) model of ``group`` from ``seed``."""
    g = GROUPS[group]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return g.make()


def trained(group: str, seed: int) -> ZooNet:
    """The model of ``group`` trained from ``seed`` (own init, own data order): from the cache, else trained."""
    from safetensors.torch import load_file, save_file

    g = GROUPS[group]
    path = cache_path(group, seed)
    m = make(group, seed)
    if path.exists():
        m.load_state_dict(load_file(str(path)))
        m.zoo_data = g.task  # type: ignore[assignment]
        return m.eval()
    x, y = task_data(g.task)
    t0 = time.perf_counter()
    train(m, x, y, g.steps, g.lr, seed=seed * 7919 + 13, batch=g.batch)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    meta = {"group": group, "seed": str(seed), "train_s": f"{time.perf_counter() - t0:.1f}"}
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp), metadata=meta)
    tmp.rename(path)
    m.zoo_data = g.task  # type: ignore[assignment]
    return m.eval()


def _train_many(jobs: list[tuple[str, int]]) -> None:
    torch.set_num_threads(1)
    for group, seed in jobs:
        if not cache_path(group, seed).exists():
            t0 = time.perf_counter()
            trained(group, seed)
            print(f"trained {group} seed {seed} in {time.perf_counter() - t0:.1f} s", flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python3 -m bench.null", description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["train", "list"])
    ap.add_argument("--groups", nargs="*", default=None, help="group names (default: all)")
    ap.add_argument("--seeds", type=int, default=30)
    ap.add_argument("--jobs", type=int, default=1, help="training processes (one thread each)")
    args = ap.parse_args(argv)
    groups = args.groups or list(GROUPS)
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        sys.exit(f"unknown groups {unknown}; known: {list(GROUPS)}")
    todo = [(g, s) for s in range(args.seeds) for g in groups]
    if args.command == "list":
        for g, s in todo:
            print(g, s, "cached" if cache_path(g, s).exists() else "-")
        return
    if args.jobs <= 1:
        _train_many(todo)
        return
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(args.jobs) as pool:
        pool.map(_train_many, [todo[i :: args.jobs] for i in range(args.jobs)])


if __name__ == "__main__":
    main()
