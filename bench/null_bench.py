"""Detection quality on the null library: independent models apart, copies close, the fitted false-match rate.

    python3 -m bench.null train                     # the library (bench/null.py), cached
    python3 bench/null_bench.py                     # tables -> bench/RESULTS.md section null
    python3 bench/null_bench.py --write-null        # also refit hashdb/codec/null.json from this run

Per architecture and width (30 seeds: 435 pairs): the mean fractional distance p of independent pairs, its sd,
Daugman's effective degrees of freedom N = p(1-p)/sd^2, the closest pair, the pairs within the copy radius and
the false-match rate per pair at the radius from that group's own binomial fit. Per copy class (a few seeds of
every group): distances to the original and the share within the radius. The previous codec (nts-dihedral-2)
is measured on the same models for comparison. One hash at the longest length gives every shorter one (codec
v3's features extend each other), so every length is measured on the same features.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import null  # noqa: E402
from bench._results import machine_line, write_section  # noqa: E402
from hashdb.codec import ModelHasher  # noqa: E402
from hashdb.codec.hasher import CHAIN_V3, CHAIN_V4, CHAIN_V5, CHAIN_V6, CODEC_VERSION, LEGACY_CODEC  # noqa: E402
from hashdb.codec.null import COPY_RADIUS_FMR, FIT_KEYS, NullFit, false_match_rate, largest_distance  # noqa: E402

NULL_JSON = Path(__file__).resolve().parent.parent / "hashdb" / "codec" / "null.json"
COPY_SEEDS = 1  # originals per group that get every copy class (training copies is the cost on 2 cores)


def _state(m: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in m.state_dict().items()}


def copy_classes(group: str) -> dict[str, Callable[[torch.nn.Module, int], torch.nn.Module]]:
    """Copy classes: (model, seed) -> the copy. Light ones are what copy_radius must catch."""
    from bench.zoo import modify

    classes: dict[str, Callable[[torch.nn.Module, int], torch.nn.Module]] = {
        "permute channels": lambda m, s: modify.permute_channels(m, 1.0, s),
        "rescale per channel": lambda m, s: modify.rescale(m, 1.0, s),
        "fp16": lambda m, s: modify.cast(m, "fp16", s),
        "int8 per tensor": lambda m, s: modify.quantize(m, 8, s),
        "noise 1%": lambda m, s: modify.gaussian_noise(m, 0.01, s),
        "noise 5%": lambda m, s: modify.gaussian_noise(m, 0.05, s),
        "prune 30%": lambda m, s: modify.prune_magnitude(m, 0.3, s),
        "prune 50%": lambda m, s: modify.prune_magnitude(m, 0.5, s),
        "fine-tune SGD 1e-3": lambda m, s: modify.finetune(m, 1e-3, s),
        "fine-tune Adam 1e-3": lambda m, s: modify.finetune(m, 1e-3, s, opt="adam"),
        "transfer 150 steps": lambda m, s: modify.transfer(m, 1e-3, s),
        "transfer 30 epochs": lambda m, s: modify.transfer(m, 1e-3, s, steps=1270),
        "filter prune 25%": lambda m, s: modify.prune_filters(m, 0.25, s),
    }
    if null.GROUPS[group].arch in ("resnet", "mobilenet", "resnet18"):
        classes["BN folding"] = lambda m, s: modify.fold_batchnorm(m, 1.0, s)
    if null.GROUPS[group].arch == "resnet18":  # training copies of an 11M-parameter net is beyond this budget
        classes = {k: v for k, v in classes.items() if "tune" not in k and "transfer" not in k}
    return classes


LIGHT = {"permute channels", "rescale per channel", "fp16", "int8 per tensor", "noise 1%", "prune 30%",
         "fine-tune SGD 1e-3", "fine-tune Adam 1e-3", "BN folding", "transfer 150 steps",
         "transfer 30 epochs"}  # fmt: skip


def cached_copy(group: str, seed: int, name: str, make: Callable[[], torch.nn.Module]) -> dict[str, np.ndarray]:
    from safetensors.torch import load_file, save_file

    path = null.CACHE / "copies" / f"{null.RECIPE}-{group}-s{seed}-{name.replace(' ', '_').replace('%', 'pc')}.st"
    if path.exists():
        return {k: v.numpy() for k, v in load_file(str(path)).items()}
    m = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
    return _state(m)


def group_stats(codes: np.ndarray, bits: int, radius: int) -> dict[str, float]:
    """Independent pairs of one group at one length: p, sd, dof, min, pairs within radius, fitted fmr."""
    ds = np.array([int(np.count_nonzero(a[:bits] != b[:bits])) for a, b in itertools.combinations(codes, 2)])
    frac = ds / bits
    p, sd = float(frac.mean()), float(frac.std(ddof=1))
    dof = p * (1 - p) / sd**2 if sd > 0 else float("inf")
    fmr = false_match_rate(radius, bits, NullFit(p, dof, True)) if np.isfinite(dof) else 0.0
    return {"pairs": len(ds), "p": p, "sd": sd, "dof": dof, "min": int(ds.min()), "within": int((ds <= radius).sum()),
            "fmr": fmr, "distances": ds}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bits", type=int, nargs="+", default=[256, 512, 768, 1024])
    ap.add_argument("--seeds", type=int, default=30)
    ap.add_argument("--groups", nargs="*", default=None)
    ap.add_argument("--no-copies", action="store_true")
    ap.add_argument("--no-legacy", action="store_true", help="skip the previous codec's rows")
    ap.add_argument("--write-null", action="store_true", help=f"refit {NULL_JSON.name} from this run")
    ap.add_argument("--no-results", action="store_true", help="print only; leave bench/RESULTS.md as it is")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    groups = [g for g in (args.groups or list(null.GROUPS)) if null.cache_path(g, 0).exists()]
    top = max(args.bits)
    codecs = [CODEC_VERSION] + ([] if args.no_legacy else [CHAIN_V6, CHAIN_V5, CHAIN_V4, CHAIN_V3, LEGACY_CODEC])
    lines = ["## Null library: independently trained models and their copies (bench/null_bench.py)\n",
             f"`python3 -m bench.null train` then `python3 bench/null_bench.py {' '.join(argv or sys.argv[1:])}`"
             f"; {machine_line()}.\n"]  # fmt: skip
    fits: dict[int, list[tuple[str, float, float]]] = {b: [] for b in args.bits}
    library: dict[str, np.ndarray] = {}  # codec v3 codes per group, at the longest length
    families: dict[str, str | None] = {}  # each group's kernel family (hasher.suspect)
    for codec in codecs:
        t0 = time.perf_counter()
        full = ModelHasher(top, codec=codec)
        radii = {b: ModelHasher(b, codec=codec).copy_radius for b in args.bits}
        rows = []
        for g in groups:
            seeds = [s for s in range(args.seeds) if null.cache_path(g, s).exists()]
            if len(seeds) < 3:
                continue
            codes = np.array([full.hash_bits(_state(null.trained(g, s))) for s in seeds])
            if codec == CODEC_VERSION:
                library[g] = codes
                families[g] = full.suspect(_state(null.trained(g, 0))).family
            for b in args.bits:
                st = group_stats(codes, b, radii[b])
                rows.append((g, b, len(seeds), st))
                if codec == CODEC_VERSION:
                    fits[b].append((g, st["p"], st["dof"]))
        hash_s = time.perf_counter() - t0
        lines.append(f"### Independent models, codec `{codec}` (hashing {hash_s:.0f} s)\n")
        lines.append("| group | bits | seeds | pairs | mean p | sd | dof (N) | dof / bits | min | within r | r "
                     "| fitted fmr at r |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for g, b, n, st in rows:
            lines.append(f"| {g} | {b} | {n} | {st['pairs']} | {st['p']:.4f} | {st['sd']:.4f} | {st['dof']:.0f} "
                         f"| {st['dof'] / b:.2f} | {st['min']} | {st['within']} | {radii[b]} "
                         f"| {st['fmr']:.1e} |")  # fmt: skip
        lines.append("")
    conservative = {}
    for b, entries in fits.items():
        if not entries:
            continue
        p = min(e[1] for e in entries)
        dof = min(e[2] for e in entries)
        conservative[b] = (p, dof)
        lines.append(f"Fitted null at {b} bits (the most conservative group: lowest p, lowest dof): p = {p:.4f}, "
                     f"dof = {dof:.0f}; copy radius (fmr <= {COPY_RADIUS_FMR:g} per pair) = "
                     f"{largest_distance(b, NullFit(p, dof, True), COPY_RADIUS_FMR)}.")  # fmt: skip
    family_fits, family_lines = fit_families(library, families, args.bits, fits)
    if not args.no_copies:
        lines += copies_table(groups, args.bits, {g: family_radii(family_fits.get(f or ""), args.bits)
                                                  for g, f in families.items()})  # fmt: skip
    lines += family_lines
    text = "\n".join(lines)
    print(text)
    if args.write_null and conservative:
        cfg = ModelHasher(top).config
        entry = {"config": {"codec": cfg["codec"], "layout": cfg["layout"], "include_linear": cfg["include_linear"],
                            **{k: cfg[k] for k in FIT_KEYS if k in cfg}},
                 "by_bits": {str(b): {"p": round(p, 4), "dof": round(dof, 1)} for b, (p, dof) in conservative.items()},
                 "groups": sorted(g for g, _, _ in fits[max(fits)]), "seeds": args.seeds,
                 "families": family_fits}  # fmt: skip
        table = json.loads(NULL_JSON.read_text()) if NULL_JSON.exists() else {"fits": []}
        for old in table["fits"]:  # the layer null (bench/layer_null.py) is fitted apart: keep it
            if old["config"] == entry["config"] and "layers" in old:
                entry["layers"] = old["layers"]
        table["fits"] = [f for f in table["fits"] if f["config"] != entry["config"]] + [entry]
        NULL_JSON.write_text(json.dumps(table, indent=1) + "\n")
        print(f"wrote {NULL_JSON}")
    if not args.no_results:
        write_section("null", text)


CROSS_SEEDS = 6  # models per group in the cross-architecture pairs


def fit_families(library: dict[str, np.ndarray], families: dict[str, str | None], bits_list: list[int],
                 fits: dict[int, list[tuple[str, float, float]]]) -> tuple[dict[str, Any], list[str]]:  # fmt: skip
    """The null of each kernel family (a suspect's hasher.suspect().family): the most conservative of its own
    groups' same-architecture pairs and of every pair between one of its models and a model of another group
    (any architecture, any family), so the fit holds whatever the stored model is. Cross pairs are of other
    seeds only: bench/null.py seeds every architecture alike, so the same seed gives two architectures the same
    initial first layer, and models grown from one initialisation are not independent (bench/layer_null.py
    measures their first layers 37-85 of 256 bits apart)."""
    out: dict[str, Any] = {}
    lines = ["", "Fits per kernel family (the suspect's; pairs with models of every other group included):", "",
             "| family | bits | groups | cross pairs | cross p | cross dof | fitted p | fitted dof | copy radius |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for family in sorted({f for f in families.values() if f is not None}):
        own = [g for g, f in families.items() if f == family]
        by_bits = {}
        for b in bits_list:
            cross = [int(np.count_nonzero(x[:b] != y[:b]))
                     for g in own for h in library if h != g
                     for i, x in enumerate(library[g][:CROSS_SEEDS])
                     for j, y in enumerate(library[h][:CROSS_SEEDS]) if i != j]  # fmt: skip
            frac = np.array(cross) / b
            cp, csd = float(frac.mean()), float(frac.std(ddof=1))
            cdof = cp * (1 - cp) / csd**2
            same = [(p, dof) for g, p, dof in fits[b] if g in own]
            p = min([cp] + [x[0] for x in same])
            dof = min([cdof] + [x[1] for x in same])
            by_bits[str(b)] = {"p": round(p, 4), "dof": round(dof, 1)}
            radius = largest_distance(b, NullFit(p, dof, True), COPY_RADIUS_FMR)
            lines.append(f"| {family} | {b} | {len(own)} | {len(cross)} | {cp:.4f} | {cdof:.0f} | {p:.4f} | {dof:.0f} "
                         f"| {radius} |")  # fmt: skip
        out[family] = {"by_bits": by_bits, "groups": sorted(own)}
    return out, lines


MILLION = 1_000_000


def _bits(code: bytes) -> np.ndarray:
    return np.unpackbits(np.frombuffer(code, np.uint8)).astype(bool)


def found_in_a_million(original: Any, suspect: Any, bits: int) -> str:
    """How a query of ``suspect`` (hasher.suspect at the longest length) finds ``original`` in a database of a
    million models at ``bits`` (codes are prefixes of the longest ones): 'whole', 'partial' or ''."""
    from hashdb.codec.null import layer_match_rates, layer_screen_radius
    from hashdb.codec.radius import decision_radius
    from hashdb.matching import one_to_one

    config = ModelHasher(bits).config
    whole = int((_bits(original.code)[:bits] != _bits(suspect.code)[:bits]).sum())
    radius = decision_radius(config, MILLION, suspect.family)
    if radius is not None and whole <= radius:
        return "whole"
    mine = [_bits(c)[:bits] for _, c in suspect.layers]
    theirs = [(name, _bits(c)[:bits]) for name, c in original.layers]
    screen = layer_screen_radius(config, suspect.family)
    hits = [(i, name, int((a != b).sum())) for i, a in enumerate(mine) for name, b in theirs]
    twins = one_to_one([x for x in hits if x[2] <= screen])
    if not twins:
        return ""
    rates = layer_match_rates(config, [t[2] for t in twins], len(mine), len(theirs), MILLION, suspect.family)
    return "partial" if rates is not None and rates.verdict == "copy" else ""


def family_radii(fit: dict[str, Any] | None, bits_list: list[int]) -> dict[int, int] | None:
    """The copy radius (fmr <= 1e-12 per pair) of each length under one family's fit (None: no family fit)."""
    if fit is None:
        return None
    return {b: largest_distance(b, NullFit(fit["by_bits"][str(b)]["p"], fit["by_bits"][str(b)]["dof"], True),
                                COPY_RADIUS_FMR) for b in bits_list}  # fmt: skip


def copies_table(groups: list[str], bits_list: list[int], own: dict[str, dict[int, int] | None]) -> list[str]:
    """Copies against their originals: within the codec's radius (the conservative null) and within the radius
    of the suspect's kernel family (``own``: per group, None where no family fit applies)."""
    top = max(bits_list)
    h = ModelHasher(top)
    radii = {b: ModelHasher(b).copy_radius for b in bits_list}
    dists: dict[str, list[np.ndarray]] = {}
    within_own: dict[str, list[list[bool]]] = {}
    found: dict[str, list[list[str]]] = {}  # per copy and length: "whole", "partial" or ""
    for g in groups:
        for seed in range(COPY_SEEDS):
            if not null.cache_path(g, seed).exists():
                continue
            orig = null.trained(g, seed)
            original = h.suspect(_state(orig))
            code = _bits(original.code)
            for name, fn in copy_classes(g).items():
                sd = cached_copy(g, seed, name, lambda fn=fn, orig=orig, seed=seed: fn(orig, 100 + seed))
                suspect = h.suspect(sd)
                d = _bits(suspect.code) != code
                dists.setdefault(name, []).append(d)
                r_own = own.get(g) or radii
                within_own.setdefault(name, []).append([int(d[:b].sum()) <= r_own[b] for b in bits_list])
                found.setdefault(name, []).append([found_in_a_million(original, suspect, b) for b in bits_list])
    fam = next((r for r in own.values() if r), None)
    out = ["### Copies against their originals (codec default)\n",
           "Within r: the radius of the conservative null (every suspect); within own r: the radius of the "
           "suspect's kernel family (2-D models: " + (", ".join(f"{fam[b]}" for b in bits_list) if fam else "-")
           + " bits; others the conservative one), what a query of a model file uses.\n",
           "Found in 1M: the share a query finds as a copy (verdict `copy`) in a database of 1,000,000 models, by "
           "its whole code (the family's decision radius for 1M codes) or, failing that, as a partial copy (two "
           "or more layer twins with expected_false <= 0.01, hashdb.matching's rule), with how many by layers.\n",
           "| copy class | light | copies | "
           + " | ".join(f"{b} bits: median / max / within r={radii[b]} / within own r / found in 1M (by layers)"
                        for b in bits_list) + " |",
           "|---|---|---|" + "---|" * len(bits_list)]  # fmt: skip
    for name, ds in dists.items():
        cells = []
        for i, b in enumerate(bits_list):
            d = np.array([int(x[:b].sum()) for x in ds])
            share_own = np.mean([w[i] for w in within_own[name]])
            how = [f[i] for f in found[name]]
            hit = np.mean([x != "" for x in how])
            cells.append(f"{int(np.median(d))} / {d.max()} / {np.mean(d <= radii[b]):.2f} / {share_own:.2f} "
                         f"/ {hit:.2f} ({how.count('partial')})")  # fmt: skip
        out.append(f"| {name} | {'yes' if name in LIGHT else 'no'} | {len(ds)} | " + " | ".join(cells) + " |")
    out.append("")
    return out


if __name__ == "__main__":
    main()
