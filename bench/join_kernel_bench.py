"""The self-join's tile kernel on one thread: nanoseconds per pair at each code length.

    python3 bench/join_kernel_bench.py          # table -> bench/RESULTS.md section join_kernel

Random codes (no pairs within the radius, so the kernel's cost is all distance arithmetic), ``--n`` of them,
``hashdb.index.join.blocked_pairs`` at about 0.3 x bits (the copy radius's share at every length), numba on one
thread, the best and the median of ``--repeats`` runs after a warm-up. bench/scale_bench.py measures the same
kernel at 1M codes on every core against the naive loop.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._results import publish  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=40_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    import numba

    from hashdb.index import join

    numba.set_num_threads(1)
    rng = np.random.default_rng(0)
    pairs = args.n * (args.n - 1) / 2
    rows = ["| bits | radius | ns per pair: best / median | pairs found |", "|---|---|---|---|"]
    for bits in (256, 512, 1024):
        codes = np.frombuffer(rng.bytes(args.n * bits // 8), np.uint64).reshape(args.n, bits // 64).copy()
        r = int(0.31 * bits)
        join.blocked_pairs(codes[:2000], r)  # compile / load the cached kernel
        times, found = [], 0
        for _ in range(args.repeats):
            t = time.perf_counter()
            a, _, _ = join.blocked_pairs(codes, r)
            times.append(time.perf_counter() - t)
            found = len(a)
        best, med = min(times) / pairs * 1e9, float(np.median(times)) / pairs * 1e9
        rows.append(f"| {bits} | {r} | {best:.2f} / {med:.2f} | {found} |")
        print(rows[-1], flush=True)
    title = "Self-join tile kernel, one thread (bench/join_kernel_bench.py)"
    publish("join_kernel", title, "bench/join_kernel_bench.py", [
        f"{args.n:,} random codes ({pairs:.2e} pairs) per length, `hashdb.index.join.blocked_pairs`, numba on one "
        f"thread, {args.repeats} runs after a warm-up.",
        "",
        *rows,
    ], write=not args.no_write)  # fmt: skip


if __name__ == "__main__":
    main()
