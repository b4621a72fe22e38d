"""A library of small trained CNNs and their modified copies, for measuring and tuning the codec.

No downloads: originals are trained on scikit-learn's bundled ``load_digits`` (8x8, 10 classes) and on a
seeded synthetic 10-class image task. Every model takes an ``(N, 1, 8, 8)`` batch; architectures that want a
bigger picture upsample inside ``forward`` (no parameters), the 1-D net reads the image as a length-64 signal.

Public API::

    from bench.zoo import ARCHS, make_model, train_original, MODIFICATIONS, build_library, small_library
    lib = build_library()                  # >= 3,565 entries, trained parts cached under bench/cache/zoo/
    for e in lib.entries:                  # Entry: key, arch, original (None for originals), mclass, strength, light
        sd = lib.state_dict(e)             # materialized on demand (cheap modifications are not stored)

Every modification is ``fn(model, strength, seed, **options) -> nn.Module``: a new model, the input untouched.
Function-preserving ones (channel permutation, positive rescaling, BatchNorm folding) are exact up to float
rounding; tests/test_zoo.py checks the outputs.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

RECIPE = "r1"  # bump when training data, architectures or recipes change: it is part of every cache key
DEFAULT_CACHE = Path(__file__).with_name("cache") / "zoo"


# ----------------------------------------------------------------------------------------------- data


def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32)[:, None], d.target.astype(np.int64)


def _synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Ten smooth random 8x8 prototypes, each sample shifted by up to 1 pixel plus noise: a different task."""
    rng = np.random.default_rng(1000 + seed)
    proto = rng.random((10, 10, 10)).astype(np.float32)
    k = np.array([0.25, 0.5, 0.25], dtype=np.float32)  # smooth so that convolutions find structure
    proto = np.apply_along_axis(lambda r: np.convolve(r, k, mode="same"), 1, proto)
    proto = np.apply_along_axis(lambda r: np.convolve(r, k, mode="same"), 2, proto)
    proto = (proto - proto.min()) / (proto.max() - proto.min())
    y = rng.integers(0, 10, n)
    dx, dy = rng.integers(0, 3, n), rng.integers(0, 3, n)
    x = np.stack([proto[c, a : a + 8, b : b + 8] for c, a, b in zip(y, dx, dy, strict=True)])
    x = x + 0.15 * rng.standard_normal(x.shape).astype(np.float32)
    return x.astype(np.float32)[:, None], y.astype(np.int64)


def _shift_augment(x: np.ndarray, seed: int) -> np.ndarray:
    """Random +-1 pixel shifts (zero fill), one per image."""
    rng = np.random.default_rng(seed)
    out = np.zeros_like(x)
    for i in range(len(x)):
        dy, dx = rng.integers(-1, 2, 2)
        src = x[i, 0, max(0, -dy) : 8 - max(0, dy), max(0, -dx) : 8 - max(0, dx)]
        out[i, 0, max(0, dy) : max(0, dy) + src.shape[0], max(0, dx) : max(0, dx) + src.shape[1]] = src
    return out


DATASETS = ("digits", "digits_b", "synth", "digits_perm")


