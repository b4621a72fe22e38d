"""A small self-contained model library for tuning the codec before/alongside bench/zoo/.

Trains a few digits CNNs per architecture and seed, derives modified copies by editing state_dicts, and
caches everything as numpy mappings in one .npz per model under --cache. ``evaluate_codes`` reports, per
modification class, the distance to the original, and the distance distribution of distinct pairs.

    nice -n 10 python3 bench/codec_sweep_mini.py --cache /tmp/codec_mini --seeds 6
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import Any

import numpy as np

ARCHS = ("plain", "bn", "wide", "deep")


def build(arch: str) -> Any:
    from torch import nn

    if arch == "plain":
        return nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
        )  # fmt: skip
    if arch == "bn":
        return nn.Sequential(
            nn.Conv2d(1, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24), nn.ReLU(),
            nn.Conv2d(24, 48, 3, padding=1, bias=False), nn.BatchNorm2d(48), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(48, 48, 3, padding=1, bias=False), nn.BatchNorm2d(48), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(48, 10),
        )  # fmt: skip
    if arch == "wide":
        return nn.Sequential(
            nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(256, 10),
        )  # fmt: skip
    if arch == "deep":
        return nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
        )  # fmt: skip
    raise ValueError(arch)


def digits() -> tuple[Any, Any]:
    import torch
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy((d.images / 16.0).astype(np.float32)[:, None])
    return x, torch.from_numpy(d.target.astype(np.int64))


def train(model: Any, x: Any, y: Any, epochs: int, lr: float, seed: int, sgd: bool = False) -> Any:
    import torch

    gen = torch.Generator().manual_seed(seed)
    opt = (
        torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9) if sgd else torch.optim.Adam(model.parameters(), lr=lr)
    )
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for s in range(0, len(x), 64):
            idx = order[s : s + 64]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    return model


def sd_numpy(model: Any) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy().copy() for k, v in model.state_dict().items() if v.is_floating_point()}


def conv_names(sd: dict[str, np.ndarray]) -> list[str]:
    return [k for k, v in sd.items() if v.ndim == 4]


def bn_after(sd: dict[str, np.ndarray], conv: str) -> str | None:
    """Name prefix of the BatchNorm right after a conv in an nn.Sequential (index + 1)."""
    idx = int(conv.split(".")[0])
    pre = f"{idx + 1}."
    return pre if pre + "running_var" in sd else None


def next_consumer(sd: dict[str, np.ndarray], conv: str) -> str | None:
    convs = conv_names(sd)
    i = convs.index(conv)
    return convs[i + 1] if i + 1 < len(convs) else None


def modify(sd: dict[str, np.ndarray], kind: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    sd = {k: v.copy() for k, v in sd.items()}
    weights = [k for k, v in sd.items() if v.ndim >= 2]
    if kind.startswith("prune"):
        rate = int(kind[5:]) / 100
        for k in weights:
            w = sd[k]
            cut = np.quantile(np.abs(w), rate)
            w[np.abs(w) <= cut] = 0
    elif kind == "int8":
        for k in weights:
            s = np.abs(sd[k]).max() / 127
            sd[k] = (np.round(sd[k] / s).clip(-127, 127) * s).astype(np.float32)
    elif kind == "fp16":
        sd = {k: v.astype(np.float16).astype(np.float32) for k, v in sd.items()}
    elif kind == "bf16":
        sd = {k: ((v.view(np.uint32) + 0x8000) & 0xFFFF0000).view(np.float32) for k, v in sd.items()}
    elif kind.startswith("noise"):
        rel = float(kind[5:]) / 100
        for k in weights:
            sd[k] = sd[k] + rng.normal(0, rel * sd[k].std(), sd[k].shape).astype(np.float32)
    elif kind in ("perm", "rescale", "chscale", "bnfold", "sprune25"):
        for c in conv_names(sd)[:-1]:
            nxt = next_consumer(sd, c)
            bn = bn_after(sd, c)
            o = sd[c].shape[0]
            if kind == "perm":
                p = rng.permutation(o)
                sd[c] = sd[c][p]
                if c.replace("weight", "bias") in sd:
                    sd[c.replace("weight", "bias")] = sd[c.replace("weight", "bias")][p]
                if bn:
                    for n in ("weight", "bias", "running_mean", "running_var"):
                        sd[bn + n] = sd[bn + n][p]
                sd[nxt] = sd[nxt][:, p]
            elif kind in ("rescale", "chscale"):
                a = np.full(o, rng.uniform(0.3, 3.0)) if kind == "rescale" else rng.uniform(0.2, 5.0, o)
                a = a.astype(np.float32)
                sd[c] = sd[c] * a[:, None, None, None]
                if c.replace("weight", "bias") in sd:
                    sd[c.replace("weight", "bias")] = sd[c.replace("weight", "bias")] * a
                if bn:
                    sd[bn + "running_mean"] *= a
                    sd[bn + "running_var"] *= a * a
                else:
                    sd[nxt] = sd[nxt] / a[None, :, None, None]
            elif kind == "sprune25":
                l1 = np.abs(sd[c]).reshape(o, -1).sum(1)
                keep = np.sort(np.argsort(-l1, kind="stable")[: o - o // 4])
                sd[c] = sd[c][keep]
                for n in ("bias",):
                    if c.replace("weight", n) in sd:
                        sd[c.replace("weight", n)] = sd[c.replace("weight", n)][keep]
                if bn:
                    for n in ("weight", "bias", "running_mean", "running_var"):
                        sd[bn + n] = sd[bn + n][keep]
                sd[nxt] = sd[nxt][:, keep]
        if kind == "bnfold":
            for c in conv_names(sd):
                bn = bn_after(sd, c)
                if bn:
                    g = sd[bn + "weight"] / np.sqrt(sd[bn + "running_var"] + 1e-5)
                    sd[c] = sd[c] * g[:, None, None, None]
                    for n in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                        sd.pop(bn + n, None)
    else:
        raise ValueError(kind)
    return sd


LIGHT = ("ft_small", "ft_mid", "prune10", "prune30", "prune50", "int8", "fp16", "bf16", "noise1", "noise5",
         "perm", "rescale", "chscale", "bnfold")  # fmt: skip
HEAVY = ("ft_large", "ft_sgd", "prune70", "sprune25", "noise20")


def build_library(cache: Path, seeds: int) -> list[dict[str, Any]]:
    """Return entries {"id", "arch", "seed", "kind", "sd"}; kind 'orig' for originals."""
    import torch

    torch.set_num_threads(1)
    cache.mkdir(parents=True, exist_ok=True)
    x, y = digits()
    out: list[dict[str, Any]] = []
    for arch in ARCHS:
        for seed in range(seeds):
            path = cache / f"{arch}-{seed}.npz"
            if path.exists():
                with np.load(path) as z:
                    groups: dict[str, dict[str, np.ndarray]] = {}
                    for key in z.files:
                        kind, name = key.split("|", 1)
                        groups.setdefault(kind, {})[name] = z[key]
            else:
                torch.manual_seed(1000 + seed)
                model = train(build(arch), x, y, epochs=6, lr=3e-3, seed=seed)
                groups = {"orig": sd_numpy(model)}
                for kind, (ep, lr, sgd) in {
                    "ft_small": (1, 1e-4, False), "ft_mid": (2, 5e-4, False),
                    "ft_large": (4, 3e-3, False), "ft_sgd": (3, 1e-2, True),
                }.items():  # fmt: skip
                    groups[kind] = sd_numpy(train(copy.deepcopy(model), x, y, ep, lr, seed + 77, sgd))
                rng = np.random.default_rng(seed)
                for kind in LIGHT + HEAVY:
                    if kind not in groups:
                        groups[kind] = modify(groups["orig"], kind, rng)
                np.savez(path, **{f"{k}|{n}": v for k, sd in groups.items() for n, v in sd.items()})
            for kind, sd in groups.items():
                out.append({"id": f"{arch}-{seed}", "arch": arch, "seed": seed, "kind": kind, "sd": sd})
    return out


def evaluate_codes(lib: list[dict[str, Any]], codes: np.ndarray, bits: int) -> dict[str, Any]:
    """Distances per modification class to the original, and among distinct originals."""
    origs = [i for i, e in enumerate(lib) if e["kind"] == "orig"]
    pos = {lib[i]["id"]: i for i in origs}
    unpacked = np.unpackbits(codes, axis=1)[:, :bits].astype(np.int32)
    per_kind: dict[str, list[int]] = {}
    for i, e in enumerate(lib):
        if e["kind"] != "orig":
            d = int(np.sum(unpacked[i] != unpacked[pos[e["id"]]]))
            per_kind.setdefault(e["kind"], []).append(d)
    O = unpacked[origs]
    D = (O[:, None, :] != O[None, :, :]).sum(-1)
    same_arch = np.array([[lib[a]["arch"] == lib[b]["arch"] for b in origs] for a in origs])
    iu = np.triu_indices(len(origs), 1)
    return {"per_kind": per_kind, "distinct_same": D[iu][same_arch[iu]], "distinct_other": D[iu][~same_arch[iu]]}


def summarize(res: dict[str, Any], bits: int) -> str:
    lines = []
    light = [d for k, v in res["per_kind"].items() if k in LIGHT for d in v]
    ds, do = res["distinct_same"], res["distinct_other"]
    lines.append(
        f"light copies: mean {np.mean(light) / bits:.3f} p99 {np.percentile(light, 99) / bits:.3f} "
        f"max {max(light) / bits:.3f}"
        f" | distinct same-arch mean {ds.mean() / bits:.3f} min {ds.min() / bits:.3f}"
        f" | other-arch mean {do.mean() / bits:.3f} min {do.min() / bits:.3f}"
    )
    lines.append(
        "  " + "  ".join(f"{k}:{np.mean(v) / bits:.3f}/{max(v) / bits:.3f}" for k, v in res["per_kind"].items())
    )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", default="/tmp/codec_mini")
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--bits", type=int, default=256)
    ap.add_argument("--kw", default="{}", help="ModelHasher keyword arguments as JSON")
    args = ap.parse_args()
    import json

    from hashdb.codec import ModelHasher

    t0 = time.time()
    lib = build_library(Path(args.cache), args.seeds)
    print(f"library: {len(lib)} models in {time.time() - t0:.1f} s")
    h = ModelHasher(args.bits, **json.loads(args.kw))
    codes = np.stack([np.frombuffer(h.hash(e["sd"]), dtype=np.uint8) for e in lib])
    print(summarize(evaluate_codes(lib, codes, args.bits), args.bits))


if __name__ == "__main__":
    main()
