"""`hashdb hash` of 40 models on a loaded machine (two runs at once) vs unloaded, BLAS threads one vs default.

    python3 bench/hash_threads_bench.py [--models 40] [--repeats 2] [--write]

The hasher runs numpy's BLAS on one thread inside each call (hashdb/codec/hasher.py): hashing is many small
matrix products, where OpenBLAS's threads only contend, and two processes on two cores each spinning two
BLAS threads were several times slower than alone. The peer in the same run is the same command with that
limit switched off (BLAS at its default thread count), i.e. the behaviour before the limit. Each process
hashes the same 40 .npz models (8 each of the zoo's plain, vgg, resnet, mobilenet and conv1d nets, freshly
initialized; npz keeps torch out of the hashing processes). Target: loaded within 1.5x of unloaded.
"""

from __future__ import annotations

import argparse
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

ARCHS = ("plain", "vgg", "resnet", "mobilenet", "conv1d")

# The same CLI entry point as `hashdb hash`, optionally without the one-BLAS-thread limit (the "before" peer).
_RUN = """
import contextlib, sys
if sys.argv[1] == "default":
    import hashdb.codec.hasher as hasher
    hasher._one_blas_thread = contextlib.nullcontext
from hashdb.cli import main
sys.exit(main(["hash", *sys.argv[2:]]))
"""


def write_models(folder: Path, n: int) -> list[str]:
    from bench.zoo import make_model

    paths = []
    for i in range(n):
        arch = ARCHS[i % len(ARCHS)]
        sd = make_model(arch, 1000 + i).state_dict()
        path = folder / f"{arch}-{i}.npz"
        np.savez(path, **{k: v.numpy() for k, v in sd.items() if v.is_floating_point()})
        paths.append(str(path))
    return paths


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_at_once(blas: str, paths: list[str], copies: int) -> tuple[list[float], float]:
    """Wall seconds of each of ``copies`` `hashdb hash` processes started together, and their mean CPU seconds."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.pop(var, None)  # default settings: whatever BLAS picks for this machine
    cpu0, t0 = _children_cpu(), time.perf_counter()
    procs = [
        subprocess.Popen([sys.executable, "-c", _RUN, blas, *paths], env=env, stdout=subprocess.DEVNULL)
        for _ in range(copies)
    ]
    walls = []
    for p in procs:
        if p.wait() != 0:
            raise SystemExit(f"hashdb hash failed (exit {p.returncode})")
        walls.append(time.perf_counter() - t0)
    return walls, (_children_cpu() - cpu0) / copies


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--write", action="store_true", help="write the 'hash_threads' section of bench/RESULTS.md")
    args = ap.parse_args()
    from bench._results import machine_line, write_section

    with tempfile.TemporaryDirectory(prefix="hash-threads-") as tmp:
        paths = write_models(Path(tmp), args.models)
        load0 = os.getloadavg()[0]
        rows = []
        for blas, label in (("one", "one per call (hashdb's default)"), ("default", "BLAS's default (before)")):
            alone, loaded, cpu_alone, cpu_loaded = [], [], [], []
            for _ in range(args.repeats):  # interleaved, so drifting background load hits both alike
                walls, cpu = run_at_once(blas, paths, 1)
                alone, cpu_alone = alone + walls, cpu_alone + [cpu]
                walls, cpu = run_at_once(blas, paths, 2)
                loaded, cpu_loaded = loaded + walls, cpu_loaded + [cpu]
            a, b = statistics.median(alone), statistics.median(loaded)
            rows.append((label, a, b, b / a, statistics.median(cpu_alone), statistics.median(cpu_loaded)))
    cmd = shlex.join(["python3", "bench/hash_threads_bench.py", *sys.argv[1:]])
    text = "\n".join(
        [
            f"## Codec: `hashdb hash` of {args.models} models, alone vs two runs at once",
            "",
            f"`{cmd}`",
            "",
            machine_line() + f"; load average at start {load0:.1f} (shared machine); median wall seconds of "
            f"{args.repeats} runs (loaded: each of the two processes), whole process including start-up.",
            "",
            "| BLAS threads | alone (s) | two at once (s) | loaded / alone | CPU s per process: alone / two at once |",
            "|---|---:|---:|---:|---:|",
            *[f"| {lb} | {a:.2f} | {b:.2f} | {r:.2f}x | {ca:.2f} / {cb:.2f} |" for lb, a, b, r, ca, cb in rows],
            "",
            "Target: loaded within 1.5x of alone. On a machine that other work already loads, two processes cannot",
            "each have a core, so the wall ratio also measures that load; the CPU column does not: with one BLAS",
            "thread a process needs the same CPU time alone or beside another.",
        ]
    )
    print(text)
    if args.write:
        write_section("hash_threads", text)


if __name__ == "__main__":
    main()
