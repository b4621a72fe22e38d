"""Why pruned copies move the code: per-layer distances, and what the soft threshold (codecs v5-v7) and the channel
importance (codec v7) change.

    python3 -m bench.zoo                    # the zoo (bench/zoo), cached
    python3 bench/pruning_bench.py          # tables -> bench/RESULTS.md section pruning

Pruning was codec v4's weak spot (docs/codec.md, *Pruning as a thief prunes*): pruned copies that a recovery
fine-tune made work again land about as far from their originals as pruning alone puts them. Codec v5
soft-thresholds each balanced layer (``ChainConfig.shrink``, chain.shrink_small) so that the weights magnitude
pruning removes count for nothing; codec v6 takes the threshold from the balanced layer's shape (a multiple of its
RMS weight); codec v7 (the default) weighs each channel by its importance to the function
(``ChainConfig.importance``, chain.channel_importance), so the filters a filter prune removes weigh little. For
the zoo originals of ``--archs`` and ``--seeds`` this measures

1. each layer's own code distance (the sign of its sketch, as the database stores it) between the original and
   its pruned, recovered, fine-tuned copies and an independently trained model of its architecture, under v7 and
   v6: is the damage local to each layer, or does it grow with depth through the propagated descriptors?
2. the model-code distance under the default (v7) and under the neighbouring settings: v6 (no importance),
   importance 1, v5, v4 (no threshold), another threshold, beside the same-architecture independent pairs: what
   each buys and what it costs;
3. which filters a filter prune takes, against the importance a code exactly invariant to rescaling can use.

Only v4-v7 at their defaults have fitted nulls; the other rows are probes (bench/codec_tradeoff.py measures the
threshold's cost in independence on the null library).
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
    ("default (v7: importance 0.75, shrink 0.6 x the RMS weight)", {}),
    ("v6 (importance 0)", {"importance": 0.0}),
    ("v7, importance 1", {"importance": 1.0}),
    ("v4 (shrink 0, importance 0)", {"shrink": 0.0, "importance": 0.0}),
    ("v5 (shrink 0.35 x the 90th percentile)", {"shrink": 0.35, "shrink_by_rms": False, "importance": 0.0}),
    ("v6, shrink 0.9", {"shrink": 0.9, "importance": 0.0}),
)


def _norms(w: torch.Tensor, dim: int) -> np.ndarray:
    """Norms of ``w`` over every axis but ``dim`` (filters: 0; a consumer's input channels: 1)."""
    a = w.detach().double().numpy()
    return np.sqrt((np.moveaxis(a, dim, 0).reshape(a.shape[dim], -1) ** 2).sum(axis=1))


def prune_choice(lib: Any, originals: list[Any], shares: tuple[float, ...] = (0.3, 0.5)) -> list[str]:
    """Which filters a filter prune takes, against what a code exactly invariant to rescaling could know.

    The zoo's ``prune_filters`` zeroes each conv's filters of lowest L2 norm, as stored. A code invariant to
    every function-preserving positive rescaling (ReLU rescaling, BatchNorm folding, a BatchNorm absorbing a
    rescaled conv) can see a channel's magnitude only as the function does: its filter norm after folding its
    BatchNorm (gamma / sqrt(var + eps)), times its consumers' input-column norms. Per conv with consumers: the
    share of the pruned filters that are also lowest by that importance (chance: the share itself). A MobileNet
    pointwise conv's channels pass a depthwise conv and its BatchNorm (``through``) before their consumer; those
    factors are left out here (with them folded in too, a review measured 0.35 / 0.55 over 3 seeds: still chance),
    and the depthwise filters that ``prune_filters`` also zeroes are not counted."""
    rows: dict[tuple[str, bool], dict[float, list[float]]] = {}
    for o in originals:
        m = lib.model(o)
        for grp in m.channel_groups():
            if not grp.into:
                continue
            col = np.sqrt(sum(_norms(m.get_submodule(n).weight, 1) ** 2 for n in grp.into))
            for name in grp.out:
                raw = _norms(m.get_submodule(name).weight, 0)
                if len(raw) != len(col) or len(raw) < 8:
                    continue
                folded = raw
                if grp.bn is not None:
                    bn = m.get_submodule(grp.bn)
                    gain = bn.weight.detach().double().abs() / torch.sqrt(bn.running_var.detach().double() + bn.eps)
                    folded = raw * gain.numpy()
                importance = folded * col
                for share in shares:
                    k = int(share * len(raw))
                    pruned = set(np.argsort(raw, kind="stable")[:k].tolist())
                    weak = set(np.argsort(importance, kind="stable")[:k].tolist())
                    rows.setdefault((o.arch, grp.bn is not None), {}).setdefault(share, []).append(
                        len(pruned & weak) / k
                    )
    out = ["| architecture | BatchNorm | convs | " + " | ".join(f"overlap at {s:.0%} (chance {s:.2f})" for s in shares)
           + " |", "|---|---|---|" + "---|" * len(shares)]  # fmt: skip
    for (arch, bn), by_share in sorted(rows.items()):
        n = len(next(iter(by_share.values())))
        out.append(f"| {arch} | {'yes' if bn else 'no'} | {n} | "
                   + " | ".join(f"{np.mean(by_share[s]):.2f}" for s in shares) + " |")  # fmt: skip
    return out


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
            if (e := lib.first_copy(o, mclass, strength)) is not None:
                copies[label].append((o, e))
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

    # 1. per layer, v7 and v6: first layer, the median of the middle ones, the last one
    rows = ["| copy | pairs | first layer: v7 / v6 | middle layers (median): v7 / v6 | last layer: v7 / v6 |",
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
        "The model code under the default (v7) and neighbouring settings (`importance`: the power of each "
        "channel's importance, 0 weighs every channel alike as v6 did; `shrink`: the soft threshold, v6 and v7: a "
        "multiple of the balanced layer's RMS weight, v5: a fraction of its 90th percentile of |w|; `prune`: "
        "balanced weights at or under prune / 0.9 of that percentile zeroed):",
        "",
        *rows2,
        "",
        "Which filters a filter prune takes (`prune_filters`: each conv's lowest-L2 filters as stored) against the "
        "lowest by the importance a code exactly invariant to rescaling could use (filter norm after folding the "
        "BatchNorm, times the consumers' input-column norms), per conv with consumers: the share of the pruned "
        "filters that are also the least important. At chance the code cannot know which filters will go. (MobileNet: "
        "the depthwise layer between a pointwise conv and its consumer is left out of the importance.)",
        "",
        *prune_choice(lib, originals),
    ], write=not args.no_write)  # fmt: skip


if __name__ == "__main__":
    main()
