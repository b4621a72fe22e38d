"""Radius queries through ``hashdb serve`` vs the embedded HashDB, in the same run.

Builds a database of N seeded random codes, makes queries that are near copies of stored codes (0..r bits
flipped, so every query has at least one hit), measures the embedded HashDB (one thread: radius() one at a
time, and radius_many() in batches), then starts ``python -m hashdb serve`` and measures 1, 4 and 16 client
*processes*, each either waiting for every reply (sequential) or keeping a pipeline of ``--depth`` requests.
Writes the "serve" section of bench/RESULTS.md.

    nice -n 10 python3 bench/serve_bench.py            # 1M codes of 256 bits, r = 8
    python3 bench/serve_bench.py --quick               # 50k codes, short runs
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._results import machine_line, write_section  # noqa: E402


def make_codes(n: int, bits: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, bits // 8), dtype=np.uint8)


def make_queries(codes: np.ndarray, count: int, r: int, seed: int) -> list[bytes]:
    """Stored codes with 0..r random bits flipped: what a search for lightly modified copies looks like."""
    rng = np.random.default_rng(seed + 1)
    bits = codes.shape[1] * 8
    picks = rng.integers(0, len(codes), size=count)
    unpacked = np.unpackbits(codes[picks], axis=1)
    for row in unpacked:
        row[rng.choice(bits, size=int(rng.integers(0, r + 1)), replace=False)] ^= 1
    return [row.tobytes() for row in np.packbits(unpacked, axis=1)]


def build_db(path: str, codes: np.ndarray) -> float:
    from hashdb.db import HashDB

    t0 = time.perf_counter()
    with HashDB(path, bits=codes.shape[1] * 8) as db:
        chunk = 100_000
        for start in range(0, len(codes), chunk):
            keys = [f"model-{i:08d}" for i in range(start, min(start + chunk, len(codes)))]
            db.insert_many(keys, codes[start : start + chunk])
        db.refresh()
    return time.perf_counter() - t0


def pct(values: list[float] | np.ndarray, q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def embedded_run(db: object, queries: list[bytes], r: int, depth: int, seconds: float) -> dict:
    """One thread on an open HashDB: radius() one at a time, then radius_many() in batches of ``depth``."""
    lat: list[float] = []
    t0 = time.perf_counter()
    i = 0
    while time.perf_counter() - t0 < seconds:
        q = queries[i % len(queries)]
        s = time.perf_counter_ns()
        db.radius(q, r)  # type: ignore[attr-defined]
        lat.append((time.perf_counter_ns() - s) / 1000)
        i += 1
    single = {"qps": i / (time.perf_counter() - t0), "p50": pct(lat, 50), "p99": pct(lat, 99)}
    blat: list[float] = []
    t0 = time.perf_counter()
    n = 0
    while time.perf_counter() - t0 < seconds:
        batch = [queries[(n + j) % len(queries)] for j in range(depth)]
        s = time.perf_counter_ns()
        db.radius_many(batch, r)  # type: ignore[attr-defined]
        blat.append((time.perf_counter_ns() - s) / 1000)
        n += depth
    batched = {"qps": n / (time.perf_counter() - t0), "p50": pct(blat, 50), "p99": pct(blat, 99)}
    return {"single": single, "batched": batched}


def median_of(runs: list[dict]) -> dict:
    names = [name for name in ("qps", "p50", "p99", "cpu") if name in runs[0]]
    return {name: float(np.median([run[name] for run in runs])) for name in names}


def client_worker(sock_path: str, queries: list[bytes], r: int, depth: int, offset: int, start_at: float,
                  seconds: float, out: mp.Queue) -> None:  # fmt: skip
    import hashdb

    with hashdb.connect(sock_path) as client:
        for q in queries[offset : offset + 50]:  # connection warm-up
            client.radius(q, r)
        while time.time() < start_at:
            time.sleep(0.001)
        lat: list[float] = []
        n = 0
        i = offset
        t0 = time.perf_counter()
        end = t0 + seconds
        if depth <= 1:
            while True:
                s = time.perf_counter_ns()
                client.radius(queries[i % len(queries)], r)
                e = time.perf_counter_ns()
                lat.append((e - s) / 1000)
                n += 1
                i += 1
                if e / 1e9 >= end:
                    break
        else:
            while True:
                pipe = client.pipeline()
                for j in range(depth):
                    pipe.radius(queries[(i + j) % len(queries)], r)
                s = time.perf_counter_ns()
                pipe.execute()
                e = time.perf_counter_ns()
                lat.append((e - s) / 1000)
                n += depth
                i += depth
                if e / 1e9 >= end:
                    break
        elapsed = time.perf_counter() - t0
    out.put((n, elapsed, lat))


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process: what a request costs the server, whatever the machine's load."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_run(sock_path: str, server_pid: int, queries: list[bytes], r: int, clients: int, depth: int,
               seconds: float) -> dict:  # fmt: skip
    cpu0 = cpu_s(server_pid)
    ctx = mp.get_context("fork")
    out: mp.Queue = ctx.Queue()
    start_at = time.time() + 0.5 + 0.05 * clients
    step = max(1, len(queries) // clients)
    procs = [
        ctx.Process(target=client_worker, args=(sock_path, queries, r, depth, c * step, start_at, seconds, out))
        for c in range(clients)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=120 + seconds) for _ in procs]
    for p in procs:
        p.join(30)
    total = sum(n for n, _, _ in results)
    wall = max(elapsed for _, elapsed, _ in results)
    lat = np.concatenate([np.asarray(x) for _, _, x in results])
    cpu_us = (cpu_s(server_pid) - cpu0) * 1e6 / (total + 50 * clients)  # 50 warm-up requests per client
    return {"qps": total / wall, "p50": pct(lat, 50), "p99": pct(lat, 99), "requests": total, "cpu": cpu_us}


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def ping_latencies(client: object, seconds: float) -> list[float]:
    lat: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        s = time.perf_counter_ns()
        client.ping()  # type: ignore[attr-defined]
        lat.append((time.perf_counter_ns() - s) / 1000)
        time.sleep(0.002)
    return lat


def hostile_run(sock_path: str, server_pid: int, queries: list[bytes], bits: int, frames: int, seconds: float) -> dict:
    """A client sends ``frames`` radius r=bits requests (each answered by the whole database) in one write
    and never reads; another client pings meanwhile. Returns ping latencies and the server's RSS."""
    import msgpack

    import hashdb
    from hashdb.protocol import encode_frame

    data = b"".join(
        encode_frame(msgpack.packb({"id": i, "op": "radius", "code": queries[i], "r": bits})) for i in range(frames)
    )
    with hashdb.connect(sock_path, timeout=600) as client:
        calm = ping_latencies(client, 1.0)
        rss_before = rss_mb(server_pid)
        hostile = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        hostile.connect(sock_path)
        hostile.sendall(data)
        t0 = time.perf_counter()
        under = ping_latencies(client, seconds)
        first_ms = under[0] / 1000 if under else float("nan")
        rss_after = rss_mb(server_pid)
        hostile.close()
        elapsed = time.perf_counter() - t0
    return {"bytes": len(data), "calm_p50": pct(calm, 50), "p50": pct(under, 50), "max": max(under),
            "pings": len(under), "elapsed": elapsed, "first_ms": first_ms, "rss_before": rss_before,
            "rss_after": rss_after}  # fmt: skip


