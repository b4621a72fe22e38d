"""Why pruned copies move the code: per-layer distances, and what the soft threshold of codec v5 changes.

    python3 -m bench.zoo                    # the zoo (bench/zoo), cached
    python3 bench/pruning_bench.py          # tables -> bench/RESULTS.md section pruning

Pruning was codec v4's weak spot (docs/codec.md, *Pruning as a thief prunes*): pruned copies that a recovery
fine-tune made work again land about as far from their originals as pruning alone puts them. Codec v5
soft-thresholds each balanced layer (``ChainConfig.shrink``, chain.shrink_small) so that the weights magnitude
pruning removes count for nothing. For the zoo originals of ``--archs`` and ``--seeds`` this measures

1. each layer's own code distance (the sign of its sketch, as the database stores it) between the original and
   its pruned, recovered, fine-tuned copies and an independently trained model of its architecture: is the
   damage local to each layer, or does it grow with depth through the propagated descriptors?
2. the model-code distance under the default (v5) and under the neighbouring settings: v4 (no threshold), other
   thresholds, v4 with small balanced weights zeroed (``ChainConfig.prune``: a hard threshold), beside the
   same-architecture independent pairs: what each buys and what it costs.

Only v4 and v5 have fitted nulls; the other rows are probes (bench/codec_tradeoff.py measures the threshold's
cost in independence on the null library).
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
from bench._results import publish  # noqa: E402
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
    ("default (v5: shrink 0.35)", {}),
    ("v4 (shrink 0)", {"shrink": 0.0}),
    ("shrink 0.2", {"shrink": 0.2}),
    ("shrink 0.5", {"shrink": 0.5}),
    ("v4 + prune 0.5 (hard)", {"shrink": 0.0, "prune": 0.5}),
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

    # 1. per layer, v5 and v4: first layer, the median of the middle ones, the last one
    rows = ["| copy | pairs | first layer: v5 / v4 | middle layers (median): v5 / v4 | last layer: v5 / v4 |",
            "|---|---|---|---|---|"]  # fmt: skip
    per_setting = []
    for name, _ in SETTINGS[:2]:
        layers = {k: [sk > 0 for sk in v] for k, v in sketches[name].items()}

        def by_depth(a: str, b: str, layers: dict[str, list[np.ndarray]] = layers) -> tuple[int, int, int]:
            d = [int(np.count_nonzero(x != y)) for x, y in zip(layers[a], layers[b], strict=False)]
            return d[0], int(np.median(d[1:-1])) if len(d) > 2 else d[0], d[-1]

        per_setting.append({label: np.array([by_depth(a.key, b.key) for a, b in pairs])
                            for label, pairs in [("independent, same architecture", independent), *copies.items()]})
    for label in per_setting[0]:
        cells = [" / ".join(f"{int(np.median(ds[label][:, j]))}" for ds in per_setting) for j in range(3)]
        rows.append(f"| {label} | {len(per_setting[0][label])} | " + " | ".join(cells) + " |")

    # 2. model codes under each setting
    head = "| setting | independent: min / median | " + " | ".join(label for label, _, _ in COPIES) + " |"
    rows2 = [head, "|---" * (len(COPIES) + 2) + "|"]
    for name, _ in SETTINGS:
        codes = {k: np.sum(v, axis=0) > 0 for k, v in sketches[name].items()}
        ind = [int(np.count_nonzero(codes[a.key] != codes[b.key])) for a, b in independent]
        med = [int(np.median([np.count_nonzero(codes[a.key] != codes[b.key]) for a, b in copies[label]]))
               for label, _, _ in COPIES]  # fmt: skip
        rows2.append(f"| {name} | {min(ind)} / {int(np.median(ind))} | " + " | ".join(map(str, med)) + " |")

    title = "Pruning: where pruned copies move the code, and what other settings would do"
    publish("pruning", title, "bench/pruning_bench.py", [
        f"{len(originals)} zoo originals ({', '.join(args.archs)}; seeds 0-{args.seeds - 1}), one copy of each kind "
        f"per original, {bits} bits. Medians of the Hamming distance to the original (independent: between "
        "originals of one architecture).",
        "",
        f"Each layer's own code (`{ModelHasher(bits).codec}`):",
        "",
        *rows,
        "",
        "The model code under the default (v5) and neighbouring settings (`shrink`: the soft threshold, a fraction "
        "of the layer's 90th percentile of |w|; `prune`: balanced weights at or under prune / 0.9 of it zeroed):",
        "",
        *rows2,
    ], write=not args.no_write)  # fmt: skip


if __name__ == "__main__":
    main()
