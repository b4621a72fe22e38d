"""The LMDB side: the map grows by itself and loses nothing, other processes' growth is adopted, and
directories that are not hashdb databases are refused."""

from __future__ import annotations

import lmdb
import numpy as np
import pytest
from db_helpers import brute_radius, db_contents, random_codes, run_child

from hashdb import HashDB, StorageError
from hashdb.store import FORMAT_VERSION, Store, pack_meta

TINY = 1 << 16


def test_map_full_errors_grow_the_map_and_every_committed_write_survives(tmp_path, monkeypatch):
    # Without the up-front reservation, only MapFullError inside the transaction can trigger growth.
    monkeypatch.setattr(Store, "_ensure_room", lambda self, reserve: None)
    grown = []
    original = Store._grow_map

    def spy(self, at_least=0):
        grown.append(self.map_size())
        original(self, at_least)

    monkeypatch.setattr(Store, "_grow_map", spy)
    path = tmp_path / "db"
    mat = random_codes(3000, 256, seed=20)
    expected = {}
    with HashDB(path, bits=256, map_size=TINY) as db:
        for i in range(300):
            db.insert(f"single-{i:04d}", mat[i], {"i": i})
            expected[f"single-{i:04d}"] = (mat[i].tobytes(), {"i": i})
        keys = [f"bulk-{i:04d}" for i in range(300, 3000)]
        db.insert_many(keys, mat[300:])
        expected.update({k: (mat[i + 300].tobytes(), None) for i, k in enumerate(keys)})
        assert db.stats()["map_size"] > TINY
        assert db.stats()["log_seq"] == 301  # a retried transaction is still one transaction
    assert len(grown) >= 3
    monkeypatch.undo()
    with HashDB(path) as db:
        assert db_contents(db) == expected
        q = mat[7].tobytes()
        codes = {k: c for k, (c, _) in expected.items()}
        assert db.radius(q, 100) == brute_radius(codes, q, 100)


def test_a_large_insert_many_reserves_room_up_front(tmp_path, monkeypatch):
    failures = []
    original = Store.write

    def count_map_full(self, body, reserve=0):
        def wrapped(txn):
            try:
                return body(txn)
            except lmdb.MapFullError:
                failures.append(1)
                raise

        return original(self, wrapped, reserve)

    monkeypatch.setattr(Store, "write", count_map_full)
    mat = random_codes(20000, 128, seed=21)
    with HashDB(tmp_path / "db", bits=128, map_size=TINY) as db:
        db.insert_many([f"k{i:05d}" for i in range(20000)], mat)
        assert len(db) == 20000
        assert db.knn(mat[123], 1) == [("k00123", 0)]
    assert failures == []


def test_growth_by_another_process_is_adopted(tmp_path, monkeypatch):
    adopted = []
    original = Store._adopt_map_size
    monkeypatch.setattr(Store, "_adopt_map_size", lambda self: (adopted.append(1), original(self)))
    path = tmp_path / "db"
    with HashDB(path, bits=256, map_size=TINY) as db:
        db.insert("mine", bytes(32))
        assert db.radius(bytes(32), 0) == [("mine", 0)]
        mat = random_codes(5000, 256, seed=22)
        run_child(path, [["insert_many", [f"c{i:04d}" for i in range(5000)], [r.tobytes().hex() for r in mat]]])
        # The child grew the file past our map: our next transactions must adopt its size.
        assert len(db) == 5001
        assert db.get("c4999")[0] == mat[4999].tobytes()
        assert db.knn(mat[4321], 1) == [("c4321", 0)]
        db.insert("after", mat[0])  # and our own writes still commit
        assert db.radius(mat[0], 0) == [("after", 0), ("c0000", 0)]
        assert db.stats()["map_size"] > TINY
    assert adopted  # the MapResizedError path ran


def test_reopen_keeps_bits_codec_and_creation_time(tmp_path):
    with HashDB(tmp_path / "db", bits=512, codec={"v": 1}) as db:
        created = db.stats()["created"]
        db.insert("a", bytes(64), {"m": [1, 2]})
    with HashDB(tmp_path / "db") as db:
        assert db.bits == 512
        assert db.codec == {"v": 1}
        assert db.stats()["created"] == created
        assert db.get("a") == (bytes(64), {"m": [1, 2]})


def test_an_unknown_format_version_is_refused(tmp_path):
    path = tmp_path / "db"
    HashDB(path, bits=64).close()
    env = lmdb.open(str(path), max_dbs=8)
    meta = env.open_db(b"meta")
    with env.begin(write=True) as txn:
        txn.put(b"format", pack_meta(FORMAT_VERSION + 1), db=meta)
    env.close()
    with pytest.raises(StorageError, match="format version"):
        HashDB(path)


