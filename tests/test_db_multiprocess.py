"""Several processes on one database: a query sees every write committed before it began, from any process,
and log compaction never costs a reader exactness (at worst a rebuild from the tables)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from db_helpers import REPO, brute_knn, brute_radius, random_codes, run_child

from hashdb import HashDB

BITS = 256


@pytest.fixture
def db(tmp_path):
    with HashDB(tmp_path / "db", bits=BITS) as handle:
        yield handle


def records_of(db: HashDB) -> dict[str, bytes]:
    return {k: db.get(k)[0] for k in db}


def test_writes_from_another_process_are_seen_by_the_next_query(db):
    mat = random_codes(60, BITS, seed=10)
    db.insert_many([f"p{i}" for i in range(30)], mat[:30])
    q = mat[0].tobytes()
    assert db.knn(q, 1) == [("p0", 0)]  # our index is built now
    before = db.stats()["index_rebuilds"]
    run_child(db.path, [
        ["insert_many", [f"c{i}" for i in range(30)], [row.tobytes().hex() for row in mat[30:]]],
        ["insert", "p1", q.hex(), {"from": "child"}],  # replace one of ours with the query code
        ["delete", "p2"],
        ["delete", "never-there"],
    ])
    expected = {f"p{i}": mat[i].tobytes() for i in range(30)} | {f"c{i}": mat[30 + i].tobytes() for i in range(30)}
    expected["p1"] = q
    del expected["p2"]
    assert db.radius(q, 0) == [("p0", 0), ("p1", 0)]
    for r in (0, 100, 128, BITS):
        assert db.radius(q, r) == brute_radius(expected, q, r)
    assert db.knn(q, 7) == brute_knn(expected, q, 7)
    assert db.get("p1") == (q, {"from": "child"})
    assert len(db) == 59
    assert db.stats()["index_rebuilds"] == before  # caught up by replaying the log, not by a rebuild


def test_child_sees_our_writes_and_we_see_its_answers(db):
    q = b"\x0f" * (BITS // 8)
    db.insert("ours", q)
    (child_answer,) = run_child(db.path, [["radius", q.hex(), 0]])
    assert child_answer == [["ours", 0]]


def test_compaction_keeps_what_a_registered_reader_still_needs(db):
    mat = random_codes(40, BITS, seed=11)
    db.insert_many([f"a{i}" for i in range(20)], mat[:20])
    assert db.radius(mat[0], 0) == [("a0", 0)]  # builds the index and registers our log position
    before = db.stats()
    assert before["readers"] == 1
    run_child(db.path, [
        ["insert", f"b{i}", mat[20 + i].tobytes().hex()] for i in range(20)
    ] + [["compact", True]])
    # The child's writes compacted the log, but only up to our registered position: we can replay.
    expected = {f"a{i}": mat[i].tobytes() for i in range(20)} | {f"b{i}": mat[20 + i].tobytes() for i in range(20)}
    q = mat[25].tobytes()
    assert db.radius(q, 120) == brute_radius(expected, q, 120)
    after = db.stats()
    assert after["index_rebuilds"] == before["index_rebuilds"]
    assert after["log_entries"] <= 21


def test_a_reader_left_behind_by_compaction_rebuilds_and_stays_exact(db):
    mat = random_codes(50, BITS, seed=12)
    db.insert_many([f"a{i}" for i in range(25)], mat[:25])
    assert db.knn(mat[3], 1) == [("a3", 0)]
    rebuilds = db.stats()["index_rebuilds"]
    ops = [["insert", f"b{i}", mat[25 + i].tobytes().hex()] for i in range(25)]
    ops += [["delete", "a3"], ["delete", "b0"], ["compact", False], ["stats"]]
    *_, compacted, child_stats = run_child(db.path, ops)
    assert compacted > 0
    assert child_stats["log_entries"] == 1  # everything but the newest entry is gone
    expected = {f"a{i}": mat[i].tobytes() for i in range(25)} | {f"b{i}": mat[25 + i].tobytes() for i in range(25)}
    del expected["a3"], expected["b0"]
    for qi in (3, 25, 40):
        q = mat[qi].tobytes()
        assert db.radius(q, 110) == brute_radius(expected, q, 110)
        assert db.knn(q, 5) == brute_knn(expected, q, 5)
    assert db.stats()["index_rebuilds"] == rebuilds + 1


def test_dead_readers_are_dropped_from_the_registry(db):
    db.insert("x", b"\x00" * (BITS // 8))
    # The child builds an index (and registers), then dies without closing.
    run_child(db.path, [["radius", "00" * (BITS // 8), 0], ["exit_without_close"]])
    assert db.stats()["readers"] == 1
    db.insert("y", b"\x01" * (BITS // 8))  # every write compacts, which prunes dead readers
    assert db.stats()["readers"] == 0
    assert db.compact_log() >= 0
    assert db.stats()["log_entries"] == 1


_WRITER = r"""
import sys
from hashdb import HashDB
path, prefix, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
with HashDB(path) as db:
    for i in range(n):
        db.insert(f"{prefix}{i:03d}", bytes([i % 256]) * 32)
        if i % 10 == 0:
            db.radius(bytes(32), 3)
