"""Hostile clients (issue 17): what one connection may make the server spend, and what it may hold up."""

from __future__ import annotations

import threading
import time

from frontend_helpers import frames, raw_connect, read_reply, server_thread, short_socket_path

import hashdb.server as server_module
from hashdb.db import HashDB
from hashdb.protocol import RECV_SIZE

BITS = 64
PEAKS: dict[str, int] = {}  # bytes held per attack (README's reliability table)


class _Recording:
    """A HashDB that records which thread ran each radius query."""

    def __init__(self, db: HashDB) -> None:
        self._db = db
        self.threads: list[str] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self._db, name)

    def __len__(self) -> int:
        return len(self._db)

    def radius(self, *args: object, **kwargs: object) -> object:
        self.threads.append(threading.current_thread().name)
        return self._db.radius(*args, **kwargs)

    def radius_many(self, *args: object, **kwargs: object) -> object:
        self.threads.append(threading.current_thread().name)
        return self._db.radius_many(*args, **kwargs)


def test_forced_plans_run_on_reader_threads_not_the_loop(tmp_path) -> None:
    # radius with force="bktree" built the tree on the loop thread: a 7.2 s stall for every client at 1M codes
    db = HashDB(str(tmp_path / "db"), bits=BITS, durable=False)
    db.insert_many([f"k{i}" for i in range(50)], [(i * 0x01010101).to_bytes(8, "big") for i in range(50)])
    recording = _Recording(db)
    with server_thread(recording, short_socket_path(tmp_path)) as server:
        sock = raw_connect(server.path)
        code = (7 * 0x01010101).to_bytes(8, "big")
        plans = ["bktree", "scan", "mih"]
        sock.sendall(frames(*({"id": i, "op": "radius", "code": code, "r": 2, "force": plan}
                              for i, plan in enumerate(plans))))  # fmt: skip
        for i in range(len(plans)):
            reply = read_reply(sock)
            assert reply["id"] == i and [k for k, _ in reply["ok"]] == ["k7"]
        sock.sendall(frames({"id": 9, "op": "radius", "code": code, "r": 2}))  # unforced and cheap: on the loop
        assert read_reply(sock)["id"] == 9
        sock.close()
    assert all(name.startswith("hashdb-reader") for name in recording.threads[:3]), recording.threads
    assert not recording.threads[3].startswith("hashdb-reader")
    db.close()


class _Slow(_Recording):
    """Radius queries with force="scan" take ``delay`` seconds (a stand-in for a huge query)."""

    def __init__(self, db: HashDB, delay: float) -> None:
        super().__init__(db)
        self.delay = delay
        self.started = threading.Event()

    def radius(self, *args: object, **kwargs: object) -> object:
        if kwargs.get("force") == "scan":
            self.started.set()
            time.sleep(self.delay)
        return super().radius(*args, **kwargs)


def _small_db(tmp_path) -> HashDB:  # type: ignore[no-untyped-def]
    db = HashDB(str(tmp_path / "db"), bits=BITS, durable=False)
    db.insert_many([f"k{i}" for i in range(20)], [(i * 0x01010101).to_bytes(8, "big") for i in range(20)])
    return db


def test_stalled_partial_frames_are_bounded_in_total_and_dropped_when_idle(tmp_path, monkeypatch) -> None:
    """Connections stalling one byte short of a whole frame held a frame each with no bound (100 x 16 MiB:
    1.84 GB, and the server died under a 3 GB cap): past MAX_HELD_TOTAL they are not read, other clients are
    still answered, and an idle partial frame is dropped after PARTIAL_FRAME_TIMEOUT_S."""
    monkeypatch.setattr(server_module, "MAX_HELD_TOTAL", 4 << 20)
    monkeypatch.setattr(server_module, "PARTIAL_FRAME_TIMEOUT_S", 1.0)
    db = _small_db(tmp_path)
    frame = 1 << 20
    with server_thread(db, short_socket_path(tmp_path), max_frame=frame) as server:
        stalled = []
        for _ in range(20):
            sock = raw_connect(server.path, timeout=5)
            sock.setblocking(False)
            data = memoryview((frame).to_bytes(4, "big") + b"\x00" * (frame - 1))
            try:
                while data:
                    data = data[sock.send(data) :]
            except BlockingIOError:
                pass  # the server stopped reading it (or the kernel buffer is full): the bound at work
            stalled.append(sock)
        time.sleep(0.3)
        held = server._held
        PEAKS["held by 20 stalled 1 MiB frames"] = held
        assert held <= (4 << 20) + 20 * RECV_SIZE, held  # without the bound: 20 MiB
        other = raw_connect(server.path)
        start = time.monotonic()
        other.sendall(frames({"id": 1, "op": "ping"}))
        assert read_reply(other)["ok"]["bits"] == BITS and time.monotonic() - start < 1
        deadline = time.monotonic() + 10
        while server._held and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server._held == 0 and not [c for c in server._conns.values() if c.reader.buffered]
        for sock in stalled:  # each was closed by the server
            sock.settimeout(5)
            try:
                assert sock.recv(1 << 20) == b""
            except ConnectionResetError:
                pass
            sock.close()
        other.sendall(frames({"id": 2, "op": "len"}))
        assert read_reply(other)["ok"] == 20
        other.close()
    db.close()


