"""HashDB storage speed: insert_many throughput and reopen time (open + read every code + build the index +
first query), against raw LMDB doing only the codes-table part of the same work, in the same run.

    nice -n 10 python3 bench/db_bench.py                 # 1M codes of 256 bits, 3 repeats
    nice -n 10 python3 bench/db_bench.py --n 10000000 --repeats 1
    python3 bench/db_bench.py --n 100000 --no-write       # quick look, RESULTS.md untouched

Writes the "db" section of bench/RESULTS.md (one table per N; a run with several --n writes them all).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._results import machine_line, write_section  # noqa: E402


def make_data(n: int, bits: int, seed: int) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, size=(n, bits // 8), dtype=np.uint8)
    # Shuffled keys: insert order is not key order, as with real model names.
    keys = [f"model-{i:010d}" for i in rng.permutation(n)]
    return keys, codes


def bench_insert(path: str, keys: list[str], codes: np.ndarray, chunk: int) -> float:
    from hashdb import HashDB

    shutil.rmtree(path, ignore_errors=True)
    t0 = time.perf_counter()
    with HashDB(path, bits=codes.shape[1] * 8) as db:
        for start in range(0, len(keys), chunk):
            db.insert_many(keys[start : start + chunk], codes[start : start + chunk])
    return time.perf_counter() - t0


def bench_raw_lmdb_insert(path: str, keys: list[str], codes: np.ndarray, chunk: int) -> float:
    """The floor: one table key -> code, sorted putmulti per chunk, no validation, ids, log or index."""
    import lmdb

    shutil.rmtree(path, ignore_errors=True)
    t0 = time.perf_counter()
    env = lmdb.open(path, map_size=1 << 36, max_dbs=2)
    table = env.open_db(b"codes")
    for start in range(0, len(keys), chunk):
        kb = [k.encode() for k in keys[start : start + chunk]]
        order = sorted(range(len(kb)), key=kb.__getitem__)
        rows = codes[start : start + chunk]
        with env.begin(write=True) as txn:
            txn.cursor(db=table).putmulti((kb[i], rows[i].tobytes()) for i in order)
    env.close()
    return time.perf_counter() - t0


_REOPEN = r"""
import json, sys, time
t0 = time.perf_counter()
from hashdb import HashDB
path, probe = sys.argv[1], bytes.fromhex(sys.argv[2])
t1 = time.perf_counter()
db = HashDB(path)
hit = db.knn(probe, 1)  # first query: reads every code, builds the index, loads numba's cached kernels
t2 = time.perf_counter()
index_mb = db.stats()["index_bytes"] / 2**20
db.close()
# The same again, split into its two parts (numba now loaded).
import numpy as np
from hashdb.index import MemoryIndex
t3 = time.perf_counter()
db = HashDB(path)
with db._store.read() as txn:
    ids, codes = db._store.load_all(txn)
t4 = time.perf_counter()
index = MemoryIndex(db.bits)
index.bulk_load(ids, codes)
index.knn(np.frombuffer(probe, "<u8").astype(np.uint64), 1)
t5 = time.perf_counter()
db.close()
print(json.dumps({"import": t1 - t0, "reopen": t2 - t1, "read": t4 - t3, "build": t5 - t4, "hit": hit[0][1],
                  "index_mb": index_mb}))