def test_a_foreign_lmdb_environment_is_refused(tmp_path):
    path = tmp_path / "foreign"
    env = lmdb.open(str(path), max_dbs=2)
    other = env.open_db(b"codes")
    with env.begin(write=True) as txn:
        txn.put(b"k", b"v", db=other)
    env.close()
    with pytest.raises(StorageError):
        HashDB(path, bits=64)
    with pytest.raises(StorageError):
        HashDB(path, readonly=True)


def test_an_empty_existing_directory_becomes_a_database(tmp_path):
    (tmp_path / "empty").mkdir()
    with HashDB(tmp_path / "empty", bits=64) as db:
        db.insert("a", bytes(8))
    with HashDB(tmp_path / "empty") as db:
        assert list(db) == ["a"]


def test_log_stays_bounded_under_many_small_writes(tmp_path):
    with HashDB(tmp_path / "db", bits=64) as db:
        db.insert("seed", bytes(8))
        db.radius(bytes(8), 0)
        for i in range(200):
            db.insert(f"k{i}", np.full(8, i % 256, np.uint8))
            if i % 50 == 0:
                db.knn(bytes(8), 2)
        stats = db.stats()
        assert stats["log_seq"] == 201
        assert stats["log_entries"] <= 2  # we apply our own writes at once, so nothing stays pinned


def test_non_durable_mode_keeps_data_across_a_clean_close(tmp_path):
    with HashDB(tmp_path / "db", bits=64, durable=False) as db:
        for i in range(50):
            db.insert(f"k{i:02d}", np.full(8, i, np.uint8))
        assert db.knn(np.full(8, 3, np.uint8), 1) == [("k03", 0)]
    with HashDB(tmp_path / "db") as db:
        assert len(db) == 50
        assert db.get("k49")[0] == bytes([49]) * 8


def test_reopen_reads_full_partial_and_missing_blocks(tmp_path):
    from hashdb.store import block_size

    per = block_size(64)
    n = 5 * per + 7
    mat = random_codes(n, 64, seed=23)
    keys = [f"k{i:06d}" for i in range(n)]
    with HashDB(tmp_path / "db", bits=64) as db:
        db.insert_many(keys, mat)
        # Block 1 partial, block 3 emptied (gone), the last block partial: full runs [0], [2], [4].
        gone = [keys[per + 5]] + keys[3 * per : 4 * per] + [keys[-1]]
        assert db.delete_many(gone) == len(gone)
    expected = {k: mat[i].tobytes() for i, k in enumerate(keys) if k not in set(gone)}
    with HashDB(tmp_path / "db") as db:
        for qi in (0, per + 6, 4 * per + 3):
            q = mat[qi].tobytes()
            assert db.radius(q, 14) == brute_radius(expected, q, 14)
        assert db.stats()["index"]["live"] == len(expected)
        # Freed ids come back: the emptied block fills again.
        db.insert_many([f"new{i}" for i in range(per)], mat[:per])
        assert db.stats()["ids_allocated"] == n
    with HashDB(tmp_path / "db") as db:
        assert db.radius(mat[0], 0) == [("k000000", 0), ("new0", 0)]


def test_map_growth_while_other_threads_read_and_write(tmp_path):
    import threading

    errors: list[BaseException] = []
    with HashDB(tmp_path / "db", bits=256, map_size=TINY) as db:
        db.insert("seed", bytes(32))

        def writer(tag: str) -> None:
            try:
                for i in range(60):
                    db.insert(f"{tag}{i:03d}", np.full(32, i, np.uint8), {"tag": tag})
                db.insert_many([f"{tag}-bulk{i:04d}" for i in range(1500)], random_codes(1500, 256, seed=len(tag)))
            except BaseException as e:  # noqa: BLE001 - surfaced by the assertion below
                errors.append(e)

        def reader() -> None:
            try:
                for _ in range(80):
                    db.radius(bytes(32), 0)
                    len(db)
                    db.get("seed")
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=writer, args=(t,)) for t in ("a", "bb", "ccc")]
        threads += [threading.Thread(target=reader) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
            assert not t.is_alive(), "a thread hung"
        assert errors == []
        assert db.stats()["map_size"] > TINY
        assert len(db) == 1 + 3 * (60 + 1500)
        assert db.radius(np.full(32, 7, np.uint8), 0) == [("a007", 0), ("bb007", 0), ("ccc007", 0)]
    with HashDB(tmp_path / "db") as db:
        assert len(db) == 1 + 3 * (60 + 1500)
        assert db.get("bb059") == (bytes([59]) * 32, {"tag": "bb"})
