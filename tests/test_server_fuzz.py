"""Random pipelined frames at a live server: good and malformed reads and writes, garbage, in one write.

Every well-framed request gets exactly one reply, in order; every read agrees with a model of what was
acknowledged (brute force for radius); a rejected write leaves no trace; afterwards the server answers
ping and the database holds exactly the model. Frame counts per category are printed (pytest -s).
"""

from __future__ import annotations

import collections
import socket

import msgpack
import pytest
from frontend_helpers import frames, raw_connect, read_reply, server_thread, short_socket_path
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hashdb.codes import hamming
from hashdb.db import HashDB
from hashdb.errors import ERROR_TYPES
from hashdb.protocol import encode_frame

BITS = 64
NB = BITS // 8
INITIAL = {f"k{i}": (int(i * 0x0101010101).to_bytes(NB, "big"), None) for i in range(12)}
COUNTS: collections.Counter[str] = collections.Counter()


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    db = HashDB(str(tmp / "db"), bits=BITS, durable=False)  # durability is not under test here: speed is
    db.insert_many(list(INITIAL), [code for code, _ in INITIAL.values()])
    model = dict(INITIAL)
    path = short_socket_path(tmp)
    with server_thread(db, path):
        yield db, path, model
    db.close()
    print("\nframes fuzzed per category: " + ", ".join(f"{k} {v}" for k, v in sorted(COUNTS.items())))


_keys = st.sampled_from([*INITIAL, "f0", "f1", "f2", "f3", "absent"])
_codes = st.one_of(
    st.binary(min_size=NB, max_size=NB),
    st.sampled_from([code for code, _ in INITIAL.values()]),
    st.binary(min_size=NB, max_size=NB).map(bytes.hex),
)
_metas = st.one_of(st.none(), st.fixed_dictionaries({"n": st.integers(-5, 5)}))
_bad_codes = st.sampled_from([[[1], [1, 2]], [1, "x"], {"a": 1}, 3.5, b"\x00", "zz" * NB, None, [], True])
# Not a list of valid codes (an empty list is valid: it gets an empty answer).
_bad_code_lists = st.one_of(_bad_codes.filter(bool), st.lists(_bad_codes, min_size=1, max_size=2))
_bad_keys = st.sampled_from(["", 7, None, b"bytes", "x" * 600, ["k1"]])


def request(op: str, **args: st.SearchStrategy) -> st.SearchStrategy:
    return st.fixed_dictionaries({"op": st.just(op), **args})


good_reads = st.one_of(
    request("radius", code=_codes, r=st.integers(0, BITS)),
    request("radius_many", codes=st.lists(_codes, max_size=3), r=st.integers(0, 12)),
    request("knn", code=_codes, k=st.integers(1, 20)),
    request("get", key=_keys),
    request("contains", key=_keys),
    st.fixed_dictionaries({"op": st.sampled_from(["len", "ping"])}),
    request("keys_after", after=st.one_of(st.none(), _keys), limit=st.integers(1, 30)),
)  # fmt: skip
good_writes = st.one_of(
    request("insert", key=_keys, code=_codes, meta=_metas),
    request("delete", key=_keys),
    st.lists(st.tuples(_keys, _codes), min_size=1, max_size=4).map(
        lambda kc: {"op": "insert_many", "keys": [k for k, _ in kc], "codes": [c for _, c in kc]}
    ),
)
bad_requests = st.one_of(
    request("radius", code=_bad_codes, r=st.integers(0, 8)),
    request("radius", code=_codes, r=st.sampled_from([-1, "8", 2.5, None, -(2**63)])),
    request("radius_many", codes=_bad_code_lists, r=st.just(1)),
    request("knn", code=_codes, k=st.sampled_from([0, -3, "2", None])),
    request("insert", key=_keys, code=_bad_codes),
    request("insert", key=_bad_keys, code=_codes),
    request("insert", key=_keys, code=_codes, meta=st.sampled_from([1, "m", [1]])),
    request("insert_many", keys=st.lists(_keys, min_size=1, max_size=3), codes=st.just([[[1], [1, 2]]])),
    request("insert_many", keys=st.lists(_keys, min_size=2, max_size=3), codes=st.lists(_codes, max_size=1)),
    request("delete", key=_bad_keys),
    st.fixed_dictionaries({"op": st.sampled_from(["bogus", "", "__init__", "close", "compact_log"])}),
    request("get"),
    request("len", extra=st.integers(-(2**63), 2**63 - 1)),
)  # fmt: skip
# Bodies that are not a request map at all (framed, so the stream stays in step).
bad_bodies = st.one_of(
    st.just(b"\xc1"), st.binary(min_size=1, max_size=20).filter(lambda b: b[0] >= 0xC4),
    st.sampled_from([msgpack.packb([1, 2]), msgpack.packb("radius"), msgpack.packb(None), b""]),
)  # fmt: skip

items = st.one_of(
    good_reads.map(lambda m: ("good_read", m)),
    good_writes.map(lambda m: ("good_write", m)),
    bad_requests.map(lambda m: ("malformed_request", m)),
    bad_bodies.map(lambda b: ("malformed_body", b)),
)


def brute_radius(model: dict, code: bytes, r: int) -> list[list]:
    hits = [(hamming(code, c), k) for k, (c, _) in model.items()]
    return [[k, d] for d, k in sorted(hits) if d <= r]


def as_code(code: bytes | str) -> bytes:
    return bytes.fromhex(code) if isinstance(code, str) else code