def dataset(name: str, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` of one task: 'digits' (75 % split A), 'digits_b' (another 75 % split, shift-augmented),
    'synth' (synthetic prototypes), 'digits_perm' (digits split A with permuted labels, a transfer task)."""
    if name not in DATASETS or split not in ("train", "test"):
        raise ValueError(f"unknown dataset {name!r}/{split!r}")
    if name == "synth":
        x, y = _synthetic(1800, 0)
        sel = slice(0, 1350) if split == "train" else slice(1350, None)
        return torch.from_numpy(x[sel]), torch.from_numpy(y[sel])
    x, y = _digits_raw()
    order = np.random.default_rng(1 if name == "digits_b" else 0).permutation(len(x))
    cut = int(0.75 * len(x))
    idx = order[:cut] if split == "train" else order[cut:]
    x, y = x[idx], y[idx]
    if name == "digits_b" and split == "train":
        x = np.concatenate([x, _shift_augment(x, 7)])
        y = np.concatenate([y, y])
    if name == "digits_perm":
        y = np.random.default_rng(5).permutation(10)[y]
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))


# ------------------------------------------------------------------------------------ architectures


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that can be permuted (or positively rescaled) together without changing the function.

    ``out``: modules whose output channels (dim 0 of weight and bias) form the group; ``bn``: the BatchNorm
    right after them (absorbs a rescaling through its running statistics); ``through``: per-channel modules
    after the BN (depthwise conv and its BN: permuted along dim 0, untouched by rescaling); ``into``:
    consumers whose input channels (dim 1) are the group.
    """

    out: tuple[str, ...]
    bn: str | None
    into: tuple[str, ...]
    through: tuple[str, ...] = ()


class ZooNet(nn.Module):
    """Base: ``head`` is the final Linear; subclasses list channel groups and (conv, bn) pairs."""

    arch: str = ""
    head: nn.Linear

    def channel_groups(self) -> list[ChannelGroup]:
        raise NotImplementedError

    def bn_pairs(self) -> list[tuple[str, str]]:
        return []


def _cbr(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, bn: bool = True) -> list[nn.Module]:
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=not bn)
    return [conv, nn.BatchNorm2d(cout), nn.ReLU()] if bn else [conv, nn.ReLU()]


class Up(nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)


class SeqNet(ZooNet):
    """A stack of conv(+BN)+ReLU (+pool) layers in ``features``, global average pool, ``head``.

    ``spec`` items: an int (conv 3x3 to that width), 'M' (max pool 2). BN nets use bias-free convs.
    """

    def __init__(self, arch: str, spec: list, bn: bool, size: int, width_in: int = 1, dim: int = 2) -> None:
        super().__init__()
        self.arch = arch
        self.dim = dim
        layers: list[nn.Module] = [Up(size)] if (dim == 2 and size != 8) else []
        cin = width_in
        for item in spec:
            if item == "M":
                layers.append(nn.MaxPool2d(2) if dim == 2 else nn.MaxPool1d(2))
                continue
            k, cout = item if isinstance(item, tuple) else (3, item)
            if dim == 2:
                layers += _cbr(cin, cout, k, bn=bn)
            else:
                layers += [nn.Conv1d(cin, cout, k, padding=k // 2), nn.ReLU()]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dim == 1:  # image rows as 8 input channels, columns as the signal
            x = x.reshape(x.shape[0], x.shape[-2], x.shape[-1])
        h = self.features(x)
        return self.head(h.mean(dim=tuple(range(2, h.ndim))))

    def _convs(self) -> list[tuple[str, str | None]]:
        mods = list(self.features.named_children())
        out = []
        for i, (name, m) in enumerate(mods):
            if isinstance(m, nn.Conv1d | nn.Conv2d):
                nxt = mods[i + 1][1] if i + 1 < len(mods) else None
                bn = f"features.{mods[i + 1][0]}" if isinstance(nxt, nn.BatchNorm2d) else None
                out.append((f"features.{name}", bn))
        return out

    def channel_groups(self) -> list[ChannelGroup]:
        convs = self._convs()
        consumers = [c for c, _ in convs[1:]] + ["head"]
        return [ChannelGroup((c,), bn, (nxt,)) for (c, bn), nxt in zip(convs, consumers, strict=True)]

    def bn_pairs(self) -> list[tuple[str, str]]:
        return [(c, bn) for c, bn in self._convs() if bn is not None]


class Block(nn.Module):
    """ResNet basic block: conv-BN-ReLU-conv-BN plus identity or 1x1 conv-BN shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if (stride != 1 or cin != cout)
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return F.relu(h + (self.down(x) if self.down is not None else x))


class ResNet(ZooNet):
    def __init__(self, arch: str, widths: tuple[int, ...], blocks: int, size: int) -> None:
        super().__init__()
        self.arch = arch
        self.up = Up(size)
        self.stem = nn.Conv2d(1, widths[0], 3, 1, 1, bias=False)
        self.stem_bn = nn.BatchNorm2d(widths[0])
        layers: list[nn.Module] = []
        cin = widths[0]
        for i, w in enumerate(widths):
            for b in range(blocks):
                layers.append(Block(cin, w, 2 if (i > 0 and b == 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(cin, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.stem_bn(self.stem(self.up(x))))
        h = self.layers(h)
        return self.head(h.mean(dim=(2, 3)))

    def channel_groups(self) -> list[ChannelGroup]:
        # Inside each block the conv1 -> bn1 -> conv2 channels are private; the residual stream is left alone.
        return [
            ChannelGroup((f"layers.{i}.conv1",), f"layers.{i}.bn1", (f"layers.{i}.conv2",))
            for i in range(len(self.layers))
        ]

    def bn_pairs(self) -> list[tuple[str, str]]:
        pairs = [("stem", "stem_bn")]
        for i, blk in enumerate(self.layers):
            pairs += [(f"layers.{i}.conv1", f"layers.{i}.bn1"), (f"layers.{i}.conv2", f"layers.{i}.bn2")]
            if blk.down is not None:
                pairs.append((f"layers.{i}.down.0", f"layers.{i}.down.1"))
        return pairs


class MobileNet(ZooNet):
    """Stem conv-BN-ReLU, then depthwise 3x3-BN-ReLU + pointwise 1x1-BN-ReLU blocks (``features``)."""

    def __init__(self, arch: str, widths: tuple[tuple[int, int], ...], size: int) -> None:
        super().__init__()
        self.arch = arch
        c0 = widths[0][0]
        layers: list[nn.Module] = [Up(size), *_cbr(1, c0)]
        cin = c0
        for cout, stride in widths[1:]:
            layers += _cbr(cin, cin, 3, stride, groups=cin) + _cbr(cin, cout, 1)
            cin = cout
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))

    def _convs(self) -> list[tuple[str, str, bool]]:
        mods = list(self.features.named_children())
        return [
            (f"features.{n}", f"features.{mods[i + 1][0]}", m.groups > 1)
            for i, (n, m) in enumerate(mods)
            if isinstance(m, nn.Conv2d)
        ]

    def channel_groups(self) -> list[ChannelGroup]:
        convs = self._convs()
        groups = []
        for j, (c, bn, dw) in enumerate(convs):
            if dw:
                continue
            rest = convs[j + 1 :]
            if not rest:
                groups.append(ChannelGroup((c,), bn, ("head",)))
            else:  # next is depthwise (permuted along), then the pointwise consumer
                (d, dbn, _), (p, _, _) = rest[0], rest[1]
                groups.append(ChannelGroup((c,), bn, (p,), through=(d, dbn)))
        return groups

    def bn_pairs(self) -> list[tuple[str, str]]:
        return [(c, bn) for c, bn, _ in self._convs()]


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# name -> (constructor, has BatchNorm, training steps for an original, learning rate)
ARCHS: dict[str, tuple[Callable[[], ZooNet], bool, int, float]] = {
    "plain": (lambda: SeqNet("plain", [16, 32, "M", 64], bn=False, size=16), False, 500, 3e-3),
    "vgg": (lambda: SeqNet("vgg", [32, 32, "M", 64, 64, "M", 128], bn=False, size=16), False, 500, 2e-3),
    "resnet": (lambda: ResNet("resnet", (16, 32, 64), 1, size=16), True, 400, 3e-3),
    "mobilenet": (
        lambda: MobileNet("mobilenet", ((32, 1), (64, 1), (128, 2), (128, 1), (256, 2)), size=16),
        True,
        400,
        3e-3,
    ),
    "conv1d": (lambda: SeqNet("conv1d", [32, 64, 64], bn=False, size=8, width_in=8, dim=1), False, 500, 3e-3),
    # ~10.9M parameters; native 8x8 input keeps it trainable on one core (BN, VGG-style).
    "widevgg": (
        lambda: SeqNet("widevgg", [64, 128, "M", 256, 512, "M", 512, 512, 512, 512], bn=True, size=8),
        True,
        150,
        1e-3,
    ),  # fmt: skip
}


def make_model(arch: str, seed: int) -> ZooNet:
    """A freshly initialized model of ``arch`` (torch's default init under ``seed``)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; known: {sorted(ARCHS)}")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return ARCHS[arch][0]()


# ----------------------------------------------------------------------------------------- training


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    lr: float,
    seed: int,
    opt: str = "adam",
    batch: int = 32,
    soft: torch.Tensor | None = None,
    temperature: float = 4.0,
) -> nn.Module:
    """Train in place for ``steps`` minibatch steps (cross-entropy, or KL to ``soft`` logits for distillation)."""
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.Adam(params, lr=lr) if opt == "adam" else torch.optim.SGD(params, lr=lr, momentum=0.9)
    model.train()
    order = torch.randperm(len(x), generator=gen)
    pos = 0
    for _ in range(steps):
        if pos + batch > len(x):
            order, pos = torch.randperm(len(x), generator=gen), 0
        idx = order[pos : pos + batch]
        pos += batch
        optim.zero_grad()
        out = model(x[idx])
        if soft is None:
            loss = F.cross_entropy(out, y[idx])
        else:
            t = temperature
            loss = F.kl_div(F.log_softmax(out / t, 1), F.softmax(soft[idx] / t, 1), reduction="batchmean") * t * t
        loss.backward()
        optim.step()
    model.eval()
    return model


def accuracy(model: nn.Module, data: str) -> float:
    x, y = dataset(data, "test")
    with torch.no_grad():
        return float((model.eval()(x).argmax(1) == y).float().mean())


def train_original(arch: str, seed: int, data: str = "digits") -> ZooNet:
    """An independently trained original: own init seed, own data order, ``ARCHS[arch]`` recipe."""
    model = make_model(arch, seed)
    x, y = dataset(data)
    _, _, steps, lr = ARCHS[arch]
    train(model, x, y, steps, lr, seed=seed * 7919 + 1)
    model.zoo_data = data  # type: ignore[assignment]
    return model


# ------------------------------------------------------------------------------------ modifications


def _clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).eval()


def _weights(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Linear):
            yield name, m


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) & 0x7FFFFFFF)


def finetune(
    model: nn.Module, strength: float, seed: int, *, steps: int = 120, opt: str = "sgd", data: str | None = None
) -> nn.Module:
    """Continue training on the same task: ``strength`` is the learning rate (1e-4..1e-2), SGD or Adam."""
    m = _clone(model)
    x, y = dataset(data or getattr(model, "zoo_data", "digits"))
    return train(m, x, y, steps, float(strength), seed=seed, opt=opt)


def transfer(model: nn.Module, strength: float, seed: int, *, steps: int = 150, task: str | None = None) -> nn.Module:
    """Re-initialize the final layer and train the whole net on another task (Adam, lr ``strength``)."""
    m = _clone(model)
    own = getattr(model, "zoo_data", "digits")
    task = task or ("digits_perm" if own != "digits_perm" else "synth")
    if own == "synth" and task == "synth":
        task = "digits"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        m.head.reset_parameters()
    x, y = dataset(task)
    train(m, x, y, steps, float(strength), seed=seed, opt="adam")
    m.zoo_data = task
    return m


def distill(
    model: nn.Module, strength: float, seed: int, *, student: str | None = None, steps: int | None = None
) -> nn.Module:
    """Knowledge distillation: a freshly initialized ``student`` trained on the model's soft labels
    (temperature ``strength``) over its training inputs. A HARD case: no weights are shared."""
    arch = student or getattr(model, "arch", "plain")
    data = getattr(model, "zoo_data", "digits")
    x, y = dataset(data)
    with torch.no_grad():
        soft = model.eval()(x)
    s = make_model(arch, 50_000 + seed)
    lr = ARCHS[arch][3]
    train(s, x, y, steps or ARCHS[arch][2], lr, seed=seed, soft=soft, temperature=float(strength))
    s.zoo_data = data
    return s


def prune_magnitude(model: nn.Module, strength: float, seed: int = 0) -> nn.Module:
    """Unstructured magnitude pruning: zero the ``strength`` fraction of smallest |w| in every conv/linear weight."""
    m = _clone(model)
    with torch.no_grad():
        for _, mod in _weights(m):
            w = mod.weight
            k = int(float(strength) * w.numel())
            if k > 0:  # exactly k zeros: everything below the k-th smallest |w|, then ties in index order
                a = w.abs().flatten()
                thr = torch.kthvalue(a, k).values
                below = a < thr
                ties = torch.nonzero(a == thr).flatten()[: k - int(below.sum())]
                below[ties] = True
                w.view(-1)[below] = 0.0
    return m


def prune_filters(model: nn.Module, strength: float, seed: int = 0) -> nn.Module:
    """Structured pruning: zero the ``strength`` fraction of lowest-L2 output filters of every conv (and the
    bias / following BatchNorm affine of those channels). Shapes are kept (zeroing, not removal)."""
    m = _clone(model)
    bn_of = dict(m.bn_pairs()) if isinstance(m, ZooNet) else {}
    with torch.no_grad():
        for name, mod in _weights(m):
            if isinstance(mod, nn.Linear):
                continue
            w = mod.weight
            k = int(float(strength) * w.shape[0])
            if k == 0:
                continue
            drop = torch.argsort(w.flatten(1).norm(dim=1), stable=True)[:k]
            w[drop] = 0.0
            if mod.bias is not None:
                mod.bias[drop] = 0.0
            if name in bn_of:
                bn = m.get_submodule(bn_of[name])
                bn.weight[drop] = 0.0
                bn.bias[drop] = 0.0
    return m


def quantize(model: nn.Module, strength: float = 8, seed: int = 0, *, per_channel: bool = False) -> nn.Module:
    """Symmetric int-``strength`` quantization round trip of every conv/linear weight (per tensor or per
    output channel); biases and BatchNorm stay float, as in common int8 deployments."""
    m = _clone(model)
    qmax = 2 ** (int(strength) - 1) - 1
    with torch.no_grad():
        for _, mod in _weights(m):
            w = mod.weight
            amax = w.abs().flatten(1).amax(dim=1) if per_channel else w.abs().max().expand(w.shape[0])
            scale = (amax / qmax).clamp_min(1e-12).reshape(-1, *([1] * (w.ndim - 1)))
            w.copy_(torch.clamp(torch.round(w / scale), -qmax, qmax) * scale)
    return m


def cast(model: nn.Module, strength: str = "fp16", seed: int = 0) -> nn.Module:
    """Cast every parameter and buffer to fp16 or bf16 (the copy stays in that dtype, as published)."""
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[str(strength)]
    return _clone(model).to(dtype)


def gaussian_noise(model: nn.Module, strength: float, seed: int) -> nn.Module:
    """Add N(0, (strength * std(w))^2) to every conv/linear weight and bias."""
    m = _clone(model)
    g = _gen(seed)
    with torch.no_grad():
        for _, mod in _weights(m):
            for p in (mod.weight, mod.bias):
                if p is not None and p.numel() > 1:
                    p.add_(float(strength) * p.std() * torch.randn(p.shape, generator=g))
    return m


def _group_tensors(m: nn.Module, names: tuple[str, ...]) -> list[torch.Tensor]:
    out = []
    for n in names:
        mod = m.get_submodule(n)
        out += [t for t in (*mod.parameters(recurse=False), *mod.buffers(recurse=False)) if t.ndim >= 1]
    return out


def permute_channels(model: nn.Module, strength: float = 1.0, seed: int = 0) -> nn.Module:
    """Permute the channels of a ``strength`` fraction of the channel groups (at least one): producer
    output channels, BatchNorm, depthwise pass-throughs and consumer input channels alike. Same function."""
    m = _clone(model)
    groups = m.channel_groups()
    g = _gen(seed)
    pick = torch.randperm(len(groups), generator=g)[: max(1, round(float(strength) * len(groups)))]
    with torch.no_grad():
        for gi in sorted(pick.tolist()):
            grp = groups[gi]
            width = m.get_submodule(grp.out[0]).weight.shape[0]
            perm = torch.randperm(width, generator=g)
            for t in _group_tensors(m, grp.out + ((grp.bn,) if grp.bn else ()) + grp.through):
                t.copy_(t[perm])
            for n in grp.into:
                w = m.get_submodule(n).weight
                w.copy_(w[:, perm])
    return m


def rescale(model: nn.Module, strength: float, seed: int, *, per_channel: bool = True) -> nn.Module:
    """Positive rescaling that leaves a ReLU net's function unchanged: channel j of every group is multiplied
    by c_j = exp(U(-strength, strength)) (one c per group if not ``per_channel``). Without BN the consumer's
    input channel j is divided by c_j; with BN the BN running statistics absorb it (mean*c, var*c^2)."""
    m = _clone(model)
    g = _gen(seed)
    s = float(strength)
    with torch.no_grad():
        for grp in m.channel_groups():
            width = m.get_submodule(grp.out[0]).weight.shape[0]
            u = torch.rand(width if per_channel else 1, generator=g) * 2 - 1
            c = torch.exp(s * u).expand(width)
            for n in grp.out:
                mod = m.get_submodule(n)
                mod.weight.mul_(c.reshape(-1, *([1] * (mod.weight.ndim - 1))))
                if mod.bias is not None:
                    mod.bias.mul_(c)
            if grp.bn is not None:
                bn = m.get_submodule(grp.bn)
                bn.running_mean.mul_(c)
                bn.running_var.mul_(c * c)
                # (var*c^2 + eps) vs c^2 (var + eps): scale eps away so the function is exact
                bn.running_var.add_(bn.eps * (c * c - 1))
            else:
                assert not grp.through, "depthwise pass-through without BN cannot absorb a rescaling"
                for n in grp.into:
                    w = m.get_submodule(n).weight
                    w.div_(c.reshape(1, -1, *([1] * (w.ndim - 2))))
    return m


def fold_batchnorm(model: nn.Module, strength: float = 1.0, seed: int = 0) -> nn.Module:
    """Fold every BatchNorm into the conv before it (new weight and bias); the BN becomes Identity, so its
    keys vanish from the state_dict, as in an exported inference graph."""
    m = _clone(model)
    with torch.no_grad():
        for conv_name, bn_name in m.bn_pairs():
            conv, bn = m.get_submodule(conv_name), m.get_submodule(bn_name)
            inv = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            new = nn.Conv2d(
                conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                conv.dilation, conv.groups, bias=True,
            )  # fmt: skip
            new.weight.copy_(conv.weight * inv.reshape(-1, 1, 1, 1))
            b = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            new.bias.copy_(bn.bias + (b - bn.running_mean) * inv)
            for name, mod in ((conv_name, new), (bn_name, nn.Identity())):
                parent, _, child = name.rpartition(".")
                setattr(m.get_submodule(parent) if parent else m, child, mod)
    m.bn_pairs = lambda: []  # type: ignore[method-assign]
    return m


# Every modification by name; TRAINED ones are cached on disk, the others recomputed when materialized.
MODIFICATIONS: dict[str, Callable[..., nn.Module]] = {
    "finetune": finetune,
    "transfer": transfer,
    "prune_magnitude": prune_magnitude,
    "prune_filters": prune_filters,
    "quantize": quantize,
    "cast": cast,
    "noise": gaussian_noise,
    "permute": permute_channels,
    "rescale": rescale,
    "fold_bn": fold_batchnorm,
    "distill": distill,
}
TRAINED = frozenset({"finetune", "transfer", "distill"})


# ---------------------------------------------------------------------------------------- the library

Step = tuple[str, Any, int, tuple[tuple[str, Any], ...]]  # (modification, strength, seed, sorted options)


def step(name: str, strength: Any, seed: int = 0, **options: Any) -> Step:
    return (name, strength, seed, tuple(sorted(options.items())))


@dataclass(frozen=True)
class Entry:
    """One library model. ``original`` is the key of the original it derives from (None for originals);
    ``mclass`` its modification class, ``strength`` a readable label, ``light`` whether the codec targets
    (copy within copy_radius) apply; ``steps`` rebuild it from the original."""

    key: str
    arch: str
    data: str
    seed: int
    original: str | None
    mclass: str
    strength: str
    light: bool
    steps: tuple[Step, ...] = ()


@dataclass
class Library:
    entries: list[Entry]
    cache_dir: Path
    max_memo: int = 64
    _memo: OrderedDict = field(default_factory=OrderedDict)
    _by_key: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._by_key = {e.key: e for e in self.entries}

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, key: str) -> Entry:
        return self._by_key[key]

    @property
    def originals(self) -> list[Entry]:
        return [e for e in self.entries if e.original is None]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.entries:
            out[e.mclass] = out.get(e.mclass, 0) + 1
        return out

    def model(self, entry: Entry | str) -> nn.Module:
        """The entry's model (trained steps come from the cache, cheap ones are recomputed)."""
        e = self._by_key[entry] if isinstance(entry, str) else entry
        if e.original is None:
            return self._original(e)
        m = self._original(self._by_key[e.original])
        for i, st in enumerate(e.steps):
            m = _apply(m, st, self.cache_dir, e.original, e.steps[: i + 1])
        return m

    def subset(self, keep: Callable[[Entry], bool]) -> Library:
        """A library of the entries ``keep`` accepts plus the originals they derive from (same cache)."""
        chosen = [e for e in self.entries if keep(e)]
        needed = {e.original for e in chosen if e.original is not None}
        have = {e.key for e in chosen}
        extra = [e for e in self.entries if e.key in needed and e.key not in have]
        return Library(extra + chosen, self.cache_dir, self.max_memo)

    def state_dict(self, entry: Entry | str) -> dict[str, torch.Tensor]:
        return self.model(entry).state_dict()

    def _original(self, e: Entry) -> nn.Module:
        if e.key in self._memo:
            self._memo.move_to_end(e.key)
            return self._memo[e.key]
        m = _cached(self.cache_dir, f"{e.key}", lambda: train_original(e.arch, e.seed, e.data), e.arch, e.data)
        self._memo[e.key] = m
        while len(self._memo) > self.max_memo:
            self._memo.popitem(last=False)
        return m


def _cache_name(key: str) -> str:
    digest = hashlib.sha1(f"{RECIPE}|{key}".encode()).hexdigest()[:16]
    return f"{RECIPE}-{digest}.safetensors"


def _cached(cache_dir: Path, key: str, make: Callable[[], nn.Module], arch: str, data: str) -> nn.Module:
    """Load ``key`` from the cache, or ``make()`` and store it (safetensors, with metadata)."""
    from safetensors.torch import load_file, save_file

    path = Path(cache_dir) / _cache_name(key)
    if path.exists():
        m = make_model(arch, 0)
        m.load_state_dict(load_file(str(path)))
        m.zoo_data = data
        return m.eval()
    t0 = time.perf_counter()
    m = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    meta = {"key": key, "arch": arch, "data": data, "train_s": f"{time.perf_counter() - t0:.2f}"}
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp), metadata=meta)
    tmp.rename(path)
    return m.eval()


def _apply(m: nn.Module, st: Step, cache_dir: Path, original: str, prefix: tuple[Step, ...]) -> nn.Module:
    name, strength, seed, options = st
    fn = MODIFICATIONS[name]
    if name not in TRAINED:
        return fn(m, strength, seed, **dict(options))
    key = f"{original}|" + json.dumps(prefix, default=str)
    arch = dict(options).get("student", getattr(m, "arch", "")) if name == "distill" else m.arch
    data = getattr(m, "zoo_data", "digits")
    if name == "transfer":
        data = dict(options).get("task") or ("digits_perm" if data != "digits_perm" else "synth")
    return _cached(cache_dir, key, lambda: fn(m, strength, seed, **dict(options)), arch, data)


# Originals: (arch, number of seeds, data per seed index). Mostly digits split A; a few trained on other data.
ORIGINALS: tuple[tuple[str, int], ...] = (
    ("plain", 8), ("vgg", 6), ("resnet", 6), ("mobilenet", 6), ("conv1d", 4), ("widevgg", 3),
)  # fmt: skip


def _data_for(seed: int) -> str:
    return {3: "synth", 5: "digits_b", 7: "digits_b"}.get(seed, "digits")


def _copy_plan(arch: str, big: bool, rng: np.random.Generator) -> list[tuple[str, str, bool, tuple[Step, ...]]]:
    """(mclass, strength label, light, steps) of every copy made of one original."""
    has_bn = ARCHS[arch][1]
    plan: list[tuple[str, str, bool, tuple[Step, ...]]] = []

    def add(mclass: str, label: str, light: bool, *steps: Step) -> None:
        plan.append((mclass, label, light, tuple(steps)))

    def s() -> int:
        return int(rng.integers(1 << 30))

    ft = [("sgd", 1e-3, 60), ("sgd", 1e-2, 60), ("sgd", 1e-2, 150), ("adam", 1e-4, 60), ("adam", 1e-4, 150),
          ("adam", 1e-3, 60), ("adam", 1e-3, 150), ("sgd", 3e-3, 120)]  # fmt: skip
    if big:  # the 10M net: fewer, shorter fine-tunes (each step costs ~100x a small net's)
        ft = [("sgd", 1e-3, 30), ("sgd", 1e-2, 30), ("adam", 1e-4, 30), ("adam", 1e-3, 30)]
    for opt, lr, n in ft:
        add("finetune", f"{opt} lr={lr:g} steps={n}", True, step("finetune", lr, s(), steps=n, opt=opt))
    for lr, n in [(1e-3, 30)] if big else [(1e-3, 150), (3e-4, 150)]:
        add("transfer", f"adam lr={lr:g} steps={n}", True, step("transfer", lr, s(), steps=n))
    for p in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7):
        add("prune_magnitude", f"{p:.0%}", p <= 0.5, step("prune_magnitude", p))
    for p in (0.1, 0.2, 0.3, 0.4, 0.5):
        add("prune_filters", f"{p:.0%}", True, step("prune_filters", p))
    add("quantize", "int8 per-tensor", True, step("quantize", 8, per_channel=False))
    add("quantize", "int8 per-channel", True, step("quantize", 8, per_channel=True))
    add("quantize", "int4 per-channel", False, step("quantize", 4, per_channel=True))
    add("cast", "fp16", True, step("cast", "fp16"))
    add("cast", "bf16", True, step("cast", "bf16"))
    for sig in (0.01, 0.02, 0.05, 0.1):
        for _ in range(4):
            add("noise", f"{sig:g}", True, step("noise", sig, s()))
    if has_bn:
        add("fold_bn", "all", True, step("fold_bn", 1.0))
    for frac in (0.5, 1.0):
        for _ in range(4):
            add("permute", f"{frac:.0%} of groups", True, step("permute", frac, s()))
    for sc in (0.5, 1.5):
        for _ in range(3):
            add("rescale", f"per-channel e^U(-{sc:g},{sc:g})", True, step("rescale", sc, s(), per_channel=True))
            add("rescale", f"per-layer e^U(-{sc:g},{sc:g})", True, step("rescale", sc, s(), per_channel=False))
    # combinations
    for p in (0.3, 0.5):
        add("combo", f"prune {p:.0%} + int8", True, step("prune_magnitude", p), step("quantize", 8, per_channel=True))
    ft0 = plan[0][3][0]
    add("combo", "finetune + prune 30%", True, ft0, step("prune_magnitude", 0.3))
    add("combo", "finetune + int8", True, ft0, step("quantize", 8))
    for _ in range(3):
        add("combo", "permute + rescale + noise 0.02", True,
            step("permute", 1.0, s()), step("rescale", 1.0, s()), step("noise", 0.02, s()))  # fmt: skip
    add("combo", "filter prune 30% + fp16", True, step("prune_filters", 0.3), step("cast", "fp16"))
    if has_bn:
        add("combo", "permute + fold BN + int8", True, step("permute", 1.0, s()), step("fold_bn", 1.0),
            step("quantize", 8, per_channel=True))  # fmt: skip
    # distillation (hard): same architecture and a different small one
    other = {"plain": "vgg", "vgg": "plain", "resnet": "mobilenet", "mobilenet": "resnet", "conv1d": "plain",
             "widevgg": "vgg"}[arch]  # fmt: skip
    student_same = "vgg" if big else arch
    add("distill", f"T=4 student={student_same}", False, step("distill", 4.0, s(), student=student_same))
    add("distill", f"T=4 student={other}", False, step("distill", 4.0, s(), student=other))
    return plan


# Filler modifications (seeded, cheap) used to reach n_min: each call yields one more copy.
def _filler(rng: np.random.Generator) -> tuple[str, str, bool, tuple[Step, ...]]:
    kind = int(rng.integers(4))
    s = int(rng.integers(1 << 30))
    if kind == 0:
        sig = float(rng.choice([0.01, 0.02, 0.05, 0.1]))
        return ("noise", f"{sig:g}", True, (step("noise", sig, s),))
    if kind == 1:
        return ("permute", "100% of groups", True, (step("permute", 1.0, s),))
    if kind == 2:
        return ("rescale", "per-channel e^U(-1,1)", True, (step("rescale", 1.0, s, per_channel=True),))
    p = float(rng.choice([0.2, 0.3, 0.4]))
    return ("combo", f"permute + prune {p:.0%} + noise 0.01", True,
            (step("permute", 1.0, s), step("prune_magnitude", p), step("noise", 0.01, s + 1)))  # fmt: skip


def library_plan(
    n_min: int = 3565, seed: int = 0, originals: tuple[tuple[str, int], ...] = ORIGINALS, copies: bool = True
) -> list[Entry]:
    """The entries (labels and recipes) without training anything."""
    rng = np.random.default_rng(seed)
    entries: list[Entry] = []
    origs: list[Entry] = []
    for arch, n in originals:
        for sd in range(n):
            data = _data_for(sd)
            e = Entry(f"{arch}-s{sd}-{data}", arch, data, sd, None, "original", "", True)
            origs.append(e)
    entries += origs
    if not copies:
        return entries
    for o in origs:
        for i, (mclass, label, light, steps) in enumerate(_copy_plan(o.arch, o.arch == "widevgg", rng)):
            entries.append(Entry(f"{o.key}/{mclass}-{i}", o.arch, o.data, o.seed, o.key, mclass, label, light, steps))
    i = 0
    while len(entries) < n_min:
        o = origs[i % len(origs)]
        mclass, label, light, steps = _filler(rng)
        entries.append(Entry(f"{o.key}/x{i}-{mclass}", o.arch, o.data, o.seed, o.key, mclass, label, light, steps))
        i += 1
    return entries


def build_library(
    n_min: int = 3565,
    seed: int = 0,
    cache_dir: str | Path = DEFAULT_CACHE,
    originals: tuple[tuple[str, int], ...] = ORIGINALS,
    threads: int = 1,
    verbose: bool = False,
) -> Library:
    """Plan >= ``n_min`` entries and train (or load from cache) every trained part: originals, fine-tunes,
    transfers and distillations. Cheap copies are materialized on demand by ``Library.model``."""
    torch.set_num_threads(threads)
    lib = Library(library_plan(n_min, seed, originals), Path(cache_dir))
    t0 = time.perf_counter()
    trained = [e for e in lib.entries if e.original is None or any(s[0] in TRAINED for s in e.steps)]
    for j, e in enumerate(trained):
        m = lib.model(e)
        del m
        if verbose and (j % 20 == 0 or j == len(trained) - 1):
            print(f"  [{time.perf_counter() - t0:7.1f} s] trained/loaded {j + 1}/{len(trained)}: {e.key}", flush=True)
    return lib


SMALL_ORIGINALS: tuple[tuple[str, int], ...] = (("plain", 2), ("resnet", 1), ("mobilenet", 1))


def small_library(cache_dir: str | Path | None = None, seed: int = 0) -> Library:
    """A few seconds to build: tiny training recipes, the cheap modification classes only (no training of
    copies), two plain nets plus one ResNet and one MobileNet. For the test suite."""
    import tempfile

    cache = Path(cache_dir) if cache_dir is not None else Path(tempfile.mkdtemp(prefix="zoo-small-"))
    rng = np.random.default_rng(seed)
    entries: list[Entry] = []
    for arch, n in SMALL_ORIGINALS:
        for sd in range(n):
            o = Entry(f"small-{arch}-s{sd}", arch, "digits", sd, None, "original", "", True)
            entries.append(o)
            for mclass, label, light, steps in _copy_plan(arch, False, rng):
                trained_copy = any(s[0] in TRAINED for s in steps)
                if trained_copy or (mclass in ("noise", "rescale", "permute") and rng.random() < 0.5):
                    continue
                entries.append(
                    Entry(f"{o.key}/{mclass}-{len(entries)}", arch, "digits", sd, o.key, mclass, label, light, steps)
                )
    lib = Library(entries, cache)
    lib._original = _small_original.__get__(lib)  # type: ignore[method-assign]
    return lib


def _small_original(self: Library, e: Entry) -> nn.Module:
    if e.key not in self._memo:
        m = make_model(e.arch, e.seed)
        x, y = dataset("digits")
        train(m, x[:512], y[:512], 40, ARCHS[e.arch][3], seed=e.seed)
        m.zoo_data = "digits"
        self._memo[e.key] = m
    return self._memo[e.key]


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-min", type=int, default=3565)
    ap.add_argument("--cache", default=str(DEFAULT_CACHE))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    t = time.perf_counter()
    lib = build_library(args.n_min, cache_dir=args.cache, threads=args.threads, verbose=True)
    print(f"{len(lib)} entries in {time.perf_counter() - t:.1f} s: {lib.counts()}")
    for o in lib.originals:
        print(f"  {o.key:28s} params={_n_params(lib.model(o)):>9,d} acc={accuracy(lib.model(o), o.data):.3f}")
