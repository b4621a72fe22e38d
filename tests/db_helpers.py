"""Shared pieces of the HashDB tests: a brute-force oracle and a helper that runs HashDB in another process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from hashdb.codes import hamming

REPO = Path(__file__).resolve().parents[1]


def brute_radius(records: dict[str, bytes], query: bytes, r: int) -> list[tuple[str, int]]:
    """Every (key, distance) within r, sorted by (distance, key): the plain-Python answer HashDB must give."""
    hits = [(k, hamming(c, query)) for k, c in records.items()]
    return sorted(((k, d) for k, d in hits if d <= r), key=lambda t: (t[1], t[0]))


def brute_knn(records: dict[str, bytes], query: bytes, k: int) -> list[tuple[str, int]]:
    hits = [(key, hamming(c, query)) for key, c in records.items()]
    return sorted(hits, key=lambda t: (t[1], t[0]))[:k]


def db_contents(db: Any) -> dict[str, tuple[bytes, Any]]:
    """Everything a reader can observe through get(), keyed by key."""
    return {k: db.get(k) for k in db}


def random_codes(n: int, bits: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, bits // 8), dtype=np.uint8)


# Runs in the child: open the database, apply the ops, print a JSON result line, close (or vanish).
_CHILD = r"""
import json, os, sys
from hashdb import HashDB
path, ops = sys.argv[1], json.loads(sys.stdin.read())
db = HashDB(path)
out = []
for op, *args in ops:
    if op == "insert":
        db.insert(args[0], bytes.fromhex(args[1]), args[2] if len(args) > 2 else None)
    elif op == "insert_many":
        db.insert_many(args[0], [bytes.fromhex(c) for c in args[1]])
    elif op == "delete":
        out.append(db.delete(args[0]))
    elif op == "radius":
        out.append(db.radius(bytes.fromhex(args[0]), args[1]))
    elif op == "compact":
        out.append(db.compact_log(honour_readers=args[0]))
    elif op == "stats":
        st = db.stats()
        out.append({k: st[k] for k in ("count", "log_seq", "log_entries", "readers", "map_size")})
    elif op == "exit_without_close":
        print(json.dumps(out), flush=True)
        os._exit(0)
print(json.dumps(out), flush=True)
db.close()
"""


def run_child(path: str | os.PathLike[str], ops: list[list[Any]], timeout: float = 60) -> list[Any]:
    """Run ``ops`` against the database at ``path`` in a fresh Python process; returns its results."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, os.fspath(path)],
        input=json.dumps(ops),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if proc.returncode != 0:
        raise AssertionError(f"child failed ({proc.returncode}):\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
