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


# ------------------------------------------------------------------------------ permissions and opening


def _mode(path) -> int:
    import stat

    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_database_is_owner_only_whatever_the_umask(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        with HashDB(tmp_path / "db", bits=64) as db:
            db.insert("a", bytes(8))
    finally:
        os.umask(old)
    path = tmp_path / "db"
    assert _mode(path) == 0o700
    assert {p.name: _mode(p) for p in path.iterdir()} == {"data.mdb": 0o600, "lock.mdb": 0o600}
    with HashDB(path) as db:  # reopening changes nothing
        assert db.get("a")[0] == bytes(8)
    assert _mode(path) == 0o700 and _mode(path / "data.mdb") == 0o600


def test_mode_shares_a_new_database_with_a_group(tmp_path):
    import os

    old = os.umask(0o027)  # a umask that would take the group's write bit away
    try:
        HashDB(tmp_path / "shared", bits=64, mode=0o770).close()
    finally:
        os.umask(old)
    path = tmp_path / "shared"
    assert _mode(path) == 0o770
    assert {p.name: _mode(p) for p in path.iterdir()} == {"data.mdb": 0o660, "lock.mdb": 0o660}


def test_an_existing_empty_folder_keeps_its_mode_and_gets_private_files(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    HashDB(folder, bits=64).close()
    assert _mode(folder) == 0o755
    assert _mode(folder / "data.mdb") == 0o600


@pytest.mark.parametrize("mode", [0o600, 0o1700, -1, "0o700", True, 0o7777])
def test_a_mode_without_owner_rwx_or_with_extra_bits_is_refused(tmp_path, mode):
    from hashdb import InvalidArgument

    with pytest.raises(InvalidArgument, match="mode"):
        HashDB(tmp_path / "db", bits=64, mode=mode)
    assert not (tmp_path / "db").exists()


@pytest.mark.parametrize("path", [None, 12, b"db", ""])
def test_a_path_that_is_not_a_str_is_invalid_argument(path):
    from hashdb import InvalidArgument

    with pytest.raises(InvalidArgument, match="path"):
        HashDB(path, bits=64)


def test_a_missing_database_is_database_not_found_and_nothing_is_created(tmp_path):
    from hashdb import DatabaseNotFound

    missing = tmp_path / "modles.db"
    for kwargs in ({"readonly": True}, {}, {"bits": 256, "create": False}, {"bits": 256, "readonly": True}):
        with pytest.raises(DatabaseNotFound, match="no hashdb database"):
            HashDB(missing, **kwargs)
        assert not missing.exists(), kwargs
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatabaseNotFound):
        HashDB(empty, readonly=True)
    with pytest.raises(DatabaseNotFound):
        HashDB(empty, bits=64, create=False)
    assert list(empty.iterdir()) == []


def test_create_false_opens_an_existing_database(tmp_path):
    HashDB(tmp_path / "db", bits=128).close()
    with HashDB(tmp_path / "db", bits=128, create=False) as db:
        db.insert("a", bytes(16))
        assert len(db) == 1


def test_a_path_that_is_not_a_database_is_not_a_database(tmp_path):
    from hashdb import NotADatabase

    plain = tmp_path / "file.txt"
    plain.write_text("hello")
    for kwargs in ({"readonly": True}, {"bits": 64}):
        with pytest.raises(NotADatabase, match="not a"):
            HashDB(plain, **kwargs)
    assert plain.read_text() == "hello"
    foreign = tmp_path / "foreign"
    env = lmdb.open(str(foreign), max_dbs=2)
    codes = env.open_db(b"codes")
    with env.begin(write=True) as txn:
        txn.put(b"k", b"v", db=codes)
    env.close()
    before = {p.name: p.read_bytes() for p in foreign.iterdir() if p.name == "data.mdb"}
    for kwargs in ({"readonly": True}, {"bits": 64}, {}):
        with pytest.raises(NotADatabase):
            HashDB(foreign, **kwargs)
    assert {p.name: p.read_bytes() for p in foreign.iterdir() if p.name == "data.mdb"} == before


_HOLD_WRITER = r"""
import sys, lmdb
env = lmdb.open(sys.argv[1], max_dbs=8)
txn = env.begin(write=True)  # LMDB's writer lock, held until we are told to go
print("holding", flush=True)
sys.stdin.readline()
txn.abort()
"""


def test_read_only_opening_and_queries_take_no_writer_lock(tmp_path):
    import os
    import subprocess
    import sys
    import threading

    path = tmp_path / "db"
    mat = random_codes(300, 64, seed=30)
    with HashDB(path, bits=64) as db:
        db.insert_many([f"k{i:03d}" for i in range(300)], mat)
    expected = {f"k{i:03d}": mat[i].tobytes() for i in range(300)}
    names_before = sorted(p.name for p in path.iterdir())
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_WRITER, os.fspath(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        seen: dict[str, object] = {}

        def read_only_session() -> None:
            with HashDB(path, readonly=True) as ro:
                seen["len"] = len(ro)
                seen["get"] = ro.get("k007")[0]
                seen["radius"] = ro.radius(mat[5], 12)
                seen["knn"] = ro.knn(mat[9], 3)
                seen["stats"] = ro.stats()["count"]
                seen["keys"] = list(ro)

        worker = threading.Thread(target=read_only_session, daemon=True)
        worker.start()
        worker.join(120)
        assert not worker.is_alive(), "a read-only session waited for LMDB's writer lock"
    finally:
        holder.stdin.write("go\n")
        holder.stdin.close()
        holder.wait(30)
    assert seen["len"] == 300 and seen["stats"] == 300
    assert seen["get"] == mat[7].tobytes()
    assert seen["radius"] == brute_radius(expected, mat[5].tobytes(), 12)
    assert seen["knn"] == sorted(brute_radius(expected, mat[9].tobytes(), 64), key=lambda t: (t[1], t[0]))[:3]
    assert seen["keys"] == sorted(expected)
    assert sorted(p.name for p in path.iterdir()) == names_before


def test_the_identity_a_sidecar_stamps_itself_with(tmp_path):
    from hashdb.store import open_store, release_store

    with HashDB(tmp_path / "db", bits=64) as db:
        db.insert("a", bytes(8))
        db.insert("b", bytes(8))
    store = open_store(tmp_path / "db")
    try:
        assert store.current_seq() == 2
        assert len(store.db_id) == 32 and store.identity == file_identity_of(tmp_path / "db")
        assert store.data_path == str(tmp_path / "db" / "data.mdb")
        first_id = store.db_id
    finally:
        release_store(store)
    HashDB(tmp_path / "other", bits=64).close()
    store = open_store(tmp_path / "other")
    try:
        assert store.db_id != first_id and store.current_seq() == 0
    finally:
        release_store(store)


def file_identity_of(path):
    st = (path / "data.mdb").stat()
    return st.st_dev, st.st_ino


# ------------------------------------------------------------------------------------------ a full disk


@pytest.mark.parametrize("reserve", [True, False])
def test_a_map_that_cannot_grow_fails_the_write_cleanly_and_writes_resume_after(tmp_path, monkeypatch, reserve):
    import hashdb.store.env

    if not reserve:  # only MapFullError inside the transaction: the grow-and-rerun loop must give up
        monkeypatch.setattr(Store, "_ensure_room", lambda self, reserve: None)
    monkeypatch.setattr(hashdb.store.env, "MAX_MAP_SIZE", 1 << 20)  # as if the disk held only 1 MiB
    path = tmp_path / "db"
    mat = random_codes(40000, 256, seed=31)
    expected: dict[str, bytes] = {}
    with HashDB(path, bits=256, map_size=TINY) as db:
        db.radius(mat[0], 0)  # an index that must stay in step with what was really stored
        done = 0
        with pytest.raises(StorageError, match="map larger than"):
            while done < len(mat):  # a bounded loop: it must fail long before the codes run out
                keys = [f"k{i:05d}" for i in range(done, done + 500)]
                db.insert_many(keys, mat[done : done + 500])
                expected.update({k: mat[done + j].tobytes() for j, k in enumerate(keys)})
                done += 500
        assert 0 < done < len(mat)
        seq = db.stats()["log_seq"]
        with pytest.raises(StorageError, match="map larger than"):  # the same batch again: still no room
            db.insert_many([f"k{i:05d}" for i in range(done, done + 500)], mat[done : done + 500])
        assert db.stats()["log_seq"] == seq
        assert {k: c for k, (c, _) in db_contents(db).items()} == expected
        assert db.radius(mat[3], 20) == brute_radius(expected, mat[3].tobytes(), 20)
        monkeypatch.setattr(hashdb.store.env, "MAX_MAP_SIZE", 1 << 44)  # room again
        db.insert_many([f"k{i:05d}" for i in range(done, done + 500)], mat[done : done + 500])
        expected.update({f"k{i:05d}": mat[i].tobytes() for i in range(done, done + 500)})
        assert db.radius(mat[done + 1], 20) == brute_radius(expected, mat[done + 1].tobytes(), 20)
    with HashDB(path) as db:
        assert {k: c for k, (c, _) in db_contents(db).items()} == expected


_FULL_DISK = r"""
import json, os, resource, signal, sys
import numpy as np
from hashdb import HashDB, StorageError

folder, how = sys.argv[1], sys.argv[2]
path = os.path.join(folder, "db")
rng = np.random.default_rng(32)
db = HashDB(path, bits=256)
db.insert("first", bytes(32))
if how == "tmpfs":  # leave about 256 KiB free on the small file system
    st = os.statvfs(folder)
    with open(os.path.join(folder, "filler"), "wb") as f:
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - (256 << 10)))
else:  # no file system to fill: forbid the data file to grow instead (the same failed page writes)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    size = os.path.getsize(os.path.join(path, "data.mdb"))
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + (256 << 10), resource.RLIM_INFINITY))
expected = {"first": bytes(32).hex()}
error = None
for batch in range(200):
    codes = rng.integers(0, 256, (400, 32), dtype=np.uint8)
    keys = [f"b{batch:03d}-{j:03d}" for j in range(400)]
    try:
        db.insert_many(keys, codes)
    except StorageError as e:
        error = str(e)
        break
    except Exception as e:
        error = f"NOT A HASHDB ERROR: {type(e).__name__}: {e}"
        break
    expected.update({k: c.tobytes().hex() for k, c in zip(keys, codes)})
failed_at = len(expected)
single = None
try:
    db.insert("single", bytes(32))
except StorageError as e:
    single = str(e)
if single is None:  # a small write may still fit where the batch did not
    expected["single"] = bytes(32).hex()
unchanged = {k: db.get(k)[0].hex() for k in db} == expected
if how == "tmpfs":
    os.remove(os.path.join(folder, "filler"))
else:
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
db.insert_many([f"after-{j}" for j in range(400)], np.zeros((400, 32), np.uint8))
expected.update({f"after-{j}": bytes(32).hex() for j in range(400)})
db.close()
with HashDB(path, readonly=True) as ro:
    reopened = {k: ro.get(k)[0].hex() for k in ro}
print(json.dumps({"how": how, "error": error, "failed_at": failed_at, "unchanged": unchanged,
                  "resumed": reopened == expected}))
"""


def _run_full_disk(tmp_path) -> dict:
    import json
    import os
    import shutil
    import subprocess
    import sys

    from db_helpers import REPO

    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    folder = tmp_path / "small"
    folder.mkdir()
    unshare = shutil.which("unshare")
    if unshare:  # a private 4 MiB tmpfs: a real ENOSPC, gone with the child's mount namespace
        script = f'mount -t tmpfs -o size=4m tmpfs "$1" && exec "{sys.executable}" -c "$2" "$1" tmpfs'
        for flags in (["-m"], ["-r", "-m"]):
            proc = subprocess.run(
                [unshare, *flags, "sh", "-c", script, "sh", str(folder), _FULL_DISK],
                capture_output=True, text=True, timeout=120, env=env,
            )
            if proc.returncode == 0:
                return json.loads(proc.stdout.strip().splitlines()[-1])
            assert "Traceback" not in proc.stderr, proc.stderr
    proc = subprocess.run(
        [sys.executable, "-c", _FULL_DISK, str(folder), "fsize"], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_full_disk_is_a_storage_error_that_stores_nothing_and_writes_resume_after(tmp_path):
    result = _run_full_disk(tmp_path)
    assert result["error"] is not None and "NOT A HASHDB ERROR" not in result["error"], result
    assert "disk is full" in result["error"] and "nothing of this write was stored" in result["error"]
    assert result["failed_at"] > 1  # some batches fit before the disk filled
    assert result["unchanged"], result  # the failed batch left no trace
    assert result["resumed"], result  # and writing works again once there is room
