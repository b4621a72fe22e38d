"""One bad request, a hostile client or a missing resource never takes the server down (issue 10).

Each defect test failed against the server before its fix: pipelined reads with a malformed code crashed
the loop, an exception in a group commit or a full disk killed the writer thread for good, a client that
never reads made the server build every reply, and running out of file descriptors made it spin.
"""

from __future__ import annotations

import os
import resource
import signal
import threading
import time

import numpy as np
import pytest
from frontend_helpers import (
    frames,
    process_cpu_s,
    process_rss,
    raw_connect,
    read_reply,
    server_thread,
    short_socket_path,
    start_server_process,
    stop_process,
)

import hashdb
from hashdb.db import HashDB
from hashdb.errors import ERROR_TYPES
from hashdb.server import Server, parse_request

BITS = 64


def code_of(i: int) -> bytes:
    return int(i).to_bytes(BITS // 8, "big")


@pytest.fixture
def served(tmp_path):
    db = HashDB(str(tmp_path / "db"), bits=BITS)
    db.insert_many([f"k{i}" for i in range(10)], [code_of(i) for i in range(10)])
    path = short_socket_path(tmp_path)
    with server_thread(db, path) as server:
        yield db, path, server
    db.close()


def workers_alive(server: Server) -> bool:
    return all(worker.is_alive() for worker in server._workers)


# -- 1: a malformed code among batched reads ------------------------------------------------------------


@pytest.mark.parametrize("bad_code", [[[1], [1, 2]], [1, "x"], {"a": 1}, 3.5])
def test_pipelined_radius_with_a_malformed_code_gets_an_error_and_the_server_lives(served, bad_code):
    db, path, server = served
    with raw_connect(path) as sock, raw_connect(path) as other:
        sock.sendall(
            frames(
                {"id": 1, "op": "radius", "code": bad_code, "r": 1},
                {"id": 2, "op": "radius", "code": code_of(3), "r": 0},
                {"id": 3, "op": "radius", "code": code_of(4), "r": 0},
            )
        )
        replies = [read_reply(sock) for _ in range(3)]
        assert [r["id"] for r in replies] == [1, 2, 3]
        assert replies[0]["error"]["type"] in ERROR_TYPES
        assert replies[1]["ok"] == [["k3", 0]] and replies[2]["ok"] == [["k4", 0]]
        other.sendall(frames({"id": 9, "op": "ping"}))
        assert read_reply(other)["ok"]["bits"] == BITS
    assert len(db) == 10


# -- 2: the writer thread survives anything -------------------------------------------------------------


def test_a_malformed_insert_in_a_group_commit_gets_its_own_error(tmp_path):
    db = HashDB(str(tmp_path / "db"), bits=BITS)
    server = Server(db, short_socket_path(tmp_path))
    group = [
        parse_request({"id": 1, "op": "insert", "key": "a", "code": code_of(1)}),
        parse_request({"id": 2, "op": "insert", "key": "b", "code": [[1], [1, 2]]}),  # ValueError in numpy
        parse_request({"id": 3, "op": "insert", "key": "c", "code": code_of(3), "meta": {"m": 1}}),
        parse_request({"id": 4, "op": "delete", "key": "a"}),
        parse_request({"id": 5, "op": "insert", "key": "a", "code": code_of(5)}),
    ]
    results = server.run_writes(group)
    assert [kind for kind, _ in results] == ["ok", "error", "ok", "ok", "ok"]
    assert results[3] == ("ok", True)
    assert db.get("a") == (code_of(5), None) and db.get("c") == (code_of(3), {"m": 1})
    assert "b" not in db and len(db) == 2
    db.close()


def test_write_batch_runs_adjacent_inserts_as_one_commit_last_write_winning(tmp_path):
    with HashDB(str(tmp_path / "db"), bits=BITS) as db:
        seq = db.stats()["log_seq"]
        ops = [("insert", {"key": "x", "code": code_of(i), "meta": {"i": i}}) for i in range(5)]
        ops.append(("insert", {"key": "y", "code": code_of(9)}))
        assert db.write_batch(ops) == [None] * 6
        assert db.stats()["log_seq"] == seq + 1  # one transaction
        assert db.get("x") == (code_of(4), {"i": 4}) and db.get("y") == (code_of(9), None)
        results = db.write_batch(
            [
                ("insert", {"key": "", "code": code_of(1)}),
                ("frobnicate", {}),
                ("delete", {"key": "x", "extra": 1}),
                ("delete_many", {"keys": ["x", "q"]}),
            ]
        )
        assert isinstance(results[0], hashdb.InvalidKey) and isinstance(results[1], hashdb.InvalidArgument)
        assert isinstance(results[2], hashdb.InvalidArgument) and results[3] == 1
        assert list(db) == ["y"]


def test_writer_keeps_serving_after_a_group_with_a_malformed_insert(served):
    db, path, server = served
    big = [f"big{i}" for i in range(100_000)]
    with raw_connect(path) as slow:
        # A large insert_many keeps the writer busy while the inserts queue up behind it as one group.
        codes_big = [code_of(i) for i in range(len(big))]
        slow.sendall(frames({"id": 1, "op": "insert_many", "keys": big, "codes": codes_big}))
        socks = [raw_connect(path) for _ in range(4)]
        time.sleep(0.05)
        codes: list = [code_of(100), [[1], [1, 2]], code_of(102), code_of(103)]
        for i, (sock, code) in enumerate(zip(socks, codes, strict=True)):
            sock.sendall(frames({"id": 10 + i, "op": "insert", "key": f"g{i}", "code": code}))
        assert read_reply(slow) == {"id": 1, "ok": len(big)}
        replies = [read_reply(sock) for sock in socks]
        for sock in socks:
            sock.close()
    assert "ok" in replies[0] and "error" in replies[1] and "ok" in replies[2] and "ok" in replies[3]
    assert workers_alive(server)
    with hashdb.connect(path, timeout=30) as client:
        client.insert("after", code_of(7))
        assert client.get("after") == (code_of(7), None)
    assert "g1" not in db and db.get("g2") == (code_of(102), None)


def _limit_file_size(limit: int):
    def preexec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    return preexec


def _db_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, name)) for name in os.listdir(path))


