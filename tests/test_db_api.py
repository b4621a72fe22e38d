"""HashDB's public behaviour: accepted inputs, answers, errors, and that a failed write changes nothing."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from db_helpers import brute_knn, brute_radius, db_contents, random_codes

import hashdb.db
from hashdb import (
    BitsMismatch,
    HashDB,
    HashDBError,
    InvalidArgument,
    InvalidCode,
    InvalidKey,
    InvalidMeta,
    KeyNotFound,
    StorageError,
)
from hashdb.store import Store

BITS = 128
NB = BITS // 8


@pytest.fixture
def db(tmp_path):
    with HashDB(tmp_path / "db", bits=BITS) as handle:
        yield handle


def code(byte: int) -> bytes:
    return bytes([byte]) * NB


def observable(db: HashDB) -> tuple:
    """Everything a failed write must leave unchanged: records, metadata, log position, query answers."""
    state = db.stats()
    return (
        db_contents(db),
        len(db),
        state["log_seq"],
        db.radius(code(0), BITS),
    )


# ---------------------------------------------------------------------------------------------- opening


def test_bits_are_stored_and_a_mismatch_on_reopen_is_an_error(tmp_path):
    path = tmp_path / "db"
    HashDB(path, bits=256).close()
    with HashDB(path) as db:
        assert db.bits == 256
        assert db.path == str(path)
    with HashDB(path, bits=256) as db:
        assert db.bits == 256
    with pytest.raises(BitsMismatch):
        HashDB(path, bits=128)


@pytest.mark.parametrize("bits", [0, 63, 100, 4096, -64, 2.0, "256", True])
def test_invalid_bits_are_rejected(tmp_path, bits):
    with pytest.raises(InvalidArgument):
        HashDB(tmp_path / "db", bits=bits)
    assert not (tmp_path / "db").exists()


def test_opening_a_missing_database_without_bits_is_an_error(tmp_path):
    with pytest.raises(StorageError):
        HashDB(tmp_path / "nothing")
    with pytest.raises(StorageError):
        HashDB(tmp_path / "nothing", bits=64, readonly=True)
    assert not (tmp_path / "nothing").exists()


def test_a_file_in_place_of_the_directory_is_a_storage_error(tmp_path):
    (tmp_path / "file").write_text("not a database")
    with pytest.raises(StorageError):
        HashDB(tmp_path / "file", bits=64)


def test_close_is_idempotent_and_later_calls_raise(tmp_path):
    db = HashDB(tmp_path / "db", bits=64)
    db.insert("a", b"\x00" * 8)
    db.close()
    db.close()
    for call in (lambda: len(db), lambda: db.get("a"), lambda: db.insert("b", b"\x00" * 8),
                 lambda: db.radius(b"\x00" * 8, 1)):
        with pytest.raises(StorageError):
            call()


def test_context_manager_closes(tmp_path):
    with HashDB(tmp_path / "db", bits=64) as db:
        db.insert("a", b"\x01" * 8)
    with pytest.raises(StorageError):
        db.get("a")
    with HashDB(tmp_path / "db") as again:
        assert again.get("a") == (b"\x01" * 8, None)


def test_readonly_reads_and_refuses_writes(tmp_path):
    with HashDB(tmp_path / "db", bits=64) as db:
        db.insert("a", b"\x00" * 8, {"m": 1})
    with HashDB(tmp_path / "db", readonly=True) as ro:
        assert ro.readonly
        assert ro.get("a") == (b"\x00" * 8, {"m": 1})
        assert ro.knn(b"\x00" * 8, 1) == [("a", 0)]
        with pytest.raises(StorageError):
            ro.insert("b", b"\x00" * 8)
        with pytest.raises(StorageError):
            ro.delete("a")
        assert "b" not in ro


def test_codec_config_is_stored_and_checked(tmp_path):
    cfg = {"segments": 64, "version": 2}
    with HashDB(tmp_path / "db", bits=64, codec=cfg) as db:
        assert db.codec == cfg
    with HashDB(tmp_path / "db", codec=cfg) as db:
        assert db.codec == cfg
        db.set_codec({"segments": 32})
        assert db.codec == {"segments": 32}
    with pytest.raises(InvalidArgument):
        HashDB(tmp_path / "db", codec={"segments": 64})
    with pytest.raises(InvalidArgument):
        HashDB(tmp_path / "other", bits=64, codec=["not", "a", "dict"])


# ------------------------------------------------------------------------------------------- records


def test_every_code_form_stores_the_same_canonical_bytes(db):
    raw = bytes(range(NB))
    forms = {
        "bytes": raw,
        "bytearray": bytearray(raw),
        "hex": raw.hex(),
        "HEX0x": "0x" + raw.hex().upper(),
        "uint8": np.frombuffer(raw, np.uint8).copy(),
        "bool": np.unpackbits(np.frombuffer(raw, np.uint8)).astype(bool),
        "01": np.unpackbits(np.frombuffer(raw, np.uint8)).astype(np.int64),
    }
    for key, form in forms.items():
        db.insert(key, form)
    for key in forms:
        assert db.get(key) == (raw, None)
    assert db.radius(raw, 0) == sorted((k, 0) for k in forms)


def test_insert_replaces_code_and_meta(db):
    db.insert("k", code(1), {"v": 1, "nested": {"x": [1, 2]}})
    assert db.get("k") == (code(1), {"v": 1, "nested": {"x": [1, 2]}})
    db.insert("k", code(2), {"v": 2})
    assert db.get("k") == (code(2), {"v": 2})
    db.insert("k", code(3))
    assert db.get("k") == (code(3), None)
    assert len(db) == 1
    assert db.radius(code(1), 0) == []
    assert db.radius(code(3), 0) == [("k", 0)]


def test_meta_keeps_msgpack_types(db):
    meta = {"s": "x", "i": -5, "f": 1.5, "b": b"\x00\xff", "n": None, "l": [1, "a"], 7: "int key", "t": True}
    db.insert("k", code(0), meta)
    assert db.get("k")[1] == meta


def test_delete_reports_whether_the_key_existed(db):
    db.insert("a", code(0))
    assert db.delete("a") is True
    assert db.delete("a") is False
    assert "a" not in db
    with pytest.raises(KeyNotFound):
        db.get("a")
    assert db.radius(code(0), BITS) == []


def test_key_not_found_is_a_keyerror_and_a_hashdb_error(db):
    with pytest.raises(KeyError):
        db.get("missing")
    with pytest.raises(HashDBError) as info:
        db.get("missing")
    assert "missing" in str(info.value)


def test_len_contains_and_iteration_in_key_order(db):
    keys = ["b", "a", "é", "zz", "a/b", "Z"]
    db.insert_many(keys, [code(i) for i in range(len(keys))])
    assert len(db) == len(keys)
    assert list(db) == sorted(keys)
    assert db.keys() == sorted(keys)
    assert "é" in db and "q" not in db
    assert 5 not in db and None not in db and "" not in db


def test_iteration_spans_chunks_and_tolerates_writes_in_the_loop(db, monkeypatch):
    monkeypatch.setattr(hashdb.db, "ITER_CHUNK", 3)
    keys = [f"k{i:02d}" for i in range(10)]
    db.insert_many(keys, [code(i) for i in range(10)])
    seen = []
    for k in db:
        seen.append(k)
        db.insert("A" + k, code(0))  # sorts before every k: a write per step must not deadlock or skip
    assert seen == keys
    assert len(db) == 20


def test_insert_many_accepts_arrays_and_sequences(db):
    mat = random_codes(5, BITS, seed=1)
    db.insert_many([f"u{i}" for i in range(5)], mat)
    db.insert_many([f"b{i}" for i in range(5)], np.unpackbits(mat, axis=1).astype(bool))
    db.insert_many([f"h{i}" for i in range(5)], [row.tobytes().hex() for row in mat])
    db.insert_many((f"t{i}" for i in range(5)), tuple(row.tobytes() for row in mat), [{"i": i} for i in range(5)])
    for i in range(5):
        for prefix in "ubh":
            assert db.get(f"{prefix}{i}") == (mat[i].tobytes(), None)
        assert db.get(f"t{i}") == (mat[i].tobytes(), {"i": i})
    assert db.insert_many([], []) == 0
    assert len(db) == 20


def test_insert_many_repeated_key_keeps_the_last(db):
    n = db.insert_many(["a", "b", "a"], [code(1), code(2), code(3)], [{"first": 1}, None, {"last": 3}])
    assert n == 2
    assert db.get("a") == (code(3), {"last": 3})
    assert db.get("b") == (code(2), None)
    assert db.radius(code(1), 0) == []
    assert db.radius(code(3), 0) == [("a", 0)]


def test_insert_many_replacing_existing_keys_updates_code_and_meta(db):
    db.insert_many(["a", "b", "c"], [code(1)] * 3, [{"m": 1}] * 3)
    db.insert_many(["b", "c", "d"], [code(2)] * 3, [None, {"m": 2}, None])
    assert db_contents(db) == {
        "a": (code(1), {"m": 1}),
        "b": (code(2), None),
        "c": (code(2), {"m": 2}),
        "d": (code(2), None),
    }
    assert db.radius(code(2), 0) == [("b", 0), ("c", 0), ("d", 0)]


def test_freed_ids_are_reused_and_answers_stay_exact(db):
    db.insert_many([f"k{i}" for i in range(50)], [code(i) for i in range(50)])
    assert db.radius(code(0), 0) == [("k0", 0)]  # index built before the churn
    for rnd in range(3):
        for i in range(0, 50, 2):
            db.delete(f"k{i}")
        db.insert_many([f"n{rnd}-{i}" for i in range(25)], [code(100 + i) for i in range(25)])
        for i in range(0, 50, 2):
            db.insert(f"k{i}", code(i))
    assert db.stats()["ids_allocated"] == 125 == len(db)  # freed ids came back: no growth with churn
    expected = {f"k{i}": code(i) for i in range(50)}
    expected.update({f"n{rnd}-{i}": code(100 + i) for rnd in range(3) for i in range(25)})
    assert {k: c for k, (c, _) in db_contents(db).items()} == expected
    for q in (code(0), code(100), code(7)):
        assert db.radius(q, 12) == brute_radius(expected, q, 12)
    with HashDB(db.path) as again:
        assert again.radius(code(100), 0) == brute_radius(expected, code(100), 0)


# ------------------------------------------------------------------------------------------- queries


def test_radius_sorted_by_distance_then_key(db):
    rng = np.random.default_rng(3)
    mat = rng.integers(0, 256, (300, NB), dtype=np.uint8)
    mat[:50] = mat[0]  # many equal distances
    keys = [f"key{int(x)}" for x in rng.permutation(300)]
    db.insert_many(keys, mat)
    records = dict(zip(keys, (row.tobytes() for row in mat), strict=True))
    for r in (0, 10, 60, BITS):
        assert db.radius(mat[0], r) == brute_radius(records, mat[0].tobytes(), r)
    assert db.radius(mat[0], 10 * BITS) == brute_radius(records, mat[0].tobytes(), BITS)


def test_knn_breaks_ties_by_key(db):
    db.insert_many(["d", "b", "c", "a", "far"], [code(1), code(1), code(0), code(1), code(255)])
    assert db.knn(code(1), 1) == [("a", 0)]
    assert db.knn(code(1), 2) == [("a", 0), ("b", 0)]
    assert db.knn(code(1), 4) == [("a", 0), ("b", 0), ("d", 0), ("c", NB)]
    assert db.knn(code(1), 99) == brute_knn({k: db.get(k)[0] for k in db}, code(1), 99)
    assert len(db.knn(code(1), 99)) == 5


@pytest.mark.parametrize("force", [None, "scan", "mih", "bktree"])
def test_knn_with_k_beyond_any_count_returns_everything(db, force):
    assert db.knn(code(0), 2**63, force=force) == []
    db.insert_many(["b", "a"], [code(1), code(3)])
    assert db.knn(code(1), 2**63, force=force) == [("b", 0), ("a", NB)]  # 0x01 vs 0x03: one bit per byte


def test_queries_on_an_empty_database(db):
    assert db.radius(code(0), 5) == []
    assert db.knn(code(0), 3) == []
    assert db.radius_many([code(0), code(1)], 5) == [[], []]
    assert db.radius_many([], 5) == []


def test_radius_many_equals_radius_per_query(db):
    mat = random_codes(200, BITS, seed=4)
    db.insert_many([f"k{i}" for i in range(200)], mat)
    queries = random_codes(7, BITS, seed=5)
    queries[0] = mat[3]
    for force in hashdb.db.FORCES:
        many = db.radius_many(queries, 55, force=force)
        assert many == [db.radius(q, 55) for q in queries]
        assert many[0][0] == ("k3", 0)


@pytest.mark.parametrize("force", hashdb.db.FORCES)
def test_every_force_gives_the_same_exact_answers(db, force):
    mat = random_codes(400, BITS, seed=6)
    mat[200:] = mat[:200] ^ np.uint8(1)  # near duplicates: distance NB to their twin
    keys = [f"k{i:03d}" for i in range(400)]
    db.insert_many(keys, mat)
    records = dict(zip(keys, (row.tobytes() for row in mat), strict=True))
    for qi in (0, 17, 250):
        q = mat[qi].tobytes()
        for r in (0, NB, 40, 64):
            assert db.radius(q, r, force=force) == brute_radius(records, q, r)
        for k in (1, 2, 5, 50):
            assert db.knn(q, k, force=force) == brute_knn(records, q, k)


def test_queries_from_many_threads_during_writes(db):
    q = code(7)
    db.insert("seed", q)
    errors: list[BaseException] = []
    counts: list[list[int]] = [[] for _ in range(4)]

    def reader(slot: int) -> None:
        try:
            for _ in range(60):
                counts[slot].append(len(db.radius(q, 0)))
                db.knn(q, 3)
        except BaseException as e:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for i in range(40):
        db.insert(f"w{i:02d}", q)
    for t in threads:
        t.join(120)
        assert not t.is_alive(), "a reader thread hung"
    assert errors == []
    for seen in counts:
        assert seen == sorted(seen)  # a later query never sees fewer of the committed inserts
    assert db.radius(q, 0) == [("seed", 0)] + [(f"w{i:02d}", 0) for i in range(40)]


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "bad",
    [b"\x00" * (NB - 1), b"\x00" * (NB + 1), "zz" * NB, "00" * (NB - 1), np.zeros(NB + 1, np.uint8),
     np.full(BITS, 2, np.int64), np.zeros((2, NB), np.uint8), 12345, None, 1.5],
)
def test_invalid_codes(db, bad):
    with pytest.raises(InvalidCode):
        db.insert("k", bad)
    with pytest.raises(InvalidCode):
        db.radius(bad, 1)
    with pytest.raises(InvalidCode):
        db.knn(bad, 1)
    assert len(db) == 0


@pytest.mark.parametrize("bad", ["", "x" * 512, "é" * 256, 5, b"bytes", None, ("t",), "\ud800"])
def test_invalid_keys(db, bad):
    with pytest.raises(InvalidKey):
        db.insert(bad, code(0))
    with pytest.raises(InvalidKey):
        db.get(bad)
    with pytest.raises(InvalidKey):
        db.delete(bad)
    with pytest.raises(InvalidKey):
        db.insert_many(["ok", bad], [code(0), code(1)])
    assert len(db) == 0


def test_longest_keys_are_accepted(db):
    for key in ("x" * 511, "é" * 255 + "x"):
        db.insert(key, code(0))
        assert db.get(key) == (code(0), None)
    assert db.radius(code(0), 0) == sorted([("x" * 511, 0), ("é" * 255 + "x", 0)])


@pytest.mark.parametrize("bad", [[1, 2], "text", {"f": object()}, {"big": 2**70}, {"s": {1, 2}}])
def test_invalid_meta(db, bad):
    with pytest.raises(InvalidMeta):
        db.insert("k", code(0), bad)
    with pytest.raises(InvalidMeta):
        db.insert_many(["a", "k"], [code(0), code(0)], [None, bad])
    assert len(db) == 0


def test_invalid_query_arguments(db):
    db.insert("a", code(0))
    for bad_r in (-1, 1.0, True, "3", None):
        with pytest.raises(InvalidArgument):
            db.radius(code(0), bad_r)
        with pytest.raises(InvalidArgument):
            db.radius_many([code(0)], bad_r)
    for bad_k in (0, -2, 2.0, False, None):
        with pytest.raises(InvalidArgument):
            db.knn(code(0), bad_k)
    for bad_force in ("brute", "", "SCAN", 1):
        with pytest.raises(InvalidArgument):
            db.radius(code(0), 1, force=bad_force)
        with pytest.raises(InvalidArgument):
            db.knn(code(0), 1, force=bad_force)


def test_insert_many_argument_errors(db):
    with pytest.raises(InvalidArgument):
        db.insert_many(["a", "b"], [code(0)])
    with pytest.raises(InvalidArgument):
        db.insert_many(["a"], [code(0)], [None, None])
    with pytest.raises(InvalidArgument):
        db.insert_many("ab", [code(0), code(1)])
    with pytest.raises(InvalidCode):
        db.insert_many(["a"], np.zeros((1, NB), np.int32))
    assert len(db) == 0


# ---------------------------------------------------------------------- failed writes change nothing


def _populate(db: HashDB) -> None:
    db.insert_many(["a", "b", "c"], [code(1), code(2), code(3)], [{"m": "a"}, None, {"m": "c"}])
    db.radius(code(0), 1)  # build the index so its state is part of what must not change


@pytest.mark.parametrize(
    "keys, codes, metas, error",
    [
        (["a", "new1", "new2"], [code(9), "not hex" * 4, code(9)], None, InvalidCode),
        (["a", "new1", "new2"], [code(9), code(9), code(9)[:-1]], None, InvalidCode),
        (["a", "new1", 17, "new2"], [code(9)] * 4, None, InvalidKey),
        (["a", "new1", "x" * 600], [code(9)] * 3, None, InvalidKey),
        (["a", "new1", "new2"], [code(9)] * 3, [{"ok": 1}, {"bad": object()}, None], InvalidMeta),
        (["a", "new1", "new2"], [code(9)] * 3, [{"ok": 1}, "not a dict", None], InvalidMeta),
        (["a", "new1", "new2"], [code(9)] * 2, None, InvalidArgument),
    ],
)
def test_failing_insert_many_changes_nothing(db, keys, codes, metas, error):
    _populate(db)
    before = observable(db)
    with pytest.raises(error):
        db.insert_many(keys, codes, metas)
    assert observable(db) == before


def test_an_error_inside_the_transaction_rolls_everything_back(db, monkeypatch):
    _populate(db)
    before = observable(db)

    def fail(*args, **kwargs):
        raise RuntimeError("disk on fire")

    # The codes, ids and keys tables are already written when the log append fails.
    monkeypatch.setattr(Store, "_append_log", fail)
    with pytest.raises(RuntimeError):
        db.insert_many(["a", "new1", "new2"], [code(9)] * 3, [None, {"x": 1}, None])
    with pytest.raises(RuntimeError):
        db.insert("b", code(9), {"y": 2})
    with pytest.raises(RuntimeError):
        db.delete("c")
    monkeypatch.undo()
    assert observable(db) == before
    db.insert("new3", code(1))
    assert db.radius(code(1), 0) == [("a", 0), ("new3", 0)]


def test_failing_single_insert_changes_nothing(db):
    _populate(db)
    before = observable(db)
    for args in (("a", b"short"), ("", code(0)), ("a", code(0), {"bad": object()})):
        with pytest.raises(HashDBError):
            db.insert(*args)
    assert observable(db) == before


def test_stats_report_counts_and_positions(db):
    db.insert_many(["a", "b"], [code(1), code(2)])
    db.delete("b")
    assert db.radius(code(1), 0) == [("a", 0)]
    stats = db.stats()
    assert stats["count"] == 1
    assert stats["bits"] == BITS
    assert stats["path"] == db.path
    assert stats["map_size"] >= stats["map_used"] > 0
    assert stats["log_seq"] == 2
    assert stats["index_seq"] == 2
    assert stats["index"]["live"] == 1
    assert stats["index_bytes"] > 0


def test_two_handles_in_one_process_share_the_environment(tmp_path):
    path = tmp_path / "db"
    first = HashDB(path, bits=64)
    second = HashDB(path)
    reader = HashDB(path, readonly=True)
    first.insert("a", b"\x00" * 8)
    assert second.radius(b"\x00" * 8, 0) == [("a", 0)]
    second.insert("b", b"\x00" * 8)
    second.delete("a")
    assert first.radius(b"\x00" * 8, 0) == [("b", 0)]
    assert reader.knn(b"\x00" * 8, 5) == [("b", 0)]
    with pytest.raises(StorageError):
        reader.insert("c", b"\x00" * 8)
    with pytest.raises(BitsMismatch):
        HashDB(path, bits=128)
    first.close()
    assert second.get("b") == (b"\x00" * 8, None)
    assert reader.get("b") == (b"\x00" * 8, None)
    second.close()
    reader.close()
    with HashDB(path) as again:
        assert list(again) == ["b"]


def test_a_dropped_handle_releases_the_environment(tmp_path):
    import gc
    import shutil

    path = tmp_path / "db"
    db = HashDB(path, bits=64)
    db.insert("old", b"\x00" * 8)
    del db
    gc.collect()
    shutil.rmtree(path)
    with HashDB(path, bits=128) as fresh:  # a new database at the same path, not the old environment
        assert fresh.bits == 128
        assert len(fresh) == 0


def test_a_replaced_directory_is_not_served_from_a_stale_environment(tmp_path):
    import shutil

    path = tmp_path / "db"
    old = HashDB(path, bits=64)
    old.insert("old", b"\x00" * 8)
    shutil.rmtree(path)
    with HashDB(path, bits=64) as new:
        assert list(new) == []
        new.insert("new", b"\x01" * 8)
    assert list(old) == ["old"]  # the old handle keeps its (deleted) environment
    old.close()


def test_opening_and_writing_do_not_load_numba_or_torch(tmp_path):
    import subprocess
    import sys

    from db_helpers import REPO

    script = (
        "import sys, hashdb\n"
        f"db = hashdb.HashDB({str(tmp_path / 'db')!r}, bits=64)\n"
        "db.insert('a', bytes(8)); db.get('a'); len(db)\n"
        "print('numba' in sys.modules, 'torch' in sys.modules)\n"
        "db.knn(bytes(8), 1); db.radius(bytes(8), 3)\n"
        "print('numba' in sys.modules)\n"  # a small database is answered with numpy alone
        "db.radius(bytes(8), 3, force='mih')\n"
        "print('numba' in sys.modules)\n"  # a forced structure runs on the kernels
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, check=True,
                         timeout=120)
    assert out.stdout.split() == ["False", "False", "False", "True"]
