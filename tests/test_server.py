"""The server's contract beyond HashDB's: framing, bad input, ordering, concurrency, lifecycle, durability."""

from __future__ import annotations

import os
import signal
import socket
import stat
import struct
import threading

import msgpack
import numpy as np
import pytest
from frontend_helpers import server_thread, short_socket_path, start_server_process
from hypothesis import given, settings
from hypothesis import strategies as st

import hashdb
from hashdb.db import HashDB
from hashdb.errors import ERROR_TYPES
from hashdb.protocol import OPS
from hashdb.server import Server, parse_request

BITS = 64


def code_of(i: int) -> bytes:
    return int(i).to_bytes(BITS // 8, "big")


@pytest.fixture
def served(tmp_path):
    """(HashDB, socket path) with a server thread running; the db holds keys k0..k9."""
    db = HashDB(str(tmp_path / "db"), bits=BITS)
    db.insert_many([f"k{i}" for i in range(10)], [code_of(i) for i in range(10)])
    path = short_socket_path(tmp_path)
    with server_thread(db, path, max_frame=4096):
        yield db, path
    db.close()


def raw_connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(path)
    return sock


def send_frame(sock: socket.socket, body: bytes) -> None:
    sock.sendall(struct.pack(">I", len(body)) + body)


def read_frame(sock: socket.socket) -> dict | None:
    """One reply, or None if the server closed the connection."""
    header = _read_exactly(sock, 4)
    if header is None:
        return None
    body = _read_exactly(sock, struct.unpack(">I", header)[0])
    assert body is not None
    return msgpack.unpackb(body, raw=False)


def _read_exactly(sock: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def request(sock: socket.socket, **message) -> dict:
    send_frame(sock, msgpack.packb(message))
    reply = read_frame(sock)
    assert reply is not None
    return reply


def test_socket_file_is_private(served):
    _, path = served
    mode = os.stat(path).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600


def test_codes_travel_as_bin_or_hex(served):
    _, path = served
    with raw_connect(path) as sock:
        by_bin = request(sock, id=1, op="radius", code=code_of(3), r=0)
        by_hex = request(sock, id=2, op="radius", code=code_of(3).hex(), r=0)
    assert by_bin == {"id": 1, "ok": [["k3", 0]]}
    assert by_hex == {"id": 2, "ok": [["k3", 0]]}


def test_malformed_frame_gets_an_error_and_the_connection_stays_usable(served):
    _, path = served
    with raw_connect(path) as sock:
        send_frame(sock, b"\xc1\xc1\xc1")  # 0xc1 is never valid msgpack
        reply = read_frame(sock)
        assert reply["id"] is None and reply["error"]["type"] == "ProtocolError"
        assert reply["error"]["message"] != "malformed msgpack frame: "  # says something about the error
        assert request(sock, id=7, op="len") == {"id": 7, "ok": 10}


@pytest.mark.parametrize(
    ("message", "fragment"),
    [
        ({"id": 3, "op": "frobnicate"}, "unknown op"),
        ({"id": 3, "op": "radius", "code": code_of(1)}, "missing r"),
        ({"id": 3, "op": "len", "extra": 1}, "no argument extra"),
        ({"id": 3}, "unknown op"),
    ],
)
def test_bad_requests_get_protocol_errors_with_their_id(served, message, fragment):
    _, path = served
    with raw_connect(path) as sock:
        reply = request(sock, **message)
        assert reply["id"] == 3
        assert reply["error"]["type"] == "ProtocolError"
        assert fragment in reply["error"]["message"]
        assert request(sock, id=4, op="ping")["ok"]["bits"] == BITS


def test_a_request_that_is_not_a_map_is_rejected(served):
    _, path = served
    with raw_connect(path) as sock:
        send_frame(sock, msgpack.packb([1, "len"]))
        assert read_frame(sock)["error"]["type"] == "ProtocolError"


def test_library_errors_keep_their_type_on_the_wire(served):
    _, path = served
    with raw_connect(path) as sock:
        assert request(sock, id=1, op="get", key="nope")["error"]["type"] == "KeyNotFound"
        assert request(sock, id=2, op="radius", code=b"\x00", r=1)["error"]["type"] == "InvalidCode"
        assert request(sock, id=3, op="knn", code=code_of(0), k=-2)["error"]["type"] == "InvalidArgument"


def test_oversized_frame_closes_only_that_connection(served):
    db, path = served
    with raw_connect(path) as bystander, raw_connect(path) as sock:
        sock.sendall(struct.pack(">I", 1 << 30) + b"\x00" * 100)
        reply = read_frame(sock)
        assert reply["error"]["type"] == "ProtocolError" and "exceeds" in reply["error"]["message"]
        assert read_frame(sock) is None  # closed: the rest of that stream cannot be trusted
        assert request(bystander, id=1, op="len") == {"id": 1, "ok": 10}
    assert len(db) == 10


def test_client_refuses_to_send_a_frame_over_the_servers_limit(served):
    _, path = served
    with hashdb.connect(path) as client:
        with pytest.raises(hashdb.ProtocolError, match="frame limit"):
            client.insert_many([f"big{i}" for i in range(1000)], [code_of(i) for i in range(1000)])
        assert len(client) == 10  # nothing sent, connection still in step


def test_garbage_and_half_frames_never_hurt_other_clients(served):
    db, path = served
    rng = np.random.default_rng(0)
    for size in (1, 3, 4, 50, 5000):
        with raw_connect(path) as sock:
            sock.sendall(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
    with raw_connect(path) as sock:
        sock.sendall(struct.pack(">I", 100) + b"\x80" * 10)  # a frame cut short by a disconnect
    with hashdb.connect(path) as client:
        assert len(client) == 10
        assert client.radius(code_of(5), 0) == [("k5", 0)]
    assert sorted(db) == sorted(f"k{i}" for i in range(10))


def test_a_page_of_keys_is_bounded_whatever_the_limit_asked(tmp_path):
    from hashdb.protocol import MAX_KEYS_PAGE

    db = HashDB(str(tmp_path / "db"), bits=BITS)
    keys = [f"p{i:05d}" for i in range(MAX_KEYS_PAGE + 10)]
    db.insert_many(keys, [code_of(i) for i in range(len(keys))])
    path = short_socket_path(tmp_path)
    with server_thread(db, path), raw_connect(path) as sock:
        page = request(sock, id=1, op="keys_after", limit=10**9)["ok"]
        assert page == keys[:MAX_KEYS_PAGE]
        rest = request(sock, id=2, op="keys_after", after=page[-1])["ok"]
        assert rest == keys[MAX_KEYS_PAGE:]
        assert request(sock, id=3, op="keys_after", limit=0)["error"]["type"] == "InvalidArgument"
    db.close()


def test_pipelined_requests_are_answered_in_order_and_see_earlier_writes(served):
    _, path = served
    messages = [
        {"id": 1, "op": "contains", "key": "new"},
        {"id": 2, "op": "insert", "key": "new", "code": code_of(99)},
        {"id": 3, "op": "radius", "code": code_of(99), "r": 0},
        {"id": 4, "op": "delete", "key": "k0"},
        {"id": 5, "op": "len"},
        {"id": 6, "op": "get", "key": "k0"},
    ]
    with raw_connect(path) as sock:
        sock.sendall(b"".join(struct.pack(">I", len(b)) + b for b in map(msgpack.packb, messages)))
        replies = [read_frame(sock) for _ in messages]
    assert [r["id"] for r in replies] == [1, 2, 3, 4, 5, 6]
    assert replies[0]["ok"] is False
    assert replies[2]["ok"] == [["new", 0]]
    assert replies[3]["ok"] is True
    assert replies[4]["ok"] == 10
    assert replies[5]["error"]["type"] == "KeyNotFound"


def test_pipeline_api_returns_results_in_order(served):
    _, path = served
    with hashdb.connect(path) as client:
        pipe = client.pipeline()
        for i in range(200):
            pipe.radius(code_of(i % 10), 0)
        pipe.get("k1").insert("p", code_of(77)).get("missing")
        results = pipe.execute(return_exceptions=True)
        assert results[:200] == [[(f"k{i % 10}", 0)] for i in range(200)]
        assert results[200] == (code_of(1), None)
        assert isinstance(results[202], hashdb.KeyNotFound)
        with pytest.raises(hashdb.KeyNotFound):
            client.pipeline().get("missing").len().execute()
        assert client.get("p") == (code_of(77), None)  # still in step after a failed pipeline


def test_large_pipeline_does_not_deadlock_on_full_socket_buffers(served):
    _, path = served
    with hashdb.connect(path) as client:
        pipe = client.pipeline()
        for _ in range(5000):  # ~0.5 MB of replies each way: more than both socket buffers
            pipe.radius(code_of(0), BITS)
        results = pipe.execute()
    assert len(results) == 5000 and all(len(r) == 10 for r in results)


def test_concurrent_clients_writing_and_reading(served):
    db, path = served
    errors: list[BaseException] = []

    def worker(w: int) -> None:
        try:
            with hashdb.connect(path) as client:
                for i in range(40):
                    client.insert(f"w{w}-{i}", code_of(1000 + w * 100 + i))
                    assert client.radius(code_of(1000 + w * 100 + i), 0) == [(f"w{w}-{i}", 0)]
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(db) == 10 + 6 * 40


def test_one_client_shared_by_threads(served):
    _, path = served
    with hashdb.connect(path) as client:
        results: list[list] = [[] for _ in range(4)]

        def worker(w: int) -> None:
            for i in range(50):
                results[w].append(client.radius(code_of((w + i) % 10), 0))

        threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    for w in range(4):
        assert results[w] == [[(f"k{(w + i) % 10}", 0)] for i in range(50)]


def test_refuses_to_start_over_a_live_server(served, tmp_path):
    db, path = served
    second = Server(db, path)
    with pytest.raises(hashdb.ServerError, match="already running"):
        second.bind()
    with hashdb.connect(path) as client:  # the first one is untouched
        assert len(client) == 10


def test_stale_socket_is_replaced_but_other_files_are_not(tmp_path):
    db = HashDB(str(tmp_path / "db"), bits=BITS)
    path = short_socket_path(tmp_path)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens: what a killed server leaves behind
    with server_thread(db, path), hashdb.connect(path) as client:
        assert client.ping()["bits"] == BITS
    assert not os.path.exists(path)  # removed on shutdown
    other = short_socket_path(tmp_path, "plain.txt")
    with open(other, "w") as f:
        f.write("not a socket")
    with pytest.raises(hashdb.ServerError, match="not a socket"):
        Server(db, other).bind()
    assert open(other).read() == "not a socket"
    db.close()


def test_connect_to_nothing_is_a_server_error(tmp_path):
    with pytest.raises(hashdb.ServerError, match="no hashdb server"):
        hashdb.connect(short_socket_path(tmp_path, "none.sock"))


def test_sigterm_answers_in_flight_requests_and_cleans_up(tmp_path):
    db_path, sock_path = str(tmp_path / "db"), short_socket_path(tmp_path)
    proc = start_server_process(db_path, sock_path, "--bits", str(BITS))
    try:
        with hashdb.connect(sock_path) as client:
            client.insert_many([f"s{i}" for i in range(100)], [code_of(i) for i in range(100)])
        sock = raw_connect(sock_path)
        frames = [msgpack.packb({"id": i, "op": "radius", "code": code_of(i), "r": 0}) for i in range(300)]
        sock.sendall(b"".join(struct.pack(">I", len(b)) + b for b in frames))
        proc.send_signal(signal.SIGTERM)
        replies = [read_frame(sock) for _ in frames]
        sock.close()
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert [r["id"] for r in replies] == list(range(300))
    assert replies[42]["ok"] == [["s42", 0]]
    assert not os.path.exists(sock_path)
    log = proc.stderr.read().decode()
    assert "serving" in log and "stopped" in log
    with HashDB(db_path, bits=None) as db:  # closed cleanly, everything there
        assert len(db) == 100


def test_writes_are_durable_before_the_reply(tmp_path):
    db_path, sock_path = str(tmp_path / "db"), short_socket_path(tmp_path)
    proc = start_server_process(db_path, sock_path, "--bits", str(BITS))
    try:
        with hashdb.connect(sock_path) as client:
            client.insert("durable", code_of(5), {"n": 1})
            assert client.delete("durable") is True
            client.insert("durable", code_of(6), {"n": 2})
        proc.send_signal(signal.SIGKILL)  # no chance to flush anything after the reply
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    with HashDB(db_path, bits=None) as db:
        assert db.get("durable") == (code_of(6), {"n": 2})


def test_inserts_grouped_into_one_commit_keep_their_own_results(tmp_path):
    db = HashDB(str(tmp_path / "db"), bits=BITS)
    server = Server(db, short_socket_path(tmp_path))
    good = parse_request({"id": 1, "op": "insert", "key": "a", "code": code_of(1), "meta": {"m": 1}})
    bad = parse_request({"id": 2, "op": "insert", "key": "", "code": code_of(2)})
    other = parse_request({"id": 3, "op": "insert", "key": "c", "code": code_of(3).hex()})
    results = server.run_writes([good, bad, other])
    assert results[0] == ("ok", None) and results[2] == ("ok", None)
    assert results[1][0] == "error" and isinstance(results[1][1], hashdb.InvalidKey)
    assert db.get("a") == (code_of(1), {"m": 1}) and db.get("c") == (code_of(3), None)
    assert server.run_writes([parse_request({"id": 4, "op": "insert", "key": "d", "code": code_of(4)}),
                              parse_request({"id": 5, "op": "insert", "key": "e", "code": code_of(5)})]) == [
        ("ok", None), ("ok", None)]  # fmt: skip
    assert len(db) == 4
    db.close()


def test_many_clients_inserting_at_once_all_land(tmp_path):
    db = HashDB(str(tmp_path / "db"), bits=BITS)
    path = short_socket_path(tmp_path)
    errors: list[BaseException] = []

    def writer(w: int) -> None:
        try:
            with hashdb.connect(path) as client:
                for i in range(15):
                    assert client.insert(f"c{w}-{i}", code_of(w * 100 + i), {"w": w}) is None
                if w == 0:
                    client.insert("", code_of(0))
        except hashdb.InvalidKey:
            pass  # the one bad insert: it must fail alone
        except BaseException as e:  # reported below
            errors.append(e)

    with server_thread(db, path):
        threads = [threading.Thread(target=writer, args=(w,)) for w in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert not errors, errors
    assert len(db) == 12 * 15
    assert db.get("c7-3") == (code_of(703), {"w": 7})
    db.close()


_values = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1), st.floats(allow_nan=False),
    st.text(max_size=12), st.binary(max_size=12), st.just(code_of(3)), st.just(code_of(3).hex()),
    st.lists(st.one_of(st.text(max_size=4), st.binary(min_size=8, max_size=8)), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(min_value=-(2**63), max_value=2**63), max_size=2),
)  # fmt: skip


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    db = HashDB(str(tmp / "db"), bits=BITS)
    db.insert_many([f"k{i}" for i in range(10)], [code_of(i) for i in range(10)])
    path = short_socket_path(tmp)
    with server_thread(db, path):
        yield db, path
    db.close()


@settings(max_examples=150, deadline=None)
@given(
    op=st.sampled_from([*OPS, "bogus"]),
    args=st.dictionaries(st.sampled_from(["key", "code", "meta", "keys", "codes", "metas", "r", "k", "force", "x"]),
                         _values, max_size=4),
)  # fmt: skip
def test_any_request_gets_a_typed_reply_and_the_server_lives_on(fuzz_target, op, args):
    db, path = fuzz_target
    with raw_connect(path) as sock:
        reply = request(sock, id=11, op=op, **args)
        assert reply["id"] == 11
        assert ("ok" in reply) != ("error" in reply)
        if "error" in reply:
            assert reply["error"]["type"] in ERROR_TYPES
        assert request(sock, id=12, op="ping")["ok"]["bits"] == BITS
    assert db.get("k3") == (code_of(3), None) or op in ("insert", "insert_many", "delete")


def test_serve_with_an_impossible_socket_path_creates_no_database(tmp_path):
    from hashdb.server import serve

    for sock in (str(tmp_path / "no" / "such" / "dir" / "s.sock"), "/tmp/" + "y" * 120 + ".sock"):
        with pytest.raises(hashdb.ServerError, match="cannot create socket"):
            serve(str(tmp_path / "db"), sock, bits=BITS, install_signals=False)
        assert not (tmp_path / "db").exists()


@settings(max_examples=200, deadline=None)
@given(bodies=st.lists(st.binary(max_size=300), max_size=8), cuts=st.lists(st.integers(0, 3000), max_size=6))
def test_frame_reader_returns_the_same_frames_however_the_stream_is_cut(bodies, cuts):
    from hashdb.protocol import FrameReader, encode_frame

    stream = b"".join(encode_frame(b) for b in bodies)
    points = sorted({0, len(stream), *(c for c in cuts if c < len(stream))})
    reader = FrameReader(max_frame=300)
    got: list = []
    for a, b in zip(points, points[1:], strict=False):
        got.extend(reader.feed(stream[a:b]))
    assert [bytes(g) for g in got] == bodies  # earlier bodies stay valid after later feeds
    assert reader.buffered == 0 and reader.too_big is None


def test_frame_reader_stops_at_a_frame_over_the_limit():
    from hashdb.protocol import FrameReader, encode_frame

    reader = FrameReader(max_frame=10)
    stream = encode_frame(b"ok") + encode_frame(b"x" * 11) + encode_frame(b"no")
    assert [bytes(b) for b in reader.feed(stream)] == [b"ok"]
    assert reader.too_big == 11 and reader.feed(encode_frame(b"later")) == []