def wait_for(sock_path: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(sock_path)
            return
        except OSError:
            time.sleep(0.1)
        finally:
            s.close()
    raise SystemExit("server did not start")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--bits", type=int, default=256)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--depth", type=int, default=16, help="requests in flight per pipelined client")
    parser.add_argument("--seconds", type=float, default=3.0, help="measured time per configuration")
    parser.add_argument("--repeats", type=int, default=3, help="median over this many rounds")
    parser.add_argument("--quick", action="store_true", help="50k codes, 1 s per configuration, 1 round")
    parser.add_argument("--hostile-frames", type=int, default=20,
                        help="radius r=bits frames a never-reading client sends (0: skip that run)")  # fmt: skip
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.seconds, args.repeats = min(args.n, 50_000), 1.0, 1
    command = "python3 bench/serve_bench.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    clients = [int(c) for c in args.clients.split(",")]

    workdir = tempfile.mkdtemp(prefix="hashdb-serve-bench-")
    db_path, sock_path = os.path.join(workdir, "db"), os.path.join(workdir, "s.sock")
    codes = make_codes(args.n, args.bits, args.seed)
    queries = make_queries(codes, 20_000, args.r, args.seed)
    build_s = build_db(db_path, codes)
    del codes
    print(f"built {args.n} codes of {args.bits} bits in {build_s:.1f} s ({workdir})", flush=True)

    from hashdb.db import HashDB

    # The embedded database stays open in this process (its index built once); client processes are
    # forked from it but never touch it.
    db = HashDB(db_path, bits=None)
    db.refresh()
    for q in queries[:200]:  # warm caches and jit
        db.radius(q, args.r)
    expected = [db.radius(q, args.r) for q in queries[:50]]
    plan = db.stats()["index"]
    index_line = "index: " + ", ".join(
        f"{name}" + (f" (m={s.get('m')})" if isinstance(s, dict) and "m" in s else "")
        for name, s in (plan or {}).get("structures", {}).items()
    )

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    server = subprocess.Popen(
        [sys.executable, "-m", "hashdb", "serve", db_path, "--socket", sock_path, "--log-level", "warning"],
        env=env,
    )
    configs = [(c, depth) for c in clients for depth in (1, args.depth)]
    emb_runs: list[dict] = []
    socket_runs: dict[tuple[int, int], list[dict]] = {cfg: [] for cfg in configs}
    overheads: list[float] = []
    try:
        wait_for(sock_path, server)
        import hashdb

        with hashdb.connect(sock_path) as client:  # the server answers what the library answers
            got = [client.radius(q, args.r) for q in queries[:50]]
            assert got == expected, "server results differ from the embedded HashDB"
            client.radius_many(queries[:1000], args.r)  # build the server's index before timing
        # Each repeat measures the embedded database and then every socket configuration, so each
        # comparison is between runs minutes apart at most; the table reports medians over repeats.
        for rep in range(args.repeats):
            emb = embedded_run(db, queries, args.r, args.depth, args.seconds)
            emb_runs.append(emb)
            print(f"[{rep + 1}/{args.repeats}] embedded radius: {emb['single']['qps']:.0f}/s p50 "
                  f"{emb['single']['p50']:.1f} us; radius_many({args.depth}): {emb['batched']['qps']:.0f}/s",
                  flush=True)  # fmt: skip
            for c, depth in configs:
                res = server_run(sock_path, server.pid, queries, args.r, c, depth, args.seconds)
                socket_runs[(c, depth)].append(res)
                if c == 1 and depth == 1:
                    overheads.append(res["p50"] - emb["single"]["p50"])
                print(f"[{rep + 1}/{args.repeats}] server clients={c:2d} depth={depth:2d}: {res['qps']:8.0f} q/s  "
                      f"p50 {res['p50']:8.1f} us  p99 {res['p99']:8.1f} us  server CPU {res['cpu']:6.1f} us/req",
                      flush=True)  # fmt: skip
        hostile = None
        if args.hostile_frames:
            hostile = hostile_run(sock_path, server.pid, queries, args.bits, args.hostile_frames, 2 * args.seconds)
            print(f"hostile client: ping p50 {hostile['p50']:.0f} us (calm {hostile['calm_p50']:.0f} us), "
                  f"max {hostile['max'] / 1000:.1f} ms; server RSS {hostile['rss_before']:.0f} -> "
                  f"{hostile['rss_after']:.0f} MB", flush=True)  # fmt: skip
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
        db.close()
        shutil.rmtree(workdir, ignore_errors=True)

    emb_single = median_of([e["single"] for e in emb_runs])
    emb_batched = median_of([e["batched"] for e in emb_runs])
    rows = [(c, depth, median_of(socket_runs[(c, depth)])) for c, depth in configs]
    overhead = float(np.median(overheads)) if overheads else float("nan")
    emb = {"single": emb_single, "batched": emb_batched}
    lines = [
        f"`{command}`",
        "",
        machine_line(),
        "",
        f"{args.n:,} random codes of {args.bits} bits (seed {args.seed}), queries = stored codes with 0..{args.r} "
        f"bits flipped, r = {args.r}; median of {args.repeats} rounds of {args.seconds:g} s per row; "
        f"clients are separate processes on the same "
        f"machine as the server (they compete for the same cores). Build {build_s:.1f} s. {index_line}.",
        "",
        "| path | clients | in flight per client | queries/s | p50 latency (us) | p99 latency (us) "
        "| server CPU (us/request) |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| embedded radius() | 1 thread | 1 | {emb['single']['qps']:,.0f} | {emb['single']['p50']:.1f} | "
        f"{emb['single']['p99']:.1f} | |",
        f"| embedded radius_many() | 1 thread | {args.depth} (batch) | {emb['batched']['qps']:,.0f} | "
        f"{emb['batched']['p50']:.1f} | {emb['batched']['p99']:.1f} | |",
    ]
    for c, depth, res in rows:
        how = "1" if depth == 1 else f"{depth} (pipelined)"
        lines.append(
            f"| socket | {c} | {how} | {res['qps']:,.0f} | {res['p50']:.1f} | {res['p99']:.1f} | {res['cpu']:.1f} |"
        )
    lines += [
        "",
        f"Per-request overhead of the socket path at the median (1 client, sequential p50 minus embedded "
        f"radius() p50 of the same round, median over rounds): **{overhead:.1f} us**. "
        f"Pipelined rows report the latency of a whole pipeline of "
        f"{args.depth} requests.",
    ]
    lines += [] if hostile is None else [
        "",
        f"Hostile client: one connection sends {args.hostile_frames} `radius` requests with r = {args.bits} "
        f"(each answered by all {args.n:,} codes) in one {hostile['bytes']:,}-byte write and never reads; "
        f"another client pings every 2 ms for {2 * args.seconds:g} s meanwhile: ping p50 "
        f"**{hostile['p50']:.0f} us** (calm, just before: {hostile['calm_p50']:.0f} us), max "
        f"{hostile['max'] / 1000:.1f} ms over {hostile['pings']} pings; server RSS {hostile['rss_before']:.0f} MB "
        f"-> {hostile['rss_after']:.0f} MB.",
    ]
    body = "\n".join(lines)
    print()
    print(body)
    if not args.no_write:
        write_section("serve", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
