"""Why pruned copies move the code: per-layer distances, and the codec settings a next version could change.

    python3 -m bench.zoo                    # the zoo (bench/zoo), cached
    python3 bench/pruning_bench.py          # tables -> bench/RESULTS.md section pruning

Pruning is the default codec's weak spot (docs/codec.md, *Pruning as a thief prunes*): pruned copies that a
recovery fine-tune made work again land about as far from their originals as pruning alone puts them. For the
zoo originals of ``--archs`` and ``--seeds`` this measures

1. each layer's own code distance (the sign of its sketch, as the database stores it) between the original and
   its pruned, recovered, fine-tuned copies and an independently trained model of its architecture: is the
   damage local to each layer, or does it grow with depth through the propagated descriptors?
2. the model-code distance under the default settings and under the alternatives a next codec version could
   take (``ChainConfig.prune``: small balanced weights zeroed before the descriptors; a lower Fourier
   frequency ``omega``), beside the same-architecture independent pairs: what each buys and what it costs.

No null is refitted here: the alternatives are probes for a next codec version, not settings to ship.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import zoo  # noqa: E402
from bench._results import command, machine_line, write_section  # noqa: E402
from hashdb import DEFAULT_BITS  # noqa: E402
from hashdb.codec import ModelHasher  # noqa: E402

# (label, class, strength prefix) of the copies measured, lightest first
COPIES = (
    ("fine-tune sgd 1e-2, 150 steps", "finetune", "sgd lr=0.01 steps=150"),
    ("magnitude 30 %", "prune_magnitude", "30%"),
    ("magnitude 50 %", "prune_magnitude", "50%"),
    ("magnitude 50 % + recovery", "prune_recover", "magnitude 50%"),
    ("filters 10 %", "prune_filters", "10%"),
    ("filters 30 %", "prune_filters", "30%"),
    ("filters 30 % + recovery", "prune_recover", "filters 30%"),
)
SETTINGS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("default (v4)", {}),
    ("prune 0.5", {"prune": 0.5}),
    ("omega 1", {"omega": 1.0}),
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", nargs="+", default=["plain", "vgg", "resnet", "mobilenet"])
    ap.add_argument("--seeds", type=int, default=3, help="originals per architecture (seeds 0..N-1)")
    ap.add_argument("--bits", type=int, default=None, help="code length (default: hashdb.DEFAULT_BITS)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    bits = args.bits or DEFAULT_BITS
    torch.set_num_threads(1)
    lib = zoo.Library(zoo.library_plan(), zoo.DEFAULT_CACHE)
    originals = [o for o in lib.originals if o.arch in args.archs and o.seed < args.seeds]
    copies: dict[str, list[tuple[zoo.Entry, zoo.Entry]]] = {label: [] for label, _, _ in COPIES}
    for o in originals:
        for label, mclass, strength in COPIES:
            found = [e for e in lib.entries if e.original == o.key and e.mclass == mclass
                     and e.strength.startswith(strength)]  # fmt: skip
            copies[label] += [(o, e) for e in found[:1]]
    independent = [(a, b) for a, b in itertools.combinations(originals, 2) if a.arch == b.arch]
    weights = {e.key: lib.arrays(e) for e in originals}
    for pairs in copies.values():
        weights.update({e.key: lib.arrays(e) for _, e in pairs})

    # One pass per setting: each layer's sketch; a layer's code is the sign of its sketch, the model's the sign
    # of their sum (as ModelHasher.suspect makes them)
    sketches: dict[str, dict[str, list[np.ndarray]]] = {}
    for name, change in SETTINGS:
        hs = ModelHasher(bits)
        hs.chain = dataclasses.replace(hs.chain, **change)
        sketches[name] = {k: [np.asarray(sk) for _, sk in hs.layer_sketches(sd)] for k, sd in weights.items()}

    # 1. per layer, default settings: first layer, the median of the middle ones, the last one
    default = SETTINGS[0][0]
    layers = {k: [sk > 0 for sk in v] for k, v in sketches[default].items()}

    def by_depth(a: str, b: str) -> tuple[int, int, int]:
        d = [int(np.count_nonzero(x != y)) for x, y in zip(layers[a], layers[b], strict=False)]
        return d[0], int(np.median(d[1:-1])) if len(d) > 2 else d[0], d[-1]

    rows = ["| copy | pairs | first layer | middle layers (median) | last layer |", "|---|---|---|---|---|"]
    for label, pairs in [("independent, same architecture", independent), *copies.items()]:
        ds = np.array([by_depth(a.key, b.key) for a, b in pairs])
        rows.append(f"| {label} | {len(pairs)} | " + " | ".join(f"{int(np.median(ds[:, j]))}" for j in range(3)) + " |")

    # 2. model codes under each setting
    head = "| setting | independent: min / median | " + " | ".join(label for label, _, _ in COPIES) + " |"
    rows2 = [head, "|---" * (len(COPIES) + 2) + "|"]
    for name, _ in SETTINGS:
        codes = {k: np.sum(v, axis=0) > 0 for k, v in sketches[name].items()}
        ind = [int(np.count_nonzero(codes[a.key] != codes[b.key])) for a, b in independent]
        med = [int(np.median([np.count_nonzero(codes[a.key] != codes[b.key]) for a, b in copies[label]]))
               for label, _, _ in COPIES]  # fmt: skip
        rows2.append(f"| {name} | {min(ind)} / {int(np.median(ind))} | " + " | ".join(map(str, med)) + " |")

    body = "\n".join([
        "## Pruning: where pruned copies move the code, and what other settings would do",
        "",
        f"`{command('bench/pruning_bench.py')}`",
        "",
        machine_line(),
        "",
        f"{len(originals)} zoo originals ({', '.join(args.archs)}; seeds 0-{args.seeds - 1}), one copy of each kind "
        f"per original, {bits} bits. Medians of the Hamming distance to the original (independent: between "
        "originals of one architecture).",
        "",
        f"Each layer's own code (`{ModelHasher(bits).codec}`):",
        "",
        *rows,
        "",
        "The model code under the default settings and under probes for a next codec version (no null refitted; "
        "`prune`: balanced weights at or under prune / 0.9 of the layer's 90th percentile zeroed):",
        "",
        *rows2,
    ])  # fmt: skip
    print(body)
    if not args.no_write:
        write_section("pruning", body)


if __name__ == "__main__":
    main()