def expected_read(model: dict, m: dict):
    op = m["op"]
    if op == "radius":
        return brute_radius(model, as_code(m["code"]), m["r"])
    if op == "radius_many":
        return [brute_radius(model, as_code(c), m["r"]) for c in m["codes"]]
    if op == "get":
        return [model[m["key"]][0], model[m["key"]][1]] if m["key"] in model else "KeyNotFound"
    if op == "contains":
        return m["key"] in model
    if op == "len":
        return len(model)
    if op == "keys_after":
        keys = sorted(model, key=str.encode)
        after = m.get("after")
        return [k for k in keys if after is None or k.encode() > after.encode()][: m["limit"]]
    return None  # knn, ping: checked separately


def apply_write(model: dict, m: dict):
    """The write's effect on the model, and its expected result."""
    op = m["op"]
    if op == "insert":
        model[m["key"]] = (as_code(m["code"]), m.get("meta"))
        return None
    if op == "delete":
        return model.pop(m["key"], None) is not None
    for key, code in zip(m["keys"], m["codes"], strict=True):
        model[key] = (as_code(code), None)
    return len(set(m["keys"]))


def check_reply(model: dict, category: str, m, reply: dict) -> None:
    assert ("ok" in reply) != ("error" in reply), reply
    if "error" in reply:
        assert reply["error"]["type"] in ERROR_TYPES
        assert category not in ("good_read", "good_write") or reply["error"]["type"] == "KeyNotFound", (m, reply)
        if category == "good_read":
            assert expected_read(model, m) == "KeyNotFound"
        return
    assert category in ("good_read", "good_write"), (m, reply)
    if category == "good_write":
        assert reply["ok"] == apply_write(model, m), (m, reply)
        return
    if m["op"] == "knn":
        everything = brute_radius(model, as_code(m["code"]), BITS)
        assert [d for _, d in reply["ok"]] == [d for _, d in everything[: m["k"]]]
    elif m["op"] == "ping":
        assert reply["ok"]["bits"] == BITS
    else:
        assert reply["ok"] == expected_read(model, m), (m, reply)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(items, min_size=1, max_size=12), tail=st.one_of(st.just(b""), st.binary(max_size=40)))
def test_pipelined_random_frames_are_each_answered_and_lose_nothing(target, batch, tail):
    db, path, model = target
    data = []
    for i, (category, m) in enumerate(batch):
        COUNTS[category] += 1
        if category == "malformed_body":
            data.append(encode_frame(m))
        else:
            data.append(encode_frame(msgpack.packb({"id": i, **m}, use_bin_type=True)))
    if tail:
        COUNTS["garbage_tail"] += 1
    with raw_connect(path) as sock:
        sock.sendall(b"".join(data) + tail)  # pipelined: one write; garbage may end the stream
        sock.shutdown(socket.SHUT_WR)
        for i, (category, m) in enumerate(batch):
            reply = read_reply(sock)
            assert reply is not None, f"no reply to frame {i} ({category})"
            if category != "malformed_body":
                assert reply["id"] == i
            check_reply(model, category, m, reply)
        while read_reply(sock) is not None:  # whatever the garbage tail parsed into
            pass
    with raw_connect(path) as sock:
        sock.sendall(encode_frame(msgpack.packb({"id": 1, "op": "ping"})))
        assert read_reply(sock)["ok"]["bits"] == BITS
    assert {key: db.get(key) for key in db} == model


# one level of msgpack nesting around a value: a one-item array, or a one-entry map {"a": value}
_NEST = {"array": b"\x91", "map": b"\x81\xa1a"}


def _deep(levels: list[str]) -> bytes:
    return b"".join(_NEST[kind] for kind in levels) + b"\xc0"


def test_every_field_of_every_op_survives_deep_nesting(tmp_path) -> None:
    """Each field of each op (id and op included) set to arrays and maps nested up to 1,000 deep (a ~1 KB frame
    whose repr raised RecursionError outside the loop's handler and killed the server): every frame gets one
    reply, the database is unchanged, and the server still answers."""
    from hashdb.protocol import OPS

    db = HashDB(str(tmp_path / "db"), bits=BITS, durable=False)
    db.insert_many(list(INITIAL), [code for code, _ in INITIAL.values()])
    valid = {"key": "n1", "code": INITIAL["k1"][0], "keys": ["n1"], "codes": [INITIAL["k1"][0]], "r": 2, "k": 2,
             "meta": {"n": 1}, "metas": [None], "force": None, "config": {}, "after": None, "limit": 3}  # fmt: skip
    with server_thread(db, short_socket_path(tmp_path)) as server:
        sock = raw_connect(server.path)
        sent = 0
        for op, (_, required, optional) in OPS.items():
            for field in ("id", "op", *required, *optional):
                for levels in (["array"] * 1000, ["map"] * 1000, ["array", "map"] * 400, ["array"] * 200):
                    fields = {"id": 1, "op": op, **{name: valid[name] for name in required}}
                    fields[field] = None
                    body = bytes([0x80 | len(fields)]) + b"".join(
                        msgpack.packb(name) + (_deep(levels) if name == field else msgpack.packb(value))
                        for name, value in fields.items()
                    )
                    sock.sendall(encode_frame(body))
                    reply = read_reply(sock)
                    assert reply is not None, f"{op}.{field}: connection closed"
                    if "error" in reply:
                        assert reply["error"]["type"] in ERROR_TYPES and len(reply["error"]["message"]) < 2000
                    sent += 1
                    COUNTS["deeply nested fields"] += 1
        sock.sendall(frames({"id": 2, "op": "ping"}))
        assert read_reply(sock)["ok"]["bits"] == BITS
        sock.close()
    assert sent > 150
    for key, (code, _) in INITIAL.items():  # only writes of the valid fields (to n1) may have landed
        assert db.get(key)[0] == code
    assert len(db) in (len(INITIAL), len(INITIAL) + 1)
    db.close()
