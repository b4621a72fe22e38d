"""Start-up benchmark: what a fresh process pays to answer one query (the scripts path), against a bare
``python -c "import numpy, lmdb"`` measured in the same run. Writes the "startup" section of
bench/RESULTS.md.

Measured, each as the median of --runs fresh processes, interleaved so machine load hits all alike:
  * bare Python start (import numpy, lmdb);
  * ``python -m hashdb query DB HEX --radius 8`` and at the codec's decision radius for that many codes (a
    2-D suspect: what `hashdb query MODEL` asks), at 1M and 10M codes;
  * in-process: open + first query at 10M (with the index file, and with it moved aside);
  * first query after a fresh install: an empty numba cache (NUMBA_CACHE_DIR), for the CLI query and for a
    query on the numba kernels (forced MIH), which is what compiles.

Databases are built once under --dir (uniform random codes of --bits, default hashdb.DEFAULT_BITS, keys
m000000000.., bulk insert with durable=False; the writer's close writes the index file) and reused.

    python3 bench/startup_bench.py --dir /tmp/hdb             # 1M and 10M (10M: ~5 min to build once)
    python3 bench/startup_bench.py --dir /tmp/hdb --sizes 1e5  # smoke run
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._results import machine_line, write_section  # noqa: E402

PY = sys.executable
SEED = 12345
BATCH = 500_000


def label(n: int) -> str:
    return f"{n // 1_000_000}m" if n >= 1_000_000 and n % 1_000_000 == 0 else f"{n // 1000}k"


def query_hex(bits: int) -> str:
    import numpy as np

    return np.random.default_rng(SEED).integers(0, 256, (1, bits // 8), dtype=np.uint8)[0].tobytes().hex()


def decision_radius(n: int, bits: int) -> int:
    from hashdb.codec import ModelHasher
    from hashdb.codec.radius import decision_radius

    return decision_radius(ModelHasher(bits).config, n, "2d")


def build(path: str, n: int, bits: int) -> float:
    """Create the database of ``n`` codes unless it exists; returns seconds spent (0 when reused)."""
    if os.path.exists(os.path.join(path, "data.mdb")):
        return 0.0
    code = (
        "import sys, numpy as np\n"
        "from hashdb import HashDB\n"
        f"rng = np.random.default_rng({SEED}); n = {n}\n"
        f"db = HashDB({path!r}, bits={bits}, durable=False)\n"
        f"for s in range(0, n, {BATCH}):\n"
        f"    m = min({BATCH}, n - s)\n"
        "    db.insert_many([f'm{i:09d}' for i in range(s, s + m)],\n"
        f"                   rng.integers(0, 256, (m, {bits // 8}), dtype=np.uint8))\n"
        "db.close()\n"
    )
    t = time.perf_counter()
    subprocess.run([PY, "-c", code], check=True, env=env())
    return time.perf_counter() - t


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ)
    e.pop("PYTHONDONTWRITEBYTECODE", None)  # as installed: modules load from .pyc, not from source
    e["PYTHONPATH"] = str(ROOT) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e.update(extra)
    return e


def wall(cmd: list[str], **extra: str) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env(**extra), stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


IN_PROCESS = (
    "import sys, time\n"
    "t = time.perf_counter()\n"
    "from hashdb import HashDB\n"
    "db = HashDB(sys.argv[1], readonly=True)\n"
    "hits = db.radius(bytes.fromhex(sys.argv[2]), int(sys.argv[3]), force=sys.argv[4] or None)\n"
    "print(time.perf_counter() - t, len(hits), db.stats()['index_source'], 'numba' in sys.modules)\n"
)


def in_process(path: str, hexcode: str, r: int, force: str = "", **extra: str) -> tuple[float, str]:
    out = subprocess.run(
        [PY, "-c", IN_PROCESS, path, hexcode, str(r), force], check=True, env=env(**extra), capture_output=True,
        text=True,
    ).stdout.split()
    return float(out[0]), f"{out[2]}, numba {'loaded' if out[3] == 'True' else 'not loaded'}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "hashdb-startup"))
    ap.add_argument("--sizes", default="1e6,1e7", help="comma-separated database sizes")
    ap.add_argument("--runs", type=int, default=7, help="fresh processes per measurement (median)")
    ap.add_argument("--bits", type=int, default=None, help="code length (default: hashdb.DEFAULT_BITS)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    sizes = [int(float(x)) for x in args.sizes.split(",")]
    from hashdb import DEFAULT_BITS

    bits = args.bits or DEFAULT_BITS
    hexcode = query_hex(bits)
    notes = []
    paths = {}
    for n in sizes:
        paths[n] = os.path.join(args.dir, f"db{label(n)}" + ("" if bits == 256 else f"x{bits}"))
        spent = build(paths[n], n, bits)
        if spent:
            notes.append(f"built the {n:,}-code database in {spent:.0f} s (bulk insert, durable=False, index file)")
        print(f"database {paths[n]} ready", flush=True)

    started = time.time()
    cases: list[tuple[str, list[str]]] = [("bare `python -c \"import numpy, lmdb\"`", [PY, "-c", "import numpy, lmdb"])]
    for n in sizes:
        for r in (8, decision_radius(n, bits)):
            cmd = [PY, "-m", "hashdb", "query", paths[n], hexcode, "--radius", str(r)]
            cases.append((f"`hashdb query` {n:,} codes, r={r}", cmd))
    times: dict[str, list[float]] = {name: [] for name, _ in cases}
    for _name, cmd in cases:  # one untimed run each: page cache and .pyc warm for every case alike
        wall(cmd)
    for _ in range(args.runs):
        for cmd_name, cmd in cases:
            times[cmd_name].append(wall(cmd))
    bare = statistics.median(times[cases[0][0]])
    rows = [
        f"| {name} | {statistics.median(t):.3f} | {statistics.median(t) / bare:.2f}x |" for name, t in times.items()
    ]

    big = max(sizes)
    in_rows = []
    for name, force, aside in (
        ("open + first query, r=8, index file (numpy answers)", "", False),
        ("open + first query, r=8, index file, forced onto the numba kernels", "mih", False),
        ("open + first query, r=8, no index file (LMDB read + numpy scan)", "", True),
    ):
        index_file = os.path.join(paths[big], "index.hashdb")
        if aside:
            os.replace(index_file, index_file + ".aside")
        try:
            runs = [in_process(paths[big], hexcode, 8, force) for _ in range(max(3, args.runs // 2))]
        finally:
            if aside:
                os.replace(index_file + ".aside", index_file)
        in_rows.append(f"| {name} | {statistics.median(t for t, _ in runs):.3f} | {runs[0][1]} |")

    fresh = []
    with tempfile.TemporaryDirectory(prefix="numba-cold-") as cold:
        t = wall([PY, "-m", "hashdb", "query", paths[big], hexcode, "--radius", "8"], NUMBA_CACHE_DIR=cold)
        fresh.append(f"| `hashdb query` {big:,} codes, r=8, empty numba cache | {t:.2f} |")
        sub = os.path.join(cold, "k")
        os.makedirs(sub)
        t, how = in_process(paths[big], hexcode, 8, "mih", NUMBA_CACHE_DIR=sub)
        fresh.append(f"| open + first query forced onto the kernels, empty numba cache (compiles) | {t:.2f} |")
        shutil.rmtree(sub, ignore_errors=True)
    wall_s = time.time() - started

    cmd = "python3 " + " ".join([os.path.relpath(__file__, ROOT)] + sys.argv[1:])
    body = "\n".join(
        [
            "## startup: a fresh process answering one query",
            "",
            f"`{cmd}` ({wall_s / 60:.1f} min wall)",
            "",
            machine_line() + "; the machine was shared with other jobs (load varies), so compare ratios",
            f"within the run. Median of {args.runs} fresh processes each, run interleaved; the query code is in",
            f"the database (1 match at r=8). Uniform random {bits}-bit codes; the larger radius is the codec's "
            "decision radius for a 2-D suspect in a database of that size (what `hashdb query MODEL` asks).",
            "",
            "| command | median s | vs bare Python |",
            "|---|---|---|",
            *rows,
            "",
            f"In-process, {big:,} codes (seconds from `import hashdb` to the first answer):",
            "",
            "| case | median s | path |",
            "|---|---|---|",
            *in_rows,
            "",
            "First query after a fresh install (numba's cache emptied with NUMBA_CACHE_DIR):",
            "",
            "| case | s |",
            "|---|---|",
            *fresh,
            "",
            *[f"- {x}" for x in notes],
        ]
    )
    print(body)
    if not args.no_write:
        write_section("startup", body)


if __name__ == "__main__":
    main()