"""


def test_concurrent_writers_in_several_processes_lose_nothing(db):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [
        subprocess.Popen([sys.executable, "-c", _WRITER, db.path, prefix, "40"], env=env)
        for prefix in ("x", "y")
    ]
    seen = []
    for i in range(40):
        db.insert(f"z{i:03d}", bytes([i % 256]) * 32)
        seen.append(len(db.radius(bytes(32), 0)))
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert seen == sorted(seen)
    expected = {f"{p}{i:03d}": bytes([i % 256]) * 32 for p in "xyz" for i in range(40)}
    assert records_of(db) == expected
    q = bytes([5]) * 32
    assert db.radius(q, 16) == brute_radius(expected, q, 16)
    assert db.radius(q, 0) == [("x005", 0), ("y005", 0), ("z005", 0)]


def test_a_bulk_load_by_another_process_is_replayed_in_one_step(db):
    db.insert("first", bytes(32))
    assert db.radius(bytes(32), 0) == [("first", 0)]
    mat = random_codes(3000, BITS, seed=13)
    mat[:5] = 0
    run_child(db.path, [["insert_many", [f"m{i:04d}" for i in range(3000)], [r.tobytes().hex() for r in mat]]])
    assert db.radius(bytes(32), 0) == [("first", 0)] + [(f"m{i:04d}", 0) for i in range(5)]
    assert len(db) == 3001
    np.testing.assert_array_equal(np.frombuffer(db.get("m2999")[0], np.uint8), mat[2999])


def test_an_idle_reader_cannot_pin_the_log_without_bound(tmp_path, monkeypatch):
    import hashdb.store.log

    monkeypatch.setattr(hashdb.store.log, "LOG_PIN_BYTES", 1)  # cap = the size of the blocks table
    path = tmp_path / "db"
    idle, writer = HashDB(path, bits=64), HashDB(path)
    mat = random_codes(400, 64, seed=14)
    keys = [f"k{i:03d}" for i in range(400)]
    writer.insert_many(keys, mat)
    assert idle.radius(mat[0], 0) == [("k000", 0)]  # registers idle's position in the log
    rebuilds = idle.stats()["index_rebuilds"]
    for rnd in range(1, 30):  # far more log than table: every round rewrites every code
        writer.insert_many(keys, mat ^ np.uint8(rnd))
    assert writer.stats()["log_entries"] < 29
    expected = {k: (mat[i] ^ np.uint8(29)).tobytes() for i, k in enumerate(keys)}
    q = expected["k007"]
    assert idle.radius(q, 10) == brute_radius(expected, q, 10)
    assert idle.stats()["index_rebuilds"] == rebuilds + 1
    idle.close()
    writer.close()


_BATCHES = r"""
import sys
import numpy as np
from hashdb import HashDB
db = HashDB(sys.argv[1])
rng = np.random.default_rng(0)
for b in range(1000):
    db.insert_many([f"b{b:04d}-{i:04d}" for i in range(2000)], rng.integers(0, 256, (2000, 32), dtype=np.uint8))
    print(b, flush=True)
"""


def test_a_writer_killed_mid_transaction_leaves_only_whole_batches(db):
    import signal

    db.insert("before", bytes(32))
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", _BATCHES, db.path], stdout=subprocess.PIPE, text=True, env=env)
    watchdog = threading.Timer(120, proc.kill)  # a stuck writer must fail the test, not hang it
    watchdog.start()
    try:
        committed = [int(proc.stdout.readline() or -1) for _ in range(3)]
    finally:
        watchdog.cancel()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stdout.close()
    keys = list(db)
    per_batch: dict[str, int] = {}
    for k in keys:
        if k != "before":
            per_batch[k[:5]] = per_batch.get(k[:5], 0) + 1
    assert committed == [0, 1, 2]
    assert set(per_batch.values()) == {2000}  # every batch whole, none partial
    assert len(per_batch) >= 3 and sorted(per_batch) == [f"b{b:04d}" for b in range(len(per_batch))]
    assert db.radius(bytes(32), 0) == [("before", 0)]
    assert len(db) == 1 + 2000 * len(per_batch)
    db.insert("after", bytes(32))  # the killed writer left no lock behind
    assert db.radius(bytes(32), 0) == [("after", 0), ("before", 0)]
