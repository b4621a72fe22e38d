"""Crash safety, standing test: a child process writes in a loop through an embedded HashDB and is SIGKILLed,
again and again: at random moments, right after it grew the LMDB map, and in the middle of a write whose log
compaction had already deleted entries. After every kill: every acknowledged write is there, the one write
that may have been in flight is there whole or not at all (its models' layer codes included), and queries
(of models and of layers) equal brute force."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from crash_batches import BITS, apply
from db_helpers import REPO, brute_knn, brute_radius

from hashdb import HashDB

KILLS = 60  # rounds, each ending in SIGKILL; about 0.5 s each on a loaded 2-core machine
PAUSE_TIMEOUT_S = 30.0  # how long a child may take to reach its crash point (a hang guard, not a measurement)


# One "zygote" process imports hashdb once and forks a writer per round (it holds no LMDB environment, no
# threads): a round then costs a fork, not a Python start-up. A writer appends "ack i" to its own file with
# one write() after each commit returns, so a line there is an acknowledged write.
_ZYGOTE = r"""
import os, signal, sys, time
sys.path.insert(0, sys.argv[2])
from crash_batches import batch
from hashdb import HashDB
from hashdb.store import Store

signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the killed writers

def writer(path, start, mode, out):
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def say(text):
        os.write(fd, (text + "\n").encode())

    def pause(where):
        say("paused " + where)
        time.sleep(3600)  # the parent kills us here

    if mode in ("grow", "grow-mapfull"):
        original_grow = Store._grow_map
        def grow(self, at_least=0):
            original_grow(self, at_least)
            pause("grow")
        Store._grow_map = grow
        if mode == "grow-mapfull":  # no up-front reservation: growth only after MapFullError in a transaction
            Store._ensure_room = lambda self, reserve: None
    elif mode == "compact":
        original_compact = Store.compact_log
        def compact(self, txn, honour_readers=True):
            deleted = original_compact(self, txn, honour_readers)
            if deleted:
                pause("compact")  # inside the write transaction: entries deleted, nothing committed
            return deleted
        Store.compact_log = compact
    # A map far smaller than the file: LMDB takes the file's size, so the first writes must grow the map.
    db = HashDB(path, bits=64, map_size=1 << 16)
    say("ready")
    i = start
    while True:
        op, keys, codes, metas, layers = batch(i)
        if op == "delete":
            db.delete_many(keys)
        else:
            db.insert_many(keys, codes, metas, layers=layers)
        say(f"ack {i}")
        i += 1

for line in sys.stdin:
    path, start, mode, out = line.split()
    pid = os.fork()
    if pid == 0:
        try:
            writer(path, int(start), mode, out)
        finally:
            os._exit(1)
    print(pid, flush=True)
