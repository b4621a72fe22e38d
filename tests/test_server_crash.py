"""SIGKILL ``hashdb serve`` under write load at random points: every acknowledged write survives.

Two clients write while the server is killed at a seeded random moment: one inserts single keys and
deletes some of its own earlier ones, the other sends insert_many batches. After each kill the database
is opened directly: every acknowledged insert is there with its code, every acknowledged delete is gone,
no batch is half-written (acknowledged or not), and at the end radius answers equal brute force. The
figures (kills, acknowledged writes verified) are printed (pytest -s).
"""

from __future__ import annotations

import random
import signal
import threading
import time

from frontend_helpers import short_socket_path, start_server_process

import hashdb
from hashdb.codes import hamming
from hashdb.db import HashDB

BITS = 64
KILLS = 20
TIME_BUDGET_S = 40.0  # the test stops killing after this long (CI time), whatever KILLS says
BATCH = 40


def code_for(key: str) -> bytes:
    return hash_bytes(key.encode())


def hash_bytes(data: bytes) -> bytes:
    import hashlib

    return hashlib.blake2b(data, digest_size=BITS // 8).digest()


class Load:
    """What the two writer clients sent and what the server acknowledged, in one round."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.inserted: list[str] = []  # acknowledged single inserts
        self.delete_sent: set[str] = set()
        self.deleted: set[str] = set()  # acknowledged deletes
        self.batches: list[tuple[list[str], bool]] = []  # (keys, acknowledged)
        self.stop = threading.Event()

    def singles(self, path: str) -> None:
        try:
            with hashdb.connect(path, timeout=30) as client:
                n = 0
                while not self.stop.is_set():
                    key = f"{self.prefix}s{n}"
                    client.insert(key, code_for(key))
                    self.inserted.append(key)
                    if n % 4 == 3:
                        victim = self.inserted[n // 2]
                        self.delete_sent.add(victim)
                        assert client.delete(victim) is True
                        self.deleted.add(victim)
                    n += 1
        except (hashdb.HashDBError, OSError):
            pass  # the server was killed under us

    def many(self, path: str) -> None:
        try:
            with hashdb.connect(path, timeout=30) as client:
                n = 0
                while not self.stop.is_set():
                    keys = [f"{self.prefix}b{n}-{i}" for i in range(BATCH)]
                    self.batches.append((keys, False))
                    assert client.insert_many(keys, [code_for(k) for k in keys]) == BATCH
                    self.batches[-1] = (keys, True)
                    n += 1
        except (hashdb.HashDBError, OSError):
            pass


def verify(db: HashDB, load: Load) -> int:
    """Assert the round's guarantees; returns the number of acknowledged writes checked."""
    checked = 0
    for key in load.inserted:
        if key in load.deleted:
            assert key not in db, f"acknowledged delete of {key} lost"
        elif key not in load.delete_sent:
            assert db.get(key) == (code_for(key), None), f"acknowledged insert of {key} lost"
        checked += 1
    checked += len(load.deleted)
    for keys, acked in load.batches:
        present = sum(key in db for key in keys)
        assert present in (0, len(keys)), f"batch {keys[0]}.. half written: {present} of {len(keys)}"
        if acked:
            assert present == len(keys), f"acknowledged batch {keys[0]}.. lost"
            checked += 1
    return checked


def test_sigkill_under_write_load_loses_no_acknowledged_write(tmp_path):
    rng = random.Random(20261201)
    db_path = str(tmp_path / "db")
    HashDB(db_path, bits=BITS).close()
    sock_path = short_socket_path(tmp_path)
    kills = verified = 0
    t0 = time.monotonic()
    while kills < KILLS and time.monotonic() - t0 < TIME_BUDGET_S:
        proc = start_server_process(db_path, sock_path)
        load = Load(f"r{kills}-")
        writers = [threading.Thread(target=load.singles, args=(sock_path,)),
                   threading.Thread(target=load.many, args=(sock_path,))]  # fmt: skip
        for w in writers:
            w.start()
        time.sleep(rng.uniform(0.02, 0.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        load.stop.set()
        for w in writers:
            w.join(60)
        kills += 1
        with HashDB(db_path, bits=None) as db:
            verified += verify(db, load)
    # At the end the database answers exactly: radius equals brute force over what it holds.
    with HashDB(db_path, bits=None) as db:
        stored = {key: db.get(key)[0] for key in db}
        queries = [stored[k] for k in list(stored)[:: max(1, len(stored) // 5)]]
        queries.append(bytes(BITS // 8))
        for q in queries:
            brute = sorted((hamming(q, c), k) for k, c in stored.items())
            assert db.radius(q, 20) == [(k, d) for d, k in brute if d <= 20]
    print(f"\nSIGKILL of hashdb serve: {kills} kills, {verified} acknowledged writes verified, "
          f"{len(stored)} keys at the end, radius == brute force for {len(queries)} queries")  # fmt: skip
    assert kills >= 5 and verified > kills
