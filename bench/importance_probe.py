"""Channel importance against filter pruning: codec v6 (every channel alike) against v7 (each channel weighed by
its importance to the function), on the same models.

    python3 -m bench.null train; python3 -m bench.zoo   # the null library and the zoo, cached
    python3 bench/importance_probe.py                   # table -> bench/RESULTS.md section importance_probe

Filter pruning removes the filters an attacker ranks weakest. Codec v6 weighs every channel alike, so a 30 % filter
prune removes 30 % of each layer's sketch terms. Codec v7 weighs channel i's term of its layer's sketch, and the
descriptor it hands to its consumers, by

    importance_i = (1 / (a_i b_i)) ** 0.75

with a_i the producer's balancing row factor of filter i and b_i the balancing column factor of input i in its
consumers (hashdb/codec/chain.py, ``channel_importance``), BatchNorm folded in first (hashdb/codec/batchnorm.py).
This bench began as the probe that chose it (docs/codec.md, *Codec v7*); it reports, for both codecs: the null
library's independence (the most conservative group's p and dof), the null library's copies (invariances
included), and zoo originals' pruned and fine-tuned copies, in the nets without and with BatchNorm.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Mapping
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
from hashdb.codec.hasher import CHAIN_V6, CODEC_VERSION  # noqa: E402

NULL_COPIES = ("permute channels", "rescale per channel", "BN folding", "fine-tune Adam 1e-3", "transfer 150 steps",
               "transfer 30 epochs", "prune 50%", "filter prune 25%")  # fmt: skip
ZOO_COPIES = (("fine-tune sgd 1e-2, 150 steps", "finetune", "sgd lr=0.01 steps=150"),
              ("transfer, 150 steps", "transfer", "adam lr=0.001 steps=150"),
              ("magnitude 50 %", "prune_magnitude", "50%"),
              ("filters 10 %", "prune_filters", "10%"),
              ("filters 30 % + recovery", "prune_recover", "filters 30%"),
              ("filters 50 % + recovery", "prune_recover", "filters 50%"))  # fmt: skip


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


def measure(models: dict[str, Any], bits: int, codec: str) -> dict[str, Any]:
    """Independence, null copies and zoo copies under ``codec``."""
    h = ModelHasher(bits, codec=codec)

    def code(sd: Mapping[str, np.ndarray]) -> np.ndarray:
        return h.hash_bits(sd)

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
    plain = measure(models, bits, CHAIN_V6)
    weighted = measure(models, bits, CODEC_VERSION)
    runs = ((f"v6 ({CHAIN_V6})", plain), (f"v7 ({CODEC_VERSION}, the default)", weighted))
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
    publish("importance_probe", "Channel importance: filter pruning under codec v6 and v7",
            "bench/importance_probe.py", [
                f"Whole codes at {bits} bits, the files as stored (v7 folds BatchNorm in itself; v6 is invariant to "
                "that folding). Null library: "
                f"{len(models['null'])} models, copies of seed 0 of each group; zoo: {n_zoo} originals "
                f"({', '.join(args.archs)}; seeds 0-{args.seeds - 1}), one copy of each kind; the nets without "
                "BatchNorm are plain and VGG.",
                "",
                *rows,
            ], write=not args.no_write)  # fmt: skip


if __name__ == "__main__":
    main()
