"""Codes of a fixed set of ordinary models, to show that a numerics change leaves them bit-identical.

    python3 bench/codec_identity.py dump before.json        # on the old code
    python3 bench/codec_identity.py dump after.json         # on the new code
    python3 bench/codec_identity.py compare before.json after.json

Models: random-init CNNs (plain, BatchNorm, conv1d, mixed conv3d/conv2d), magnitude-pruned (zero kernels
inside a layer), filter-pruned (zero rows), per-channel rescaled, and a sample of the small zoo (trained,
then quantized, cast, pruned, permuted ... copies; `--no-zoo` skips it). Hashers: 64/256/2048 bits, the
quantile rule, and a setting with every feature, odd_sign encoding and a small kernel cap.

`--cached` adds every model the benchmarks have cached (bench/cache: the null library, its copies, the zoo),
with the default hasher's model code and layer codes. `compare` also counts the bits that differ: a change of
arithmetic that is only a change of float32 rounding flips a handful of bits in millions (a feature within
rounding of zero), and a changed codec flips a good share of them. `--codec` hashes with another codec than the
default (a new codec version must leave the older ones' codes as they were).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _sd(model: Any) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items() if v.is_floating_point()}


def _cnn(seed: int, width: int = 16, bn: bool = False) -> Any:
    import torch
    from torch import nn

    torch.manual_seed(seed)
    if bn:
        return nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        )  # fmt: skip
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(),
    )  # fmt: skip


def models(zoo_sample: bool) -> Iterator[tuple[str, Any]]:
    import torch
    from torch import nn

    for s in range(6):
        yield f"cnn{s}", _sd(_cnn(s))
    for s in range(3):
        yield f"bn{s}", _sd(_cnn(s, bn=True))
    torch.manual_seed(5)
    yield "conv1d", _sd(nn.Sequential(nn.Conv1d(3, 16, 3), nn.ReLU(), nn.Conv1d(16, 32, 5), nn.Conv1d(32, 32, 3)))
    torch.manual_seed(6)
    yield "mixed", _sd(nn.Sequential(nn.Conv3d(2, 8, 3), nn.Conv3d(8, 8, 3), nn.Conv2d(8, 16, 5), nn.Conv2d(16, 16, 2)))
    for s in range(3):
        sd = _sd(_cnn(10 + s, width=24))
        rng = np.random.default_rng(s)
        for v in sd.values():
            if v.ndim == 4:
                a = np.abs(v)
                v[a < np.quantile(a, 0.6)] = 0
                if s == 1:
                    v[rng.random(v.shape[:2]) < 0.3] = 0
                if s == 2:
                    v[: v.shape[0] // 3] = 0
        yield f"pruned{s}", sd
    for s in range(3):
        sd = _sd(_cnn(20 + s))
        rng = np.random.default_rng(s)
        for k, v in sd.items():
            if v.ndim == 4:
                sd[k] = (v * rng.uniform(0.3, 3, (v.shape[0], 1, 1, 1))).astype(np.float32)
        yield f"scaled{s}", sd
    if zoo_sample:
        from bench.zoo import small_library

        with tempfile.TemporaryDirectory(prefix="codec-identity-") as cache:  # removed when the dump is done
            lib = small_library(cache_dir=cache)
            for e in lib.entries[:: max(1, len(lib.entries) // 25)]:
                yield f"zoo:{e.key}", lib.model(e)


def cached() -> Iterator[tuple[str, Any]]:
    """Every model cached under bench/cache (safetensors files; the null library's copies are named .st), by its
    path there."""
    from safetensors.numpy import load_file

    root = Path(__file__).resolve().parent / "cache"
    for f in sorted(p for p in root.rglob("*") if p.suffix in (".safetensors", ".st")):
        yield f"cache:{f.relative_to(root)}", str(f) if f.suffix == ".safetensors" else load_file(str(f))


def dump(path: str, zoo_sample: bool, with_cached: bool = False, codec: str | None = None) -> None:
    from hashdb.codec import ModelHasher

    kw = {} if codec is None else {"codec": codec}
    hashers = {str(b): ModelHasher(b, **kw) for b in (64, 256, 2048)}
    hashers["quantile"] = ModelHasher(256, prune_rule="quantile", prune=0.7, **kw)
    hashers["all"] = ModelHasher(
        256, prune=0.0, features=("skew", "kurt", "mean", "k2"), encoding="odd_sign", max_kernels=64, **kw
    )
    out: dict[str, str] = {}
    for name, m in models(zoo_sample):
        for hn, h in hashers.items():
            try:
                out[f"{name}/{hn}"] = h.hash(m).hex()
            except Exception as exc:  # noqa: BLE001 - a refusal is part of the record
                out[f"{name}/{hn}"] = f"error: {exc}"
    if with_cached:
        h = ModelHasher(**kw)
        for name, f in cached():
            try:
                code, layers = h.hash_with_layers(f)
            except Exception as exc:  # noqa: BLE001 - a refusal is part of the record
                out[f"{name}/default"] = f"error: {exc}"
                continue
            out[f"{name}/default"] = code.hex()
            out[f"{name}/default-layers"] = b"".join(c for _, c in layers).hex()
    Path(path).write_text(json.dumps(out, indent=0, sort_keys=True))
    print(f"{len(out)} codes -> {path}")


def compare(a: str, b: str) -> int:
    x, y = json.loads(Path(a).read_text()), json.loads(Path(b).read_text())
    differ = sorted(k for k in x.keys() | y.keys() if x.get(k) != y.get(k))
    bits = flipped = 0
    for k in x.keys() & y.keys():
        if len(x[k]) == len(y[k]) and not x[k].startswith("error"):
            a, b = np.frombuffer(bytes.fromhex(x[k]), np.uint8), np.frombuffer(bytes.fromhex(y[k]), np.uint8)
            bits += 8 * len(a)
            flipped += int(np.unpackbits(a ^ b).sum())
    for k in differ:
        shown = [v if v is None or len(v) <= 80 else v[:77] + "..." for v in (x.get(k), y.get(k))]
        print(f"  differs: {k}: {shown[0]} vs {shown[1]}")
    print(f"{len(x.keys() & y.keys())} codes in both, {len(differ)} differ; {flipped} of {bits} bits differ")
    return 1 if differ else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump")
    d.add_argument("path")
    d.add_argument("--no-zoo", action="store_true")
    d.add_argument("--cached", action="store_true", help="add every model cached under bench/cache")
    d.add_argument("--codec", default=None, help="hash with this codec (default: the default codec), e.g. to show "
                   "that an older codec kept its codes")
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    args = ap.parse_args()
    if args.cmd == "dump":
        dump(args.path, not args.no_zoo, args.cached, args.codec)
        return 0
    return compare(args.a, args.b)


if __name__ == "__main__":
    sys.exit(main())
