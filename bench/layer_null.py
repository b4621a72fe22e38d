"""The layer-level null: how close single layers of independently trained models land (partial-copy evidence).

    python3 -m bench.null train                     # the null library (bench/null.py), cached
    python3 bench/layer_null.py                     # tables -> bench/RESULTS.md section layer_null
    python3 bench/layer_null.py --write-null        # also store the fit in hashdb/codec/null.json ("layers")

Every eligible layer code (hasher.hash_with_layers: layers of 16 filters or more) of every model is compared
with every eligible layer of every other model of the same group (same architecture, same data, other seeds):
the hardest negatives a partial-copy search meets. Per group and length: the layer pairs' mean fractional
distance p, sd, Daugman's dof, the closest pair; per layer size (the smaller layer's filters) the same. The
fitted layer null is the most conservative group (lowest p, lowest dof). Then the check that matters: for every
independent pair of models, the "k of n layers" false-match rate that hashdb.matching would report (twins within
the screening radius, one-to-one), against the share of pairs that get that rate or less: the reported rate must
never fall below the observed share.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import null  # noqa: E402
from bench._results import machine_line, write_section  # noqa: E402
from hashdb.codec import ModelHasher  # noqa: E402
from hashdb.codec.null import (  # noqa: E402
    LAYER_SCREEN_FMR,
    NullFit,
    false_match_rate,
    largest_distance,
    partial_false_match_rate,
    same_fit,
)
from hashdb.matching import one_to_one  # noqa: E402

NULL_JSON = Path(__file__).resolve().parent.parent / "hashdb" / "codec" / "null.json"
BUCKETS = (16, 32, 64, 128)  # layer sizes (filters of the smaller layer of a pair), each up to the next
CROSS_SEEDS = 4  # models per group in the cross-group layer pairs of a family fit


def _bucket(filters: int) -> int:
    return max(b for b in BUCKETS if filters >= b)


def model_layers(h: ModelHasher, group: str, seed: int) -> list[tuple[str, np.ndarray, int]]:
    """(name, code bits at the hasher's length, filters) of each eligible layer of one null-library model."""
    state = {k: v.detach().numpy() for k, v in null.trained(group, seed).state_dict().items()}
    _, layers = h.hash_with_layers(state)
    return [(name, np.unpackbits(np.frombuffer(code, np.uint8)).astype(bool), int(state[name].shape[0]))
            for name, code in layers]  # fmt: skip


def _stats(ds: np.ndarray, bits: int) -> tuple[float, float, float, int]:
    frac = ds / bits
    p, sd = float(frac.mean()), float(frac.std(ddof=1))
    return p, sd, (p * (1 - p) / sd**2 if sd > 0 else float("inf")), int(ds.min())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bits", type=int, nargs="+", default=[256, 512, 768, 1024])
    ap.add_argument("--seeds", type=int, default=12, help="models per group (pairs of layers grow as seeds^2)")
    ap.add_argument("--groups", nargs="*", default=None)
    ap.add_argument("--write-null", action="store_true", help=f"store the fit in {NULL_JSON.name}")
    ap.add_argument("--no-results", action="store_true", help="print only; leave bench/RESULTS.md as it is")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    groups = [g for g in (args.groups or list(null.GROUPS)) if null.cache_path(g, 0).exists()]
    top = max(args.bits)
    h = ModelHasher(top)
    lines = ["## Layer null: single layers of independently trained models (bench/layer_null.py)\n",
             f"`python3 -m bench.null train` then `python3 bench/layer_null.py {' '.join(argv or sys.argv[1:])}`; "
             f"{machine_line()}.\n"]  # fmt: skip
    t0 = time.perf_counter()
    library, families = {}, {}
    for g in groups:
        seeds = [s for s in range(args.seeds) if null.cache_path(g, s).exists()]
        models = [model_layers(h, g, s) for s in seeds]
        if len(models) >= 3 and all(models):
            library[g] = models
            families[g] = h.suspect({k: v.detach().numpy() for k, v in null.trained(g, 0).state_dict().items()}).family
    lines.append(f"{sum(len(m) for m in library.values())} models, {len(library)} groups, hashed in "
                 f"{time.perf_counter() - t0:.0f} s. Eligible layers: 16 filters or more.\n")  # fmt: skip
    rows, by_size, fits = [], {}, {b: [] for b in args.bits}
    pair_matrices: dict[int, list[tuple[np.ndarray, str | None]]] = {b: [] for b in args.bits}
    for g, models in library.items():
        for b in args.bits:
            ds, sizes = [], []
            for ma, mb in itertools.combinations(models, 2):
                a = np.array([c[:b] for _, c, _ in ma])
                c = np.array([c[:b] for _, c, _ in mb])
                d = (a[:, None, :] != c[None, :, :]).sum(axis=2)
                ds.append(d.ravel())
                fa = np.array([f for _, _, f in ma])
                fb = np.array([f for _, _, f in mb])
                sizes.append(np.minimum(fa[:, None], fb[None, :]).ravel())
                pair_matrices[b].append((d, families[g]))
            all_d, all_s = np.concatenate(ds), np.concatenate(sizes)
            p, sd, dof, dmin = _stats(all_d, b)
            tail = tail_matched_dof(all_d, b, p, dof)
            rows.append((g, b, len(models), len(all_d), p, sd, dof, dmin, tail))
            fits[b].append((g, p, tail))
            for size in BUCKETS:
                sel = np.array([_bucket(int(s)) == size for s in all_s])
                if sel.sum() > 10:
                    by_size.setdefault((size, b), []).append(all_d[sel])
    lines.append("| group | bits | models | layer pairs | mean p | sd | dof (N) | dof / bits | min | tail dof |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for g, b, n, pairs, p, sd, dof, dmin, tail in rows:
        lines.append(f"| {g} | {b} | {n} | {pairs} | {p:.4f} | {sd:.4f} | {dof:.0f} | {dof / b:.2f} | {dmin} "
                     f"| {tail:.0f} |")  # fmt: skip
    lines.append("\nBy layer size (filters of the smaller layer of the pair, all groups):\n")
    lines.append("| filters | bits | layer pairs | mean p | sd | dof (N) | dof / bits | min |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for (size, b), parts in sorted(by_size.items()):
        d = np.concatenate(parts)
        p, sd, dof, dmin = _stats(d, b)
        lines.append(f"| {size}+ | {b} | {len(d)} | {p:.4f} | {sd:.4f} | {dof:.0f} | {dof / b:.2f} | {dmin} |")
    conservative = {}
    lines.append("")
    for b, entries in fits.items():
        p, dof = min(e[1] for e in entries), min(e[2] for e in entries)
        conservative[b] = (p, dof)
        screen = largest_distance(b, NullFit(p, dof, True), LAYER_SCREEN_FMR)
        lines.append(f"Layer null at {b} bits (most conservative group): p = {p:.4f}, dof = {dof:.0f}; screening "
                     f"radius (fmr <= {LAYER_SCREEN_FMR:g} per layer pair) = {screen}.")  # fmt: skip
    family_fits = {}
    lines.append("\nPer kernel family of the suspect (its own groups, and its layers against every other group's: "
                 f"the first {CROSS_SEEDS} models of each, pairs of other seeds only, since bench/null.py seeds every "
                 "architecture alike and a shared first-layer init is no independent pair):\n")
    lines.append("| family | bits | cross layer pairs | cross p | cross tail dof | fitted p | fitted dof "
                 "| screening r |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for family in sorted({f for f in families.values() if f is not None}):
        own = [g for g, f in families.items() if f == family]
        family_fits[family] = {}
        for b in args.bits:
            cross = [(np.array([c[:b] for _, c, _ in ma])[:, None, :] != np.array([c[:b] for _, c, _ in mb])[None])
                     .sum(axis=2).ravel() for g in own for o in library if o != g
                     for i, ma in enumerate(library[g][:CROSS_SEEDS])
                     for j, mb in enumerate(library[o][:CROSS_SEEDS]) if i != j]  # fmt: skip
            cd = np.concatenate(cross)
            cp, _, cdof, _ = _stats(cd, b)
            ctail = tail_matched_dof(cd, b, cp, cdof)
            p = min([cp] + [e[1] for e in fits[b] if e[0] in own])
            dof = min([ctail] + [e[2] for e in fits[b] if e[0] in own])
            family_fits[family][b] = (p, dof)
            screen = largest_distance(b, NullFit(p, dof, True), LAYER_SCREEN_FMR)
            lines.append(f"| {family} | {b} | {len(cd)} | {cp:.4f} | {ctail:.0f} | {p:.4f} | {dof:.0f} | {screen} |")
    lines.append("\nCalibration of the \"k of n layers\" rate on independent model pairs (same group), as "
                 "hashdb.matching reports it (with the suspect's family fit): the share of pairs whose rate is <= t "
                 "must not exceed t.\n")
    lines.append("| bits | model pairs | pairs with any twin | smallest rate | share <= 1e-1 | share <= 1e-2 "
                 "| share <= 1e-3 |")  # fmt: skip
    lines.append("|---|---|---|---|---|---|---|")
    for b, matrices in pair_matrices.items():
        r = np.array([pair_rate(d, b, NullFit(*(family_fits.get(f or "", {}).get(b) or conservative[b]), True))
                      for d, f in matrices])  # fmt: skip
        lines.append(f"| {b} | {len(r)} | {int((r < 1).sum())} | {r.min():.1e} | {(r <= 0.1).mean():.3f} "
                     f"| {(r <= 0.01).mean():.3f} | {(r <= 0.001).mean():.3f} |")  # fmt: skip
    text = "\n".join(lines)
    print(text)
    if args.write_null:
        table = json.loads(NULL_JSON.read_text())
        cfg = ModelHasher(top).config
        for entry in table["fits"]:
            if same_fit(entry["config"], cfg):
                entry["layers"] = {"by_bits": {str(b): {"p": round(p, 4), "dof": round(dof, 1)}
                                               for b, (p, dof) in conservative.items()},
                                   "groups": sorted(library), "seeds": args.seeds, "min_filters": 16,
                                   "families": {f: {"by_bits": {str(b): {"p": round(p, 4), "dof": round(dof, 1)}
                                                                for b, (p, dof) in fit.items()},
                                                    "groups": sorted(g for g, x in families.items() if x == f)}
                                                for f, fit in family_fits.items()}}  # fmt: skip
        NULL_JSON.write_text(json.dumps(table, indent=1) + "\n")
        print(f"wrote {NULL_JSON}")
    if not args.no_results:
        write_section("layer_null", text)


def tail_matched_dof(ds: np.ndarray, bits: int, p: float, dof: float) -> float:
    """The largest dof <= ``dof`` whose binomial tail is nowhere below the observed share of pairs at or under
    each observed distance of the lower tail: the fit must never claim a layer pair rarer than the library
    showed it (the moment fit alone put one conv1d pair in 1,000 at a "k of n" rate of 3e-5)."""
    ordered = np.sort(ds)
    lower = ordered[: max(1, len(ordered) // 10)]  # the lower tail decides; the bulk is the moment fit's
    values, counts = np.unique(lower, return_counts=True)
    share = np.cumsum(counts) / len(ordered)
    while dof > 8:
        if all(false_match_rate(int(d), bits, NullFit(p, dof, True)) >= f for d, f in zip(values, share, strict=True)):
            return dof
        dof *= 0.97
    return dof


def pair_rate(d: np.ndarray, bits: int, fit: NullFit) -> float:
    """The "k of n layers" rate hashdb.matching reports for two models with layer distance matrix ``d``."""
    radius = largest_distance(bits, fit, LAYER_SCREEN_FMR)
    twins = one_to_one([(i, str(j), int(d[i, j])) for i, j in zip(*np.nonzero(d <= radius), strict=True)])
    return partial_false_match_rate([t[2] for t in twins], d.shape[0], d.shape[1], bits, fit) if twins else 1.0


if __name__ == "__main__":
    main()