def test_full_disk_writes_fail_with_an_error_reply_and_resume_when_space_is_back(tmp_path):
    db_path, sock_path = str(tmp_path / "db"), short_socket_path(tmp_path)
    with HashDB(db_path, bits=BITS) as db:
        db.insert_many([f"k{i}" for i in range(100)], [code_of(i) for i in range(100)])
    # The database files may not grow beyond 64 KiB more (RLIMIT_FSIZE: what a full small disk does).
    limit = _db_bytes(db_path) + 64 * 1024
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log_file:
        proc = start_server_process(db_path, sock_path, stderr=log_file, preexec_fn=_limit_file_size(limit))
    try:
        big_meta = {"blob": b"\x00" * 100_000}  # each insert alone is more than the room left
        with raw_connect(sock_path) as slow:
            slow.sendall(frames({"id": 1, "op": "insert_many", "keys": [f"n{i}" for i in range(20_000)],
                                 "codes": [code_of(i) for i in range(20_000)]}))  # fmt: skip
            socks = [raw_connect(sock_path) for _ in range(4)]
            for i, sock in enumerate(socks):
                message = {"id": 10 + i, "op": "insert", "key": f"m{i}", "code": code_of(i), "meta": big_meta}
                sock.sendall(frames(message))
            first = read_reply(slow)
            replies = [read_reply(sock) for sock in socks]
            for sock in socks:
                sock.close()
        assert first["error"]["type"] == "StorageError"
        assert all(r["error"]["type"] == "StorageError" for r in replies), replies
        with hashdb.connect(sock_path, timeout=30) as client:
            assert len(client) == 100 and client.get("k5") == (code_of(5), None)  # reads go on
            with pytest.raises(hashdb.StorageError):
                client.insert("m0", code_of(0), big_meta)
            resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
            assert client.insert_many([f"n{i}" for i in range(20_000)], [code_of(i) for i in range(20_000)]) == 20_000
            client.insert("m0", code_of(0), big_meta)
            assert len(client) == 20_101
        assert stop_process(proc, signal.SIGTERM, timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    log = log_path.read_text()
    assert "gave up" not in log and "Exception in thread" not in log, log
    with HashDB(db_path, bits=None) as db:
        assert len(db) == 20_101 and db.get("m0")[1] == big_meta


# -- 3: a client that never reads -----------------------------------------------------------------------


def _wait_quiet(pid: int, timeout: float = 60) -> None:
    """Until the process stops using CPU (its work is done or stalled on backpressure)."""
    deadline = time.monotonic() + timeout
    last = process_cpu_s(pid)
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = process_cpu_s(pid)
        if now - last < 0.03:
            return
        last = now


def test_a_client_that_never_reads_costs_bounded_memory_and_others_are_served(tmp_path):
    n = 30_000
    db_path, sock_path = str(tmp_path / "db"), short_socket_path(tmp_path)
    with HashDB(db_path, bits=BITS) as db:
        codes = np.random.default_rng(1).integers(0, 256, size=(n, BITS // 8), dtype=np.uint8)
        db.insert_many([f"{i:05d}-{'k' * 40}" for i in range(n)], codes)  # long keys: ~1.4 MB a full reply
    proc = start_server_process(db_path, sock_path)
    try:
        with hashdb.connect(sock_path, timeout=60) as client:
            assert len(client.radius(codes[0], BITS)) == n  # builds the index
            _wait_quiet(proc.pid)
            before = process_rss(proc.pid)
            hostile = raw_connect(sock_path)
            # 100 replies of the whole database: ~140 MB if all were built. A 4 KB write, never read.
            hostile.sendall(frames(*({"id": i, "op": "radius", "code": codes[i].tobytes(), "r": BITS}
                                     for i in range(100))))  # fmt: skip
            time.sleep(0.5)
            t0 = time.perf_counter()
            assert client.ping()["bits"] == BITS
            ping_s = time.perf_counter() - t0
            assert client.get(f"00007-{'k' * 40}") == (codes[7].tobytes(), None)
            _wait_quiet(proc.pid)
            grown = process_rss(proc.pid) - before
            print(f"\nnever-reading client: server RSS +{grown / 2**20:.1f} MiB; a ping took {ping_s * 1e3:.1f} ms")
            assert grown < 64 * 2**20, f"server RSS grew by {grown / 2**20:.0f} MiB"
            hostile.close()
            assert client.radius(codes[3], 0) == [(f"00003-{'k' * 40}", 0)]
        assert stop_process(proc) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def test_a_huge_radius_many_is_refused_before_it_is_all_computed(served, monkeypatch):
    from hashdb import dispatch

    monkeypatch.setattr(dispatch, "MAX_REPLY_MATCHES", 200)
    db, path, _ = served
    with hashdb.connect(path, timeout=30) as client:
        with pytest.raises(hashdb.ProtocolError, match="more than 200 matches"):
            client.radius_many([code_of(i % 10) for i in range(100)], BITS)  # 1000 matches
        assert client.radius_many([code_of(1)] * 10, BITS) == [db.radius(code_of(1), BITS)] * 10


# -- 4: out of file descriptors ------------------------------------------------------------------------


def test_out_of_file_descriptors_the_server_backs_off_and_recovers(tmp_path):
    db_path, sock_path = str(tmp_path / "db"), short_socket_path(tmp_path)
    with HashDB(db_path, bits=BITS) as db:
        db.insert_many([f"k{i}" for i in range(10)], [code_of(i) for i in range(10)])

    def few_fds() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log_file:
        proc = start_server_process(db_path, sock_path, stderr=log_file, preexec_fn=few_fds)
    socks = []
    try:
        for _ in range(100):  # more than the server can hold open: the rest wait in the backlog
            socks.append(raw_connect(sock_path))
        time.sleep(0.5)
        cpu0, t0 = process_cpu_s(proc.pid), time.monotonic()
        time.sleep(3)
        cpu = process_cpu_s(proc.pid) - cpu0
        wall = time.monotonic() - t0
        for sock in socks:
            sock.close()
        socks.clear()
        with hashdb.connect(sock_path, timeout=30) as client:  # accepting again once fds are free
            assert len(client) == 10
        assert stop_process(proc) == 0
    finally:
        for sock in socks:
            sock.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    failures = [line for line in log_path.read_text().splitlines() if "accept failed" in line]
    print(f"\nout of fds: server CPU {cpu:.2f} s in {wall:.1f} s; {len(failures)} accept-failure log lines")
    assert 1 <= len(failures) <= 3, failures[:5]
    assert cpu < 0.5 * wall, f"server used {cpu:.2f} s of CPU in {wall:.1f} s while out of descriptors"


def test_sigterm_with_writes_in_flight_does_not_wait_its_grace(tmp_path):
    """Shutdown answers the queued writes (the writer is alive) and exits without the grace timeout."""
    db = HashDB(str(tmp_path / "db"), bits=BITS)
    path = short_socket_path(tmp_path)
    server = Server(db, path)
    server.bind()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    assert server.ready.wait(10)
    with raw_connect(path) as sock:
        sock.sendall(frames({"id": 1, "op": "insert", "key": "a", "code": [[1], [1, 2]]},
                            {"id": 2, "op": "insert", "key": "b", "code": code_of(2)}))  # fmt: skip
        server.shutdown()
        replies = [read_reply(sock), read_reply(sock)]
    thread.join(20)
    assert not thread.is_alive()
    assert "error" in replies[0] and replies[1] == {"id": 2, "ok": None}
    with HashDB(str(tmp_path / "db"), bits=None) as again:
        assert list(again) == ["b"]
    db.close()
