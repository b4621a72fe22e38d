"""One behaviour suite, run against the embedded HashDB and against hashdb.connect() to a real server.

The client promises HashDB's methods, return types and error classes; these tests hold it to that by
asserting the same things of both.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
from frontend_helpers import server_thread, short_socket_path
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hashdb
from hashdb.codes import hamming
from hashdb.db import HashDB

BITS = 128


@pytest.fixture(params=["embedded", "client"])
def db(request, tmp_path):
    embedded = HashDB(str(tmp_path / "db"), bits=BITS)
    if request.param == "embedded":
        with embedded:
            yield embedded
        return
    path = short_socket_path(tmp_path)
    with server_thread(embedded, path, close_db=True), hashdb.connect(path) as client:
        yield client


def random_codes(n: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [row.tobytes() for row in rng.integers(0, 256, size=(n, BITS // 8), dtype=np.uint8)]


def near(code: bytes, flips: int, seed: int) -> bytes:
    """``code`` with ``flips`` distinct bits flipped."""
    rng = np.random.default_rng(seed)
    bits = np.unpackbits(np.frombuffer(code, dtype=np.uint8))
    bits[rng.choice(BITS, size=flips, replace=False)] ^= 1
    return np.packbits(bits).tobytes()


def brute_radius(stored: dict[str, bytes], query: bytes, r: int) -> list[tuple[str, int]]:
    hits = [(key, hamming(query, code)) for key, code in stored.items()]
    return sorted([(k, d) for k, d in hits if d <= r], key=lambda kd: (kd[1], kd[0]))


def test_width_is_the_databases(db):
    assert db.bits == BITS


def test_insert_then_get_returns_code_and_meta(db):
    code = random_codes(1, 0)[0]
    db.insert("model-a", code, {"epochs": 3, "tags": ["x", "y"]})
    db.insert("model-b", code.hex())
    got_code, got_meta = db.get("model-a")
    assert got_code == code and isinstance(got_code, bytes)
    assert got_meta == {"epochs": 3, "tags": ["x", "y"]}
    assert db.get("model-b") == (code, None)


def test_missing_key_raises_key_not_found(db):
    with pytest.raises(hashdb.KeyNotFound):
        db.get("absent")
    with pytest.raises(KeyError):  # KeyNotFound is also a KeyError, for dict-like callers
        db.get("absent")


def test_len_contains_and_delete(db):
    codes = random_codes(5, 1)
    db.insert_many([f"k{i}" for i in range(5)], codes)
    assert len(db) == 5
    assert "k3" in db and "k9" not in db
    assert db.delete("k3") is True
    assert db.delete("k3") is False
    assert len(db) == 4 and "k3" not in db


def test_radius_equals_bruteforce_sorted_by_distance_then_key(db):
    base = random_codes(1, 2)[0]
    stored = {f"far{i}": c for i, c in enumerate(random_codes(60, 3))}
    stored.update({f"near{i:02d}": near(base, i % 9, seed=i) for i in range(40)})
    keys = list(stored)
    db.insert_many(keys, [stored[k] for k in keys])
    for r in (0, 1, 4, 8, 40, BITS):
        got = db.radius(base, r)
        assert got == brute_radius(stored, base, r)
        assert all(isinstance(k, str) and isinstance(d, int) for k, d in got)


def test_radius_many_equals_radius_of_each(db):
    codes = random_codes(30, 4)
    db.insert_many([f"m{i}" for i in range(30)], codes)
    queries = [near(codes[i], 3, seed=i) for i in range(0, 30, 3)]
    many = db.radius_many(queries, 5)
    assert many == [db.radius(q, 5) for q in queries]
    assert all(any(k == f"m{i * 3}" for k, _ in hits) for i, hits in enumerate(many))


def test_knn_returns_k_nearest(db):
    codes = random_codes(25, 5)
    stored = {f"c{i:02d}": c for i, c in enumerate(codes)}
    db.insert_many(list(stored), codes)
    query = near(codes[7], 2, seed=9)
    got = db.knn(query, 4)
    expected = brute_radius(stored, query, BITS)[:4]
    assert [d for _, d in got] == [d for _, d in expected]
    assert got[0] == ("c07", 2)


def test_codes_in_every_accepted_form(db):
    code = random_codes(1, 6)[0]
    arr = np.frombuffer(code, dtype=np.uint8)
    db.insert("packed", arr)
    db.insert("unpacked", np.unpackbits(arr).astype(bool))
    db.insert("hex", "0x" + code.hex())
    assert [k for k, d in db.radius(code, 0)] == ["hex", "packed", "unpacked"]


def test_deletes_and_reinserts_are_visible_to_queries(db):
    codes = random_codes(10, 7)
    db.insert_many([f"d{i}" for i in range(10)], codes)
    db.delete("d4")
    assert ("d4", 0) not in db.radius(codes[4], 0)
    db.insert("d4", codes[5])
    assert db.radius(codes[5], 0) == [("d4", 0), ("d5", 0)]


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda db: db.insert("k", b"\x00" * 3), hashdb.InvalidCode),
        (lambda db: db.insert("k", "zz" * (BITS // 8)), hashdb.InvalidCode),
        (lambda db: db.radius(b"\x00" * (BITS // 8), -1), hashdb.InvalidArgument),
        (lambda db: db.knn(b"\x00" * (BITS // 8), 0), hashdb.InvalidArgument),
        (lambda db: db.insert("", b"\x00" * (BITS // 8)), hashdb.InvalidKey),
        (lambda db: db.insert("x" * 600, b"\x00" * (BITS // 8)), hashdb.InvalidKey),
        (lambda db: db.insert("k", b"\x00" * (BITS // 8), {"f": object()}), hashdb.InvalidMeta),
    ],
)
def test_bad_arguments_raise_the_same_error_class(db, call, error):
    with pytest.raises(error):
        call(db)
    assert len(db) == 0  # a rejected write changed nothing


def test_stats_is_a_mapping_with_the_count(db):
    db.insert_many(["a", "b"], random_codes(2, 8))
    stats = db.stats()
    assert isinstance(stats, dict)
    assert stats["count"] == 2 and stats["bits"] == BITS


_keys = st.sampled_from([f"key{i}" for i in range(6)])
_codes = st.binary(min_size=BITS // 8, max_size=BITS // 8)
_ops = st.lists(
    st.one_of(
        st.tuples(st.just("insert"), _keys, _codes),
        st.tuples(st.just("delete"), _keys),
        st.tuples(st.just("get"), _keys),
        st.tuples(st.just("contains"), _keys),
        st.tuples(st.just("radius"), _codes, st.integers(-1, BITS)),
        st.tuples(st.just("knn"), _codes, st.integers(0, 8)),
        st.tuples(st.just("len")),
    ),
    max_size=25,
)


def _apply(target, op: tuple) -> object:
    name, *args = op
    try:
        if name == "contains":
            return args[0] in target
        if name == "len":
            return len(target)
        return getattr(target, name)(*args)
    except hashdb.HashDBError as e:
        return type(e)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_ops)
def test_client_and_embedded_agree_on_any_sequence_of_operations(ops):
    with tempfile.TemporaryDirectory(prefix="hdb") as tmp:
        embedded = HashDB(os.path.join(tmp, "a"), bits=BITS)
        served = HashDB(os.path.join(tmp, "b"), bits=BITS)
        path = os.path.join(tmp, "s.sock")
        with embedded, server_thread(served, path, close_db=True), hashdb.connect(path) as client:
            for op in ops:
                assert _apply(client, op) == _apply(embedded, op), op


def test_radius_and_k_beyond_any_distance_mean_everything(db):
    codes = random_codes(3, 7)
    db.insert_many(["a", "b", "c"], codes)
    everything = brute_radius(dict(zip("abc", codes, strict=True)), codes[0], BITS)
    assert db.radius(codes[0], 2**70) == everything  # wider than msgpack's ints: still an answer, not an error
    assert db.radius_many([codes[0]], 2**70) == [everything]
    assert db.knn(codes[0], 2**70) == everything
    with pytest.raises(hashdb.InvalidArgument):
        db.radius(codes[0], -(2**70))


def test_iteration_len_and_in_cover_every_key_in_utf8_byte_order(db):
    keys = [f"it{i:05d}" for i in range(5000)] + ["\u00e9t\u00e9", "Zed"]  # more than one page of keys
    db.insert_many(keys, random_codes(len(keys), 11))
    assert list(db) == sorted(keys, key=str.encode)
    assert list(db)[0] == "Zed" and list(db)[-1] == "\u00e9t\u00e9"
    assert len(db) == len(keys) and "it04999" in db and "nope" not in db
    assert db.keys_after("it04997", 10) == ["it04998", "it04999", "\u00e9t\u00e9"]
    assert db.keys_after(None, 2) == ["Zed", "it00000"]
    with pytest.raises(hashdb.InvalidArgument):
        db.keys_after(None, 0)
