"""The codec's trade-off: independence of independent models against closeness of copies, per setting.

    python3 -m bench.null train                     # the null library and its copies (bench/null.py), cached
    python3 bench/codec_tradeoff.py                 # table -> bench/RESULTS.md section codec_tradeoff

For each (descriptor dimension, Fourier frequency omega, depth decay, soft threshold shrink, channel importance
power) of the default codec (one varied at a time), on the whole null library: the
most conservative group's p and dof (what the shipped fit would be), the copy radius they give (fmr <= 1e-12 per
pair), the 2-D family's decision radius for a database of 1M models, and the share of copies whose whole code
falls within their family's 1M decision radius (all light classes together; transfer after 30 epochs and 30 %
magnitude pruning apart, the hardest light ones; 50 % magnitude and 25 % filter pruning, not light), and the
hashing time of a ResNet-50-shaped model. Higher
omega or dimension or lower decay: more independent bits; the other way: copies closer (decay weighs a layer's
sketch by (1 + depth)^-decay: deep layers carry every earlier layer's change, so transfer learning moves them
most; a higher shrink, the soft threshold as a multiple of each balanced layer's RMS weight, makes magnitude-pruned
copies closer and fine-tuned ones further; a higher importance power weighs each channel more by its importance
to the function, so filter-pruned copies come closer, at some cost in independence). Layer twins (partial
matches) are not counted
here: bench/null_bench.py's "found in 1M" column counts both for the shipped setting.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import null  # noqa: E402
from bench._results import machine_line, write_section  # noqa: E402
from bench.codec_bench import time_big  # noqa: E402
from bench.null_bench import LIGHT, _state, cached_copy, copy_classes, fit_families, group_stats  # noqa: E402
from hashdb.codec import ModelHasher  # noqa: E402
from hashdb.codec.hasher import CHAIN_DEFAULTS, CODEC_VERSION  # noqa: E402
from hashdb.codec.null import COPY_RADIUS_FMR, NullFit, largest_distance  # noqa: E402

MILLION_FMR = 0.01 / 1_000_000  # the per-pair rate a 'copy' verdict needs in a database of 1M codes


def measure(dim: int, omega: float, decay: float, shrink: float, importance: float, bits_list: list[int],
            library: dict[str, list[dict[str, np.ndarray]]], copies: dict[tuple[str, str], dict[str, np.ndarray]],
            repeats: int) -> dict[str, Any]:  # fmt: skip
    """One setting's row: the fits as bench/null_bench.py makes them (group_stats, fit_families), copies found."""
    top = max(bits_list)
    h = ModelHasher(top, dim=dim, omega=omega, decay=decay, shrink=shrink, importance=importance)
    codes = {g: np.array([h.hash_bits(sd) for sd in sds]) for g, sds in library.items()}
    family = {g: h.suspect(sds[0]).family for g, sds in library.items()}
    copy_codes = {key: h.hash_bits(sd) for key, sd in copies.items()}  # one hash at the longest length
    fits = {b: [(g, st["p"], st["dof"]) for g, st in ((g, group_stats(c, b, 0)) for g, c in codes.items())]
            for b in bits_list}  # fmt: skip
    family_fits, _ = fit_families(codes, family, bits_list, fits)
    out: dict[str, Any] = {"dim": dim, "omega": omega, "decay": decay, "shrink": shrink, "importance": importance}
    for b in bits_list:
        cons = NullFit(min(p for _, p, _ in fits[b]), min(d for _, _, d in fits[b]), True)
        two = family_fits["2d"]["by_bits"][str(b)]
        fit2 = NullFit(two["p"], two["dof"], True)
        found: dict[str, list[bool]] = {}
        for (g, name), c in copy_codes.items():
            d = int(np.count_nonzero(c[:b] != codes[g][0][:b]))
            radius = largest_distance(b, fit2 if family[g] == "2d" else cons, MILLION_FMR)
            found.setdefault(name, []).append(d <= radius)
        light = [x for name, xs in found.items() if name in LIGHT for x in xs]
        out[b] = {"p": cons.p, "dof": cons.dof / b, "radius": largest_distance(b, cons, COPY_RADIUS_FMR),
                  "radius_2d_1m": largest_distance(b, fit2, MILLION_FMR), "light": float(np.mean(light)),
                  "transfer": float(np.mean(found.get("transfer 30 epochs", [0]))),
                  "prune": float(np.mean(found.get("prune 30%", [0]))),
                  "prune50": float(np.mean(found.get("prune 50%", [0]))),
                  "filters": float(np.mean(found.get("filter prune 25%", [0])))}  # fmt: skip
    hasher = ModelHasher(256, dim=dim, omega=omega, decay=decay, shrink=shrink, importance=importance)
    out["seconds"] = time_big(hasher, repeats)["seconds"]
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bits", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--dims", type=int, nargs="+", default=[32, 64, 96, 128])
    ap.add_argument("--omegas", type=float, nargs="+", default=[1.0, 2.0, 3.0])
    ap.add_argument("--decays", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    ap.add_argument("--shrinks", type=float, nargs="+", default=[0.0, 0.35, 0.6, 0.9])
    ap.add_argument("--importances", type=float, nargs="+", default=[0.0, 0.5, 0.75, 1.0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-results", action="store_true", help="print only; leave bench/RESULTS.md as it is")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    library = {g: [_state(null.trained(g, s)) for s in range(30) if null.cache_path(g, s).exists()]
               for g in null.GROUPS}  # fmt: skip
    library = {g: sds for g, sds in library.items() if len(sds) >= 3}
    copies = {}
    for g in library:
        for name in copy_classes(g):
            path = null.CACHE / "copies" / f"{null.RECIPE}-{g}-s0-{name.replace(' ', '_').replace('%', 'pc')}.st"
            if path.exists():
                copies[(g, name)] = cached_copy(g, 0, name, lambda: None)  # type: ignore[arg-type,return-value]
    default = CHAIN_DEFAULTS[CODEC_VERSION]
    shipped = (default["dim"], default["omega"], default["decay"], default["shrink"], default["importance"])
    settings = [(d, *shipped[1:]) for d in args.dims]
    settings += [(shipped[0], o, *shipped[2:]) for o in args.omegas if o != shipped[1]]
    settings += [(*shipped[:2], c, *shipped[3:]) for c in args.decays if c != shipped[2]]
    settings += [(*shipped[:3], t, shipped[4]) for t in args.shrinks if t != shipped[3]]
    settings += [(*shipped[:4], i) for i in args.importances if i != shipped[4]]
    rows = []
    for dim, omega, decay, shrink, importance in settings:
        r = measure(dim, omega, decay, shrink, importance, args.bits, library, copies, args.repeats)
        mark = " (shipped)" if (dim, omega, decay, shrink, importance) == shipped else ""
        cells = [f"{r[b]['p']:.4f} / {r[b]['dof']:.2f} / {r[b]['radius']} / {r[b]['radius_2d_1m']} / "
                 f"{r[b]['light']:.2f} / {r[b]['transfer']:.2f} / {r[b]['prune']:.2f} / {r[b]['prune50']:.2f} / "
                 f"{r[b]['filters']:.2f}" for b in args.bits]  # fmt: skip
        rows.append(f"| {dim} | {omega:g} | {decay:g} | {shrink:g} | {importance:g}{mark} | " + " | ".join(cells)
                    + f" | {r['seconds']:.3f} |")  # fmt: skip
        print(rows[-1], flush=True)
    n_copies = len(copies)
    text = "\n".join([
        "## Codec trade-off: independent bits against close copies, per setting (bench/codec_tradeoff.py)",
        "",
        f"`python3 bench/codec_tradeoff.py {' '.join(argv or sys.argv[1:])}`; {machine_line()}.",
        "",
        f"Codec {CODEC_VERSION}, null library ({sum(len(v) for v in library.values())} models, {len(library)} groups) "
        f"and {n_copies} copies of one model per group. Per length: conservative p / dof per bit / copy radius "
        "(fmr <= 1e-12) / 2-D family's decision radius for 1M codes / share of light copies within their family's "
        "1M radius (whole code) / transfer 30 epochs / prune 30 % / prune 50 % (not light) / filter prune 25 % (not "
        "light). Targets: p >= 0.48, dof >= 0.75 x bits. `shrink`: the soft threshold, a multiple of each balanced "
        "layer's RMS weight; 0 is codec v4 (chain-sketch-4) at these settings. `importance`: the power of each "
        "channel's importance to the function (codec v7); 0 is codec v6 (chain-sketch-6) at these settings. Last "
        "column: seconds to hash the ResNet-50-shaped model (25.6M parameters, one thread, median).",
        "",
        "| dim | omega | decay | shrink | importance | " + " | ".join(f"{b} bits" for b in args.bits) + " | seconds |",
        "|---|---|---|---|---|" + "---|" * len(args.bits) + "---|",
        *rows,
    ])  # fmt: skip
    print(text)
    if not args.no_results:
        write_section("codec_tradeoff", text)


if __name__ == "__main__":
    main()
