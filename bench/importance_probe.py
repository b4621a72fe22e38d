"""A probe for filter pruning (not a codec): weigh each channel by an importance that keeps every invariance.

    python3 -m bench.null train; python3 -m bench.zoo   # the null library and the zoo, cached
    python3 bench/importance_probe.py                   # table -> bench/RESULTS.md section importance_probe

Filter pruning removes the filters an attacker ranks weakest, and the default codec weighs every channel alike, so
a 30 % filter prune removes 30 % of each layer's sketch terms (docs/codec.md, *Codec v6*). This probe hashes with
the default codec, but each channel's term of its layer's sketch, and the descriptor it hands to its consumers,
weighted (``chain_sketches``' ``channel_weights``) by

    importance_i = 1 / (a_i b_i)

with a_i the producer's balancing row factor of filter i and b_i the balancing column factor of input i in its
consumers (root mean square over consumers read whole; a channel without one gets no weights in its layer). A
positive rescaling of channel i multiplies a_i by 1/c and b_i by c, so the importance is exactly invariant where
the balancing factors are: permutations, ReLU rescaling. BatchNorm folding changes a_i, so the probe first folds
every BatchNorm it can pair by name into its convolution (``conv1`` / ``bn1``, ``stem`` / ``stem_bn``,
``features.N`` / ``features.N+1``, ``down.0`` / ``down.1``), as a codec using it would have to at load time for
every format. It reports, against the default codec on the same models: the null library's independence (the
most conservative group's p and dof), the null library's copies (invariances included), and zoo originals'
pruned and fine-tuned copies, in the nets without and with BatchNorm.
"""

from __future__ import annotations

import argparse
import itertools
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import null, zoo  # noqa: E402
from bench._results import publish  # noqa: E402
from bench.null_bench import _state, copy_classes, group_stats  # noqa: E402
from hashdb import DEFAULT_BITS  # noqa: E402
from hashdb.codec import ModelHasher  # noqa: E402
from hashdb.codec import hasher as hasher_module  # noqa: E402
from hashdb.codec.chain import ChainConfig, balanced, plan_chain  # noqa: E402

NULL_COPIES = ("permute channels", "rescale per channel", "BN folding", "fine-tune Adam 1e-3", "transfer 150 steps",
               "transfer 30 epochs", "prune 50%", "filter prune 25%")  # fmt: skip
ZOO_COPIES = (("fine-tune sgd 1e-2, 150 steps", "finetune", "sgd lr=0.01 steps=150"),
              ("transfer, 150 steps", "transfer", "adam lr=0.001 steps=150"),
              ("magnitude 50 %", "prune_magnitude", "50%"),
              ("filters 10 %", "prune_filters", "10%"),
              ("filters 30 % + recovery", "prune_recover", "filters 30%"),
              ("filters 50 % + recovery", "prune_recover", "filters 50%"))  # fmt: skip


def _bn_of(prefix: str, sd: Mapping[str, np.ndarray], out: int) -> str | None:
    """The BatchNorm right after conv ``prefix``, by the naming conventions of the zoo and of torchvision."""
    candidates = [re.sub(r"conv(\d*)$", r"bn\1", prefix), prefix + "_bn"]
    m = re.match(r"(.*\.)(\d+)$", prefix)
    if m:
        candidates.append(m.group(1) + str(int(m.group(2)) + 1))
    for c in candidates:
        if c != prefix and c + ".running_var" in sd and sd[c + ".running_var"].shape == (out,):
            return c
    return None


def fold_batchnorm(sd: Mapping[str, np.ndarray], eps: float = 1e-5) -> dict[str, np.ndarray]:
    """Each conv's weights times gamma / sqrt(var + eps) of the BatchNorm paired with it, that BatchNorm dropped."""
    out: dict[str, np.ndarray] = {}
    used: set[str] = set()
    for k, v in sd.items():
        if k.endswith(".weight") and v.ndim >= 3 and (bn := _bn_of(k[: -len(".weight")], sd, v.shape[0])):
            gain = sd[bn + ".weight"].astype(np.float64) / np.sqrt(sd[bn + ".running_var"].astype(np.float64) + eps)
            v = (v.astype(np.float64) * gain.reshape(-1, *([1] * (v.ndim - 1)))).astype(np.float32)
            used.add(bn)
        out[k] = v
    return {k: v for k, v in out.items() if not any(k.startswith(b + ".") for b in used)}


