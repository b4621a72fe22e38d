"""Hostile clients (issue 17): what one connection may make the server spend, and what it may hold up."""

from __future__ import annotations

import threading

from frontend_helpers import frames, raw_connect, read_reply, server_thread, short_socket_path

from hashdb.db import HashDB

BITS = 64


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
