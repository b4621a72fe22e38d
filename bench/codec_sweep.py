"""Tune the codec on the zoo: cache pre-binarization features per entry, then sweep encodings cheaply.

    nice -n 10 python3 bench/codec_sweep.py features --prune 0.3 0.5 0.7      # one materialization pass
    nice -n 10 python3 bench/codec_sweep.py sweep                             # encodings x bits x radius

The feature pass materializes every library entry once (bench.zoo) and, for each self-pruning rate, stores
the normal test statistics of the kernel pools along 1024 fixed directions, raw and whitened, for every
feature. Every ModelHasher setting that differs only in directions/features/encoding/bits is a cheap
function of these arrays, so the sweep evaluates it with bench/codec_bench.metrics without re-hashing.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

J_MAX = 1024
ALL_FEATURES = ("skew", "kurt")
FEAT_DIR = Path("/tmp/codec_sweep")


def available_entries(lib: Any) -> list[Any]:
    """Entries whose trained parts are already in the zoo cache (never train here: the zoo owner does)."""
    return [e for e in lib.entries if lib.is_cached(e)]


def sweep_hasher(prune: float, max_kernels: int = 1 << 17, mode: str = "relative") -> Any:
    """The ModelHasher whose pools and J_MAX directions the feature pass uses (2048 bits = 1024 directions)."""
    from hashdb.codec import ModelHasher

    return ModelHasher(2 * J_MAX, prune=prune, prune_rule=mode, max_kernels=max_kernels, features=ALL_FEATURES)


def entry_features(
    sd: dict[str, np.ndarray], prune: float, max_kernels: int = 1 << 17, mode: str = "relative"
) -> dict[str, np.ndarray]:
    """Per variant ('base', 'sym' = symmetry-moved directions; '_w' = whitened) a (J_MAX, 2) array of
    Stouffer-combined (skew z, kurt z). The pools are ModelHasher.pools and the pool selection is the codec's
    own (nts.usable_pools), so 'base' - 'sym' is ModelHasher.features (compute_features checks it)."""
    from hashdb.codec.nts import pool_direction_features, usable_pools

    pools = usable_pools(sweep_hasher(prune, max_kernels, mode).pools(sd))
    out = {v: np.zeros((J_MAX, 2)) for v in VARIANTS}
    wsum = 0.0
    for kshape, blocks in pools:
        for white in (False, True):
            w, base, moved = pool_direction_features(kshape, blocks, J_MAX, ALL_FEATURES, white)
            sfx = "_w" if white else ""
            out["base" + sfx] += w * base
            out["sym" + sfx] += w * (moved if moved is not None else 0.0)
        wsum += w * w
    return {k: (v / np.sqrt(wsum)).astype(np.float32) for k, v in out.items()}


VARIANTS = ("base", "sym", "base_w", "sym_w")


def compute_features(
    prunes: list[float], limit: int | None, mode: str = "relative", max_kernels: int = 1 << 17, skip: str = ""
) -> None:
    import torch

    from bench import zoo

    torch.set_num_threads(1)
    lib = zoo.Library(zoo.library_plan(), zoo.DEFAULT_CACHE)
    entries = available_entries(lib)
    if skip:
        entries = [e for e in entries if e.arch not in skip.split(",")]
    if limit:
        entries = entries[:limit]
    print(f"{len(entries)} of {len(lib.entries)} entries available", flush=True)
    FEAT_DIR.mkdir(parents=True, exist_ok=True)
    feats = {p: {v: [] for v in VARIANTS} for p in prunes}
    keys, ok = [], []
    t0 = time.perf_counter()
    for i, e in enumerate(entries):
        sd = lib.arrays(e)
        keys.append(e.key)
        good = True
        for p in prunes:
            try:
                f = entry_features(sd, p, max_kernels, mode)
                if i == 0:  # the sweep evaluates exactly what the codec binarizes
                    codec = sweep_hasher(p, max_kernels, mode).features(sd)
                    np.testing.assert_allclose(f["base"] - f["sym"], codec, rtol=1e-5, atol=1e-5)
            except Exception as exc:  # noqa: BLE001 - a failed hash is a measured miss
                print(f"  {e.key}: {type(exc).__name__}: {exc}")
                f, good = {v: np.full((J_MAX, 2), np.nan, np.float32) for v in VARIANTS}, False
            for v in VARIANTS:
                feats[p][v].append(f[v])
        ok.append(good)
        if i % 200 == 0:
            print(f"  [{time.perf_counter() - t0:7.1f} s] {i + 1}/{len(entries)}", flush=True)
    tag = ("" if mode == "relative" else f"-{mode}") + ("" if max_kernels == 1 << 17 else f"-cap{max_kernels}")
    tag += f"-skip{skip.replace(',', '+')}" if skip else ""
    for p in prunes:
        np.savez(
            FEAT_DIR / f"prune{p:g}{tag}.npz",
            keys=np.array(keys),
            ok=np.array(ok),
            **{v: np.array(feats[p][v]) for v in VARIANTS},
        )
    print(f"done in {time.perf_counter() - t0:.0f} s")


def codes_from(z: Any, variant: str, bits: int, features: tuple[str, ...]) -> np.ndarray:
    """Codes (N, bits) from cached features: variant 'base' (odd_sign on r_j), 'dihedral' (r_j minus the
    symmetry-moved r_j, sign), with a '_w' suffix for whitened directions."""
    from hashdb.codec.encode import encode

    white = "_w" if variant.endswith("_w") else ""
    cols = [ALL_FEATURES.index(x) for x in features]
    j = -(-bits // len(features))
    f = z["base" + white][:, :j][:, :, cols].astype(np.float64)
    if variant.startswith("dihedral"):
        f = f - z["sym" + white][:, :j][:, :, cols]
        enc = "sign"
    else:
        enc = "odd_sign"
    out = np.zeros((len(f), bits), bool)
    for i in range(len(f)):
        if np.isfinite(f[i]).all():
            out[i] = encode(f[i], bits, enc, features)
    return out


def load_library_subset(keys: np.ndarray) -> Any:
    from bench import zoo

    lib = zoo.Library(zoo.library_plan(), zoo.DEFAULT_CACHE)
    want = set(keys.tolist())
    sub = zoo.Library([e for e in lib.entries if e.key in want], lib.cache_dir)
    order = {k: i for i, k in enumerate(keys.tolist())}
    sub.entries.sort(key=lambda e: order[e.key])
    return sub


def run_metrics(codes: np.ndarray, ok: np.ndarray, lib: Any, radius: int) -> dict[str, Any]:
    from bench.codec_bench import HashRun, metrics

    n, bits = codes.shape
    run = HashRun("sweep", bits, radius, codes, ok, np.zeros(n), np.zeros(n))
    return metrics(run, lib, radius)


def sweep(args: argparse.Namespace) -> None:
    for path in sorted(FEAT_DIR.glob(args.glob)):
        z = dict(np.load(path))
        lib = load_library_subset(z["keys"])
        for variant in args.variants:
            for features in [("skew", "kurt"), ("skew",), ("kurt",)]:
                for bits in args.bits:
                    codes = codes_from(z, variant, bits, features)
                    m = run_metrics(codes, z["ok"], lib, int(round(args.radius_fraction * bits)))
                    print(
                        f"{path.stem:9s} {variant:10s} {'+'.join(features):10s} {bits:5d} | r={m['radius']:4d} "
                        f"R={m['recall_light']:.4f} P={m['precision_light']:.4f} mAP={m['mAP']:.4f} "
                        f"mAPl={m['mAP_light']:.4f} AUC={m['auc_light']:.4f} best r={m['best_radius']} "
                        f"({m['best_radius_precision']:.3f}/{m['best_radius_recall']:.3f}) "
                        f"distinct p1={m['distinct_pair_distances']['p1']:.0f} "
                        f"min={m['distinct_pair_distances']['min']:.0f} "
                        f"med={m['distinct_pair_distances']['median']:.0f}",
                        flush=True,
                    )
                    if args.classes:
                        pc = m["per_class"]
                        print(
                            "    "
                            + "  ".join(
                                f"{k}:{v['median']:.0f}/{v['p95']:.0f}/{v['max']:.0f}/{v['recall']:.2f}"
                                for k, v in sorted(pc.items())
                                if "|" not in k
                            )
                        )


def report(args: argparse.Namespace) -> None:
    """Codec v2's ModelHasher (dihedral, skew+kurt) on cached features of ``--file``: metrics per code
    length at ModelHasher's copy_radius, and distance per modification class at ``--detail-bits``."""
    from bench._results import machine_line, write_section
    from hashdb.codec.hasher import radius_fraction_for

    z = dict(np.load(FEAT_DIR / args.file))
    lib = load_library_subset(z["keys"])
    lines = [
        "## Codec sweep: codec v2 (`nts-dihedral-2`, no longer the default) on the zoo, per code length",
        "",
        f"`python3 bench/codec_sweep.py features --prune 0.5` then `python3 bench/codec_sweep.py report "
        f"{' '.join(sys.argv[2:])}`",
        "",
        machine_line() + f"; {len(lib.entries)} library models (bench/zoo/), definitions of bench/codec_bench.py",
        "",
        "| bits | copy_radius | recall light | precision light | mAP | mAP light | AUC light | best r (P/R) | "
        "distinct p1 / median | min distinct (original pairs) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    detail = None
    for bits in args.bits:
        codes = codes_from(z, "dihedral", bits, ("skew", "kurt"))
        m = run_metrics(codes, z["ok"], lib, int(round(radius_fraction_for(bits) * bits)))
        dd = m["distinct_pair_distances"]
        lines.append(
            f"| {bits} | {m['radius']} | {m['recall_light']:.4f} | {m['precision_light']:.4f} | {m['mAP']:.4f} | "
            f"{m['mAP_light']:.4f} | {m['auc_light']:.4f} | {m['best_radius']} ({m['best_radius_precision']:.4f}/"
            f"{m['best_radius_recall']:.4f}) | {dd['p1']:.0f} / {dd['median']:.0f} | {dd['min']:.0f} "
            f"({m['min_distance_distinct_originals']}) |"
        )
        if bits == args.detail_bits:
            detail = m
    if detail is not None:
        from bench.codec_bench import class_table

        lines += ["", f"### Distance to the original per class at {args.detail_bits} bits", "", class_table(detail)]
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section("codec_sweep", text)


def speed(args: argparse.Namespace) -> None:
    """Single-thread hashing time of each codec on the same models (weights already in memory as numpy),
    interleaved run by run so the shared machine's load falls on all of them alike; medians."""
    import torch

    from bench._results import machine_line, write_section
    from bench.codec_bench import mobilenet_v2_state_dict, resnet50_state_dict
    from hashdb.codec import ModelHasher
    from hashdb.codec.hasher import CODECS

    torch.set_num_threads(1)
    models = {
        "ResNet-50 shapes, random": {k: v.numpy() for k, v in resnet50_state_dict().items()},
        "MobileNetV2 shapes, random": {k: v.numpy() for k, v in mobilenet_v2_state_dict().items()},
    }
    try:
        from bench import null

        if null.cache_path("resnet18", 0).exists():
            net = null.trained("resnet18", 0)
            models["ResNet-18, trained (null library)"] = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    except ImportError:
        pass
    from hashdb import DEFAULT_BITS

    args.bits = args.bits or DEFAULT_BITS
    # the budget's reference: codec v2 at its own default length, 256 bits (what hashing cost before codec v3)
    hashers = {f"{codec}, {args.bits} bits": ModelHasher(args.bits, codec=codec) for codec in CODECS}
    reference = f"{CODECS[-1]}, 256 bits"
    hashers.setdefault(reference, ModelHasher(256, codec=CODECS[-1]))
    rows = []
    for name, sd in models.items():
        n = sum(v.size for v in sd.values())
        times: dict[str, list[float]] = {c: [] for c in hashers}
        for h in hashers.values():
            h.hash(sd)  # warm-up
        for _ in range(args.repeats):
            for codec, h in hashers.items():
                t = time.perf_counter()
                h.hash(sd)
                times[codec].append(time.perf_counter() - t)
        med = {c: float(np.median(v)) for c, v in times.items()}
        low = {c: float(np.min(v)) for c, v in times.items()}  # the machine's noise only ever adds time
        base, low_base = med[reference], low[reference]
        rows += [
            f"| {name} | {n / 1e6:.1f}M | {c} | {med[c]:.3f} | {med[c] / base:.2f} | {low[c]:.3f} "
            f"| {low[c] / low_base:.2f} |"
            for c in hashers
        ]
    cmd = "python3 bench/codec_sweep.py speed " + " ".join(sys.argv[2:])
    text = "\n".join(
        [
            "## Codec speed: hashing one model on one thread, per codec",
            "",
            f"`{cmd.strip()}`",
            "",
            machine_line() + f"; one thread; median and fastest of {args.repeats} after a warm-up, codecs interleaved "
            f"run by run; load average at start {os.getloadavg()[0]:.1f} (the machine is shared, so these are upper "
            "bounds; its noise only adds time, so the fastest run is the least disturbed)",
            "",
            f"Weights in memory as numpy; the ratio is to {reference} (the codec and length the hashing-time budget "
            "of codec v3+ is measured against: 1.5x).",
            "",
            "| model | parameters | codec | median s | x v2 at 256 bits | fastest s | fastest, x v2 at 256 bits |",
            "|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    print(text)
    if args.write:
        write_section("codec_speed", text)


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("features")
    f.add_argument("--prune", type=float, nargs="+", default=[0.5])
    f.add_argument("--limit", type=int, default=None)
    f.add_argument("--mode", default="relative", choices=["quantile", "relative"])
    f.add_argument("--max-kernels", type=int, default=1 << 17)
    f.add_argument("--skip", default="", help="comma-separated architectures to leave out")
    s = sub.add_parser("sweep")
    s.add_argument("--bits", type=int, nargs="+", default=[256])
    s.add_argument("--radius-fraction", type=float, default=0.18)
    s.add_argument("--classes", action="store_true")
    s.add_argument("--glob", default="prune*.npz")
    s.add_argument("--variants", nargs="+", default=["base", "dihedral", "base_w", "dihedral_w"])
    rp = sub.add_parser("report")
    rp.add_argument("--file", default="prune0.5.npz")
    rp.add_argument("--bits", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048])
    rp.add_argument("--detail-bits", type=int, default=256)
    rp.add_argument("--write", action="store_true", help="write the 'codec_sweep' section of bench/RESULTS.md")
    sp = sub.add_parser("speed")
    sp.add_argument("--bits", type=int, default=None, help="code length (default: hashdb.DEFAULT_BITS)")
    sp.add_argument("--repeats", type=int, default=5)
    sp.add_argument("--write", action="store_true", help="write the 'codec_speed' section of bench/RESULTS.md")
    args = ap.parse_args()
    if args.cmd == "features":
        compute_features(args.prune, args.limit, args.mode, args.max_kernels, args.skip)
    elif args.cmd == "report":
        report(args)
    elif args.cmd == "speed":
        speed(args)
    else:
        sweep(args)


if __name__ == "__main__":
    main()