def importance_weights(
    shapes: list[tuple[str, int, int, tuple[int, ...]]], make_layer: Callable[[int], np.ndarray], cfg: ChainConfig
) -> dict[str, np.ndarray]:
    """importance_i = 1 / (a_i b_i) per layer with dense consumers, normalised to a largest weight of 1."""
    chain = plan_chain(shapes)
    factors: dict[int, tuple[np.ndarray, np.ndarray] | None] = {}

    def of(pos: int) -> tuple[np.ndarray, np.ndarray] | None:  # a dense layer's (row, column) balancing factors
        if pos not in factors:
            layer = chain[pos]
            w = make_layer(layer.index)
            b = balanced(w.reshape(w.shape[0], w.shape[1], -1), 1, cfg.sweeps) if layer.groups == 1 else None
            factors[pos] = None if b is None or b.row is None or b.col is None else (b.row, b.col)
        return factors[pos]

    weights = {}
    for pos, layer in enumerate(chain):
        own = of(pos)
        cols = [of(c)[1] for c, x in enumerate(chain) if x.producer == pos and x.groups == 1 and of(c) is not None]
        if own is None or not cols:
            continue
        inv_b = np.sqrt(np.mean([np.divide(1.0, b**2, out=np.zeros_like(b), where=b > 0) for b in cols], axis=0))
        v = np.divide(1.0, own[0], out=np.zeros_like(own[0]), where=own[0] > 0) * inv_b
        if v.max() > 0:
            weights[layer.name] = v / v.max()
    return weights


@contextmanager
def weighted_hashing() -> Iterator[None]:
    """Every ModelHasher hashes with importance weights (its layers made once and kept for the lookahead)."""
    real = hasher_module.chain_sketches

    def chain_sketches(shapes: Any, make_layer: Any, features: int, cfg: ChainConfig) -> Any:
        kept: dict[int, np.ndarray] = {}

        def make(i: int) -> np.ndarray:
            if i not in kept:
                kept[i] = make_layer(i)
            return kept[i]

        return real(shapes, make, features, cfg, importance_weights(shapes, make, cfg))

    hasher_module.chain_sketches = chain_sketches  # type: ignore[assignment]
    try:
        yield
    finally:
        hasher_module.chain_sketches = real  # type: ignore[assignment]


def load(archs: list[str], seeds: int) -> dict[str, Any]:
    """The null library, its copies of seed 0, and ``archs``' zoo originals of seeds < ``seeds`` with copies."""
    from safetensors.numpy import load_file

    models: dict[str, Any] = {"null": {}, "copies": {}, "zoo": {}}
    for g in null.GROUPS:
        for s in range(30):
            if null.cache_path(g, s).exists():
                models["null"][(g, s)] = _state(null.trained(g, s))
        for name in copy_classes(g):
            p = null.CACHE / "copies" / f"{null.RECIPE}-{g}-s0-{name.replace(' ', '_').replace('%', 'pc')}.st"
            if name in NULL_COPIES and p.exists():
                models["copies"][(g, name)] = load_file(str(p))
    lib = zoo.Library(zoo.library_plan(), zoo.DEFAULT_CACHE)
    for o in [o for o in lib.originals if o.arch in archs and o.seed < seeds]:
        models["zoo"][("original", o.key, o.arch)] = lib.arrays(o)
        for label, mclass, strength in ZOO_COPIES:
            if (e := lib.first_copy(o, mclass, strength)) is not None:
                models["zoo"][(label, o.key, o.arch)] = lib.arrays(e)
    return models


