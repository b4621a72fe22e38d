"""``python -m bench.zoo [--n-min N] [--cache DIR] [--threads T]``: build (train or load) the full library."""

from __future__ import annotations

import argparse
import time

from . import DEFAULT_CACHE, accuracy, build_library, n_params


def main() -> None:
    ap = argparse.ArgumentParser(description="Build the bench.zoo model library (trains what the cache lacks)")
    ap.add_argument("--n-min", type=int, default=3565)
    ap.add_argument("--cache", default=str(DEFAULT_CACHE))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    t = time.perf_counter()
    lib = build_library(args.n_min, cache_dir=args.cache, threads=args.threads, verbose=True)
    print(f"{len(lib)} entries in {time.perf_counter() - t:.1f} s: {lib.counts()}")
    for o in lib.originals:
        print(f"  {o.key:28s} params={n_params(lib.model(o)):>9,d} acc={accuracy(lib.model(o), o.data):.3f}")


if __name__ == "__main__":
    main()