def test_queued_requests_wait_as_bytes_not_objects(tmp_path) -> None:
    """Frames queued behind a slow request stay undecoded (a 16.8 MB frame of 5.5M tiny strings decoded to
    390 MB while it waited); each is decoded when it starts, and all are answered in order."""
    import msgpack

    db = _small_db(tmp_path)
    slow = _Slow(db, 1.0)
    with server_thread(slow, short_socket_path(tmp_path)) as server:
        sock = raw_connect(server.path)
        code = (3 * 0x01010101).to_bytes(8, "big")
        tiny = msgpack.packb({"id": ["x"] * 200_000, "op": "len"})
        sock.sendall(frames({"id": 0, "op": "radius", "code": code, "r": 0, "force": "scan"}))
        assert slow.started.wait(5)
        sock.sendall(b"".join(len(tiny).to_bytes(4, "big") + tiny for _ in range(8)))
        time.sleep(0.3)
        (conn,) = server._conns.values()
        assert len(conn.pending) == 8 and all(isinstance(p, bytes | bytearray | memoryview) for p in conn.pending)
        assert server._held == 8 * len(tiny)
        assert read_reply(sock)["id"] == 0
        for _ in range(8):
            assert read_reply(sock)["ok"] == 20
        sock.close()
    db.close()


def test_sigterm_finishes_within_its_grace_while_a_reader_is_busy(tmp_path, monkeypatch) -> None:
    # a reader busy with one long query held shutdown for over 2 minutes
    monkeypatch.setattr(server_module, "SHUTDOWN_GRACE_S", 1.0)
    db = _small_db(tmp_path)
    slow = _Slow(db, 30.0)
    server = server_module.Server(slow, short_socket_path(tmp_path))
    server.bind()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    assert server.ready.wait(10)
    sock = raw_connect(server.path)
    sock.sendall(frames({"id": 0, "op": "radius", "code": bytes(8), "r": 0, "force": "scan"}))
    assert slow.started.wait(5)
    start = time.monotonic()
    server.shutdown()
    thread.join(10)
    assert not thread.is_alive() and time.monotonic() - start < 5
    sock.close()
    db.close()  # the reader, when its query returns, gets StorageError and nobody to answer


def test_whole_frames_queued_on_many_connections_are_bounded_in_total(tmp_path, monkeypatch) -> None:
    """Whole frames pipelined behind slow requests on many connections count against MAX_HELD_TOTAL too: past
    it, connections holding any are not read until their requests start; every request is still answered
    (here each with an error: "pad" is no argument of len)."""
    import msgpack

    monkeypatch.setattr(server_module, "MAX_HELD_TOTAL", 2 << 20)
    db = _small_db(tmp_path)
    slow = _Slow(db, 2.0)  # longer than the measurement below: nothing queued starts during it
    pad = RECV_SIZE // 4 - 4 - len(msgpack.packb({"id": "x" * 1000, "op": "len", "pad": b"\0" * 60_000})) + 60_000
    body = msgpack.packb({"id": "x" * 1000, "op": "len", "pad": b"\0" * pad})
    assert len(body) + 4 == RECV_SIZE // 4  # frames end where reads end: no partial frame is ever held
    with server_thread(slow, short_socket_path(tmp_path)) as server:
        socks = [raw_connect(server.path) for _ in range(4)]
        for sock in socks:
            sock.sendall(frames({"id": -1, "op": "radius", "code": bytes(8), "r": 0, "force": "scan"}))
        queued = (len(body).to_bytes(4, "big") + body) * 16
        senders = [threading.Thread(target=sock.sendall, args=(queued,)) for sock in socks]
        for sender in senders:
            sender.start()
        peak = 0
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            peak = max(peak, server._held)
            time.sleep(0.005)
        PEAKS["held by 4 connections queueing 1 MiB each"] = peak
        assert peak <= (2 << 20) + 4 * RECV_SIZE, peak  # without the bound: 4 MiB
        for sock in socks:
            assert read_reply(sock)["id"] == -1
            replies = [read_reply(sock) for _ in range(16)]
            assert all(r["error"]["type"] == "ProtocolError" and r["id"] == "x" * 1000 for r in replies)
            sock.close()
        for sender in senders:
            sender.join(10)
    db.close()