def measure(models: dict[str, Any], bits: int) -> dict[str, Any]:
    """Independence, null copies and zoo copies under the hasher in effect (BatchNorm folded first)."""
    h = ModelHasher(bits)

    def code(sd: Mapping[str, np.ndarray]) -> np.ndarray:
        return h.hash_bits(fold_batchnorm(sd))

    library = {k: code(v) for k, v in models["null"].items()}
    groups = sorted({g for g, _ in library})
    stats = [group_stats(np.array([library[(g, s)] for s in range(30) if (g, s) in library]), bits, 0)
             for g in groups]  # fmt: skip
    copies: dict[str, list[int]] = {}
    for (g, name), sd in models["copies"].items():
        copies.setdefault(name, []).append(int(np.count_nonzero(code(sd) != library[(g, 0)])))
    codes = {k: code(v) for k, v in models["zoo"].items()}
    zoo_d: dict[tuple[str, bool], list[int]] = {}
    for (label, key, arch), c in codes.items():
        if label != "original":
            bn = arch not in ("plain", "vgg")
            zoo_d.setdefault((label, bn), []).append(int(np.count_nonzero(c != codes[("original", key, arch)])))
    originals = [(k[2], c) for k, c in codes.items() if k[0] == "original"]
    independent = [int(np.count_nonzero(a != b)) for (x, a), (y, b) in itertools.combinations(originals, 2) if x == y]
    return {"p": min(st["p"] for st in stats), "dof": min(st["dof"] for st in stats) / bits,
            "copies": {k: (int(np.median(v)), int(np.max(v))) for k, v in copies.items()},
            "zoo": {k: int(np.median(v)) for k, v in zoo_d.items()}, "independent": min(independent)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", nargs="+", default=["plain", "vgg", "resnet", "mobilenet"])
    ap.add_argument("--seeds", type=int, default=3, help="zoo originals per architecture (seeds 0..N-1)")
    ap.add_argument("--bits", type=int, default=None, help="code length (default: hashdb.DEFAULT_BITS)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    bits = args.bits or DEFAULT_BITS
    torch.set_num_threads(1)
    models = load(args.archs, args.seeds)
    plain = measure(models, bits)
    with weighted_hashing():
        weighted = measure(models, bits)
    runs = (("default codec", plain), ("importance-weighted", weighted))
    rows = ["| | " + " | ".join(name for name, _ in runs) + " |", "|---|---|---|",
            "| null library, most conservative group: p / dof per bit | "
            + " | ".join(f"{r['p']:.4f} / {r['dof']:.3f}" for _, r in runs) + " |"]  # fmt: skip
    for name in NULL_COPIES:
        if name in plain["copies"]:
            rows.append(f"| null copies, {name}: median / max | "
                        + " | ".join("{} / {}".format(*r["copies"][name]) for _, r in runs) + " |")  # fmt: skip
    rows.append("| zoo, closest independent originals of one architecture | "
                + " | ".join(str(r["independent"]) for _, r in runs) + " |")  # fmt: skip
    for bn in (False, True):
        for label, _, _ in ZOO_COPIES:
            if (label, bn) in plain["zoo"]:
                rows.append(f"| zoo, {'BatchNorm' if bn else 'no BatchNorm'}: {label} (median) | "
                            + " | ".join(str(r["zoo"][(label, bn)]) for _, r in runs) + " |")  # fmt: skip
    n_zoo = sum(1 for k in models["zoo"] if k[0] == "original")
    publish("importance_probe", "Importance probe: filter pruning against channels weighed by 1/(a_i b_i)",
            "bench/importance_probe.py", [
                f"Whole codes at {bits} bits, BatchNorm folded by name before hashing in both columns (the default "
                "codec is invariant to that folding). Null library: "
                f"{len(models['null'])} models, copies of seed 0 of each group; zoo: {n_zoo} originals "
                f"({', '.join(args.archs)}; seeds 0-{args.seeds - 1}), one copy of each kind; the nets without "
                "BatchNorm are plain and VGG. A probe, not a codec: no null is fitted for it.",
                "",
                *rows,
            ], write=not args.no_write)  # fmt: skip


if __name__ == "__main__":
    main()