"""


def bench_reopen(path: str, probe: bytes) -> dict[str, float]:
    """In a fresh process (numba's on-disk cache warm, LMDB pages in the OS cache as after any restart)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", _REOPEN, path, probe.hex()], capture_output=True, text=True,
                         env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_raw_lmdb_read(path: str) -> float:
    import lmdb

    t0 = time.perf_counter()
    env = lmdb.open(path, readonly=True, max_dbs=2)
    table = env.open_db(b"codes", create=False)
    with env.begin() as txn:
        raw = b"".join(txn.cursor(db=table).iternext(keys=False))
    np.frombuffer(raw, "<u8")
    env.close()
    return time.perf_counter() - t0


def bench_single_inserts(path: str, count: int, durable: bool) -> float:
    from hashdb import HashDB

    shutil.rmtree(path, ignore_errors=True)
    rng = np.random.default_rng(1)
    with HashDB(path, bits=256, durable=durable) as db:
        t0 = time.perf_counter()
        for i in range(count):
            db.insert(f"single-{i}", rng.integers(0, 256, 32, dtype=np.uint8))
        return time.perf_counter() - t0


def bench_replay(path: str, n: int, rounds: int) -> dict[str, float]:
    """Query latency at rest, after a write through another handle (log replay), and after our own write."""
    from hashdb import HashDB

    shutil.rmtree(path, ignore_errors=True)
    keys, codes = make_data(n, 256, seed=n)
    # Two handles in one process have separate indexes and meet only through the log, as two processes do.
    ours = HashDB(path, bits=256, durable=False)
    ours.insert_many(keys, codes)
    other = HashDB(path)
    probe = codes[5].tobytes()
    ours.radius(probe, 8)
    times: dict[str, list[float]] = {"at rest": [], "after another handle's insert": [], "after our own insert": []}
    for i in range(rounds):
        for tag, (label, write) in enumerate((("at rest", None), ("after another handle's insert", other),
                                              ("after our own insert", ours))):
            if write is not None:
                write.insert(f"new-{tag}-{i}", codes[i])
            t0 = time.perf_counter()
            ours.radius(probe, 8)
            times[label].append(time.perf_counter() - t0)
    other.close()
    ours.close()
    shutil.rmtree(path, ignore_errors=True)
    return {label: statistics.median(v) for label, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[1_000_000])
    ap.add_argument("--bits", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=100_000, help="records per insert_many call")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="scratch directory (default: a temp dir, removed after)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    ap.add_argument("--replay", action="store_true",
                    help="only measure query latency after writes by another handle (section db-replay)")
    args = ap.parse_args()
    if args.replay:
        main_replay(args)
        return

    scratch = args.dir or tempfile.mkdtemp(prefix="hashdb-dbbench-")
    os.makedirs(scratch, exist_ok=True)
    sections = [f"`{shlex.join(['python3', 'bench/db_bench.py', *sys.argv[1:]])}`", "", machine_line(), ""]
    try:
        for n in args.n:
            keys, codes = make_data(n, args.bits, seed=n)
            hp, raw = os.path.join(scratch, "hashdb"), os.path.join(scratch, "raw")
            reps = args.repeats if n <= 2_000_000 else 1  # a 10M round takes minutes on 2 cores
            ins = [bench_insert(hp, keys, codes, args.chunk) for _ in range(reps)]
            raw_ins = [bench_raw_lmdb_insert(raw, keys, codes, args.chunk) for _ in range(reps)]
            one = [bench_insert(hp, keys, codes, n) for _ in range(reps)]
            reopen = [bench_reopen(hp, codes[n // 3].tobytes()) for _ in range(max(reps, 2))]
            raw_read = [bench_raw_lmdb_read(raw) for _ in range(max(reps, 2))]
            assert all(r["hit"] == 0 for r in reopen)
            size = sum(f.stat().st_size for f in Path(hp).iterdir()) / 2**20
            med = statistics.median
            t_ins, t_one, t_raw = med(ins), med(one), med(raw_ins)
            rows = [
                (f"insert_many, chunks of {args.chunk:,}", f"{t_ins:.2f} s", f"{n / t_ins:,.0f} codes/s",
                 f"{t_ins / t_raw:.2f}x raw"),
                (f"insert_many, one call of {n:,}", f"{t_one:.2f} s", f"{n / t_one:,.0f} codes/s",
                 f"{t_one / t_raw:.2f}x raw"),
                ("raw LMDB putmulti, codes table only", f"{t_raw:.2f} s", f"{n / t_raw:,.0f} codes/s", "1.00x"),
                ("reopen in a fresh process: open + first knn", f"{med(r['reopen'] for r in reopen):.2f} s", "", ""),
                ("  of which: read all ids and codes", f"{med(r['read'] for r in reopen):.2f} s", "",
                 f"{med(r['read'] for r in reopen) / med(raw_read):.2f}x raw"),
                ("  of which: build index + knn (warm)", f"{med(r['build'] for r in reopen):.2f} s", "", ""),
                ("raw LMDB: read the codes table", f"{med(raw_read):.2f} s", "", "1.00x"),
                ("before that: import hashdb", f"{med(r['import'] for r in reopen):.2f} s", "", ""),
            ]
            table = [f"**N = {n:,} codes of {args.bits} bits** (median of {reps}, reopen of {max(reps, 2)}; database "
                     f"{size:,.0f} MiB on disk, index {reopen[0]['index_mb']:,.0f} MiB in memory)", "",
                     "| step | time | rate | vs peer |", "|---|---:|---:|---:|"]
            table += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
            print("\n".join(table), flush=True)
            sections += table + [""]
            del keys, codes
            shutil.rmtree(raw, ignore_errors=True)
        singles = 300
        t_sync = bench_single_inserts(os.path.join(scratch, "single"), singles, durable=True)
        t_nosync = bench_single_inserts(os.path.join(scratch, "single"), singles * 10, durable=False)
        line = (f"Single `insert()` calls, one transaction each: {singles / t_sync:,.0f} per second durable "
                f"(fsync per commit, {singles} inserts), {10 * singles / t_nosync:,.0f} per second with "
                f"`durable=False` ({10 * singles} inserts).")
        print(line)
        sections.append(line)
    finally:
        if args.dir is None:
            shutil.rmtree(scratch, ignore_errors=True)
    if not args.no_write:
        write_section("db", "## HashDB storage (bench/db_bench.py)\n\n" + "\n".join(sections))


def main_replay(args: argparse.Namespace) -> None:
    scratch = args.dir or tempfile.mkdtemp(prefix="hashdb-dbbench-")
    rounds = 300
    lines = [f"`{shlex.join(['python3', 'bench/db_bench.py', *sys.argv[1:]])}`", "", machine_line(), "",
             f"radius(r=8) latency, median of {rounds} rounds, 256-bit codes, `durable=False` writes:", "",
             "| N | " + " | ".join(["at rest", "after another handle's insert (log replay)", "after our own insert"])
             + " |", "|---:|---:|---:|---:|"]
    try:
        for n in args.n:
            med = bench_replay(os.path.join(scratch, "replay"), n, rounds)
            lines.append(f"| {n:,} | " + " | ".join(f"{v * 1e6:.0f} us" for v in med.values()) + " |")
            print(lines[-1], flush=True)
    finally:
        if args.dir is None:
            shutil.rmtree(scratch, ignore_errors=True)
    if not args.no_write:
        write_section("db-replay", "## HashDB: query latency after writes (bench/db_bench.py --replay)\n\n"
                      + "\n".join(lines))


if __name__ == "__main__":
    main()