"""


class Zygote:
    def __init__(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _ZYGOTE, "", str(Path(__file__).parent)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )

    def writer(self, path: str, start: int, mode: str, out: str) -> Writer:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{path} {start} {mode} {out}\n")
        self.proc.stdin.flush()
        return Writer(int(self.proc.stdout.readline()), out)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(30)


class Writer:
    """One forked writer process and the file it acknowledges its writes in."""

    def __init__(self, pid: int, out: str) -> None:
        self.pid = pid
        self.out = out

    def lines(self) -> list[str]:
        try:
            with open(self.out) as f:
                return f.read().splitlines()
        except FileNotFoundError:
            return []

    def wait_for(self, prefix: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(line.startswith(prefix) for line in self.lines()):
                return True
            if not _alive(self.pid):
                return False
            time.sleep(0.002)
        return False

    def kill(self) -> tuple[list[int], str | None]:
        """SIGKILL; returns the acknowledged batch numbers and where it paused (None if it did not)."""
        os.kill(self.pid, signal.SIGKILL)
        while _alive(self.pid):
            time.sleep(0.001)
        lines = self.lines()
        acks = [int(line.split()[1]) for line in lines if line.startswith("ack ")]
        paused = next((line.split()[1] for line in lines if line.startswith("paused")), None)
        return acks, paused


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def crash_dir() -> Iterator[str]:
    # On tmpfs where there is one: a durable commit's fsync costs nothing there, so rounds are short.
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="hashdb-crash-", dir=base) as d:
        yield d


def test_sigkilled_writers_lose_no_acknowledged_write_and_leave_no_partial_batch(crash_dir, monkeypatch):
    import hashdb.live_index

    monkeypatch.setattr(hashdb.live_index, "REGISTRY_INTERVAL_S", 0.0)  # our reader position pins the log each round
    rnd = random.Random(7)
    path = os.path.join(crash_dir, "db")
    HashDB(path, bits=BITS).close()
    state: dict[str, tuple[bytes, dict | None, list[tuple[str, bytes]]]] = {}
    committed = -1  # the last batch the database holds
    watcher = HashDB(path)  # a long-lived reader in this process: replays the children's log or rebuilds
    modes = ["random"] * (KILLS // 2) + ["grow"] * (KILLS // 6) + ["grow-mapfull"] * (KILLS // 6)
    modes += ["compact"] * (KILLS - len(modes))
    rnd.shuffle(modes)
    figures = {"kills": 0, "acked": 0, "in_flight_present": 0, "in_flight_absent": 0, "queries": 0}
    paused_at = {"grow": 0, "compact": 0}
    zygote = Zygote()
    try:
        for n, mode in enumerate(modes):
            current = zygote.writer(path, committed + 1, mode, os.path.join(crash_dir, f"round{n:03d}.txt"))
            assert current.wait_for("ready", PAUSE_TIMEOUT_S), f"writer {n} did not open the database"
            if mode == "random":
                time.sleep(rnd.uniform(0.0, 0.15))
            else:
                reached = current.wait_for("paused", PAUSE_TIMEOUT_S)
                if not reached:
                    st = watcher._store
                    with st.read() as txn:
                        info = (st.first_seq(txn), st.last_seq(txn), st.readers(txn), os.getpid())
                assert reached, f"no {mode} crash point reached: {current.lines()[-3:]} {info}"
            acks, paused = current.kill()
            figures["kills"] += 1
            if paused:
                paused_at[paused] += 1
            assert acks == list(range(committed + 1, committed + 1 + len(acks)))
            last_ack = acks[-1] if acks else committed
            for i in range(committed + 1, last_ack + 1):
                apply(state, i)
            figures["acked"] += len(acks)
            found = {k: (*watcher.get(k), watcher.layers(k)) for k in watcher}
            if found == state:
                figures["in_flight_absent"] += 1
                committed = last_ack
            else:  # the batch after the last acknowledged one may have committed, whole
                apply(state, last_ack + 1)
                assert found == state, f"after kill {figures['kills']} ({mode}) the database is neither state"
                figures["in_flight_present"] += 1
                committed = last_ack + 1
            codes = {k: c for k, (c, _, _) in state.items()}
            layer_codes = {f"{k}\0{name}": code for k, (_, _, ls) in state.items() for name, code in ls}
            with HashDB(path, readonly=True) as fresh:  # its own index, built from the tables
                for _ in range(2):
                    q = rnd.choice(list(codes.values())) if codes else bytes(BITS // 8)
                    flip = np.frombuffer(q, np.uint8) ^ np.uint8(1 << rnd.randrange(8))
                    r = rnd.choice([0, 3, 10])
                    assert watcher.radius(flip, r) == brute_radius(codes, flip.tobytes(), r)
                    assert fresh.radius(flip, r) == brute_radius(codes, flip.tobytes(), r)
                    assert watcher.knn(flip, 5) == brute_knn(codes, flip.tobytes(), 5)
                    # Each layer's name is unique within its model here, so (key, name) sorts as (key, position).
                    expected = [(*kn.split("\0"), d) for kn, d in brute_radius(layer_codes, flip.tobytes(), 4 * r)]
                    assert watcher.layer_radius(flip, 4 * r) == expected
                    assert fresh.layer_radius(flip, 4 * r) == expected
                    figures["queries"] += 5
    finally:
        zygote.close()
        watcher.close()
    with HashDB(path) as db:  # and a clean reopen agrees
        assert {k: (*db.get(k), db.layers(k)) for k in db} == state
    figures["verified_writes"] = committed + 1
    figures["records"] = len(state)
    print(f"\ncrash test: {figures}, kills paused in map growth {paused_at['grow']}, in compaction "
          f"{paused_at['compact']}")
    assert figures["kills"] >= 50
    assert paused_at["grow"] >= KILLS // 6 * 2 and paused_at["compact"] >= KILLS // 6
    assert figures["acked"] > figures["kills"]  # the children did write between kills
