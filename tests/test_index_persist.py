"""The index file beside the LMDB environment: used when it matches the database, rebuilt (never trusted)
when it is torn, corrupt, foreign or stale, and answers stay exactly the brute force's either way."""

from __future__ import annotations

import os
import shutil
import zlib

import numpy as np
import pytest
from db_helpers import brute_knn, brute_radius, random_codes

import hashdb.live_index as hashdb_db  # the index lifecycle and its constants
from hashdb import HashDB
from hashdb.index import persist

N = 3000
BITS = 128


@pytest.fixture(autouse=True)
def small_databases_get_an_index_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hashdb_db, "PERSIST_MIN_CODES", 100)
    monkeypatch.setattr(hashdb_db, "NUMPY_SECONDS", 0.0)  # the numba path; the numpy one has its own tests


@pytest.fixture
def db_path(tmp_path):  # type: ignore[no-untyped-def]
    """A closed database of N codes whose close wrote the index file."""
    path = str(tmp_path / "db")
    codes = random_codes(N, BITS, seed=1)
    with HashDB(path, bits=BITS) as db:
        db.insert_many([f"k{i:05d}" for i in range(N)], codes)
    assert os.path.exists(persist.path_in(path))
    return path


def records(path: str) -> dict[str, bytes]:
    with HashDB(path, readonly=True) as db:
        return {k: db.get(k)[0] for k in db}


def assert_exact(db: HashDB, recs: dict[str, bytes]) -> None:
    for q in list(recs.values())[:5] + [bytes(BITS // 8)]:
        for r in (0, 3, 20, 60):
            assert db.radius(q, r) == brute_radius(recs, q, r)
        assert db.knn(q, 7) == brute_knn(recs, q, 7)
    qs = list(recs.values())[5:9]
    assert db.radius_many(qs, 30) == [brute_radius(recs, q, 30) for q in qs]


def source_after_open(path: str) -> str | None:
    with HashDB(path, readonly=True) as db:
        db.refresh()
        assert_exact(db, records(path))
        return db.stats()["index_source"]


def test_a_matching_index_file_is_mapped_instead_of_rebuilt(db_path: str) -> None:
    assert source_after_open(db_path) == "file"


def test_writes_after_the_file_are_replayed_from_the_log(db_path: str) -> None:
    old = persist.read_header(db_path)["seq"]
    with HashDB(db_path) as db:
        db.insert("new", bytes(BITS // 8))
        db.delete("k00003")
        db.insert("k00004", b"\xff" * (BITS // 8))
    assert persist.read_header(db_path)["seq"] == old  # a few writes leave the file to be replayed
    assert source_after_open(db_path) == "file"


def test_a_truncated_file_is_rebuilt(db_path: str) -> None:
    path = persist.path_in(db_path)
    for size in (os.path.getsize(path) - 4096, 100, 5, 0):
        with open(path, "r+b") as f:
            f.truncate(size)
        assert source_after_open(db_path) == "tables"


@pytest.mark.parametrize("where", ["header", "codes", "entries", "last byte"])
def test_a_corrupt_file_is_rebuilt(db_path: str, where: str) -> None:
    path = persist.path_in(db_path)
    header = persist.read_header(db_path)
    offsets = {a["name"]: a["offset"] for a in header["arrays"]}
    sizes = {a["name"]: a["nbytes"] for a in header["arrays"]}
    at = {
        "header": 20,
        "codes": offsets["codes"] + 77,
        "entries": offsets["mih_entries"] + sizes["mih_entries"] // 2,
        "last byte": offsets["mih_delta"] - 1 if sizes["mih_delta"] == 0 else offsets["mih_delta"],
    }[where]
    if where == "last byte":  # the end of the last non-empty array
        last = max((a for a in header["arrays"] if a["nbytes"]), key=lambda a: a["offset"])
        at = last["offset"] + last["nbytes"] - 1
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x10]))
    assert source_after_open(db_path) == "tables"


def test_a_file_from_another_database_is_rebuilt(db_path: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    other = str(tmp_path / "other")
    codes = random_codes(N, BITS, seed=2)
    with HashDB(other, bits=BITS) as db:
        db.insert_many([f"k{i:05d}" for i in range(N)], codes)  # same keys, same sequence, other codes
    shutil.copyfile(persist.path_in(other), persist.path_in(db_path))
    assert source_after_open(db_path) == "tables"


def test_a_file_from_another_width_is_rebuilt(db_path: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    other = str(tmp_path / "other")
    with HashDB(other, bits=64) as db:
        db.insert_many([f"k{i}" for i in range(N)], random_codes(N, 64, seed=3))
    shutil.copyfile(persist.path_in(other), persist.path_in(db_path))
    assert source_after_open(db_path) == "tables"


def test_a_file_older_than_a_compaction_is_rebuilt(db_path: str) -> None:
    kept = db_path + ".kept"
    shutil.copyfile(persist.path_in(db_path), kept)
    with HashDB(db_path) as db:
        for i in range(3):
            db.insert(f"late{i}", bytes([i]) * (BITS // 8))
        db.compact_log(honour_readers=False)  # the file's sequence is gone from the log
    shutil.copyfile(kept, persist.path_in(db_path))
    assert source_after_open(db_path) == "tables"


def test_a_file_newer_than_the_database_or_of_another_history_is_rebuilt(db_path: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    copy = str(tmp_path / "copy")
    shutil.copytree(db_path, copy)  # the same database (same creation stamp), then two histories
    with HashDB(db_path) as db:
        db.insert("here", bytes(BITS // 8))
        assert db.save_index() is not None
    newer = persist.path_in(db_path)
    shutil.copyfile(newer, persist.path_in(copy))
    assert source_after_open(copy) == "tables"  # its sequence is past the copy's log
    with HashDB(copy) as db:
        db.insert("there", b"\x01" * (BITS // 8))  # the same sequence number, another write
    shutil.copyfile(newer, persist.path_in(copy))
    assert source_after_open(copy) == "tables"


def test_a_writer_rewrites_a_file_its_writes_left_far_behind(db_path: str) -> None:
    old = persist.read_header(db_path)["seq"]
    codes = random_codes(3000, BITS, seed=4)
    with HashDB(db_path) as db:
        db.insert_many([f"more{i}" for i in range(3000)], codes)
    header = persist.read_header(db_path)
    assert header["seq"] > old
    assert source_after_open(db_path) == "file"


def test_a_one_shot_query_builds_no_tables_and_writes_no_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = str(tmp_path / "db")
    codes = random_codes(N, BITS, seed=5)
    with HashDB(path, bits=BITS) as db:
        db.insert_many([f"k{i}" for i in range(N)], codes)
    os.unlink(persist.path_in(path))
    with HashDB(path, readonly=True) as db:
        assert db.radius(codes[0], 4) == [("k0", 0)]
        assert db.stats()["index"]["structures"]["mih"]["built"] is False  # a scan answered it
    assert not os.path.exists(persist.path_in(path))


def test_many_queries_build_the_tables_once_they_pay_off(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = str(tmp_path / "db")
    n = 30_000  # large enough that MIH beats the scan per query
    codes = random_codes(n, BITS, seed=6)
    with HashDB(path, bits=BITS) as db:
        db.insert_many([f"k{i}" for i in range(n)], codes)
    os.unlink(persist.path_in(path))
    with HashDB(path, readonly=True) as db:
        asked = 0
        while asked < 5000:
            assert db.radius(codes[asked], 2)[0] == (f"k{asked}", 0)
            asked += 1
            if db.stats()["index"]["structures"]["mih"]["built"]:
                break
        assert 10 < asked < 5000  # scans first, tables once the scans have cost what building does
    assert source_after_open(path) == "file"  # tables built here are saved for the next process


def test_a_file_that_cannot_be_written_costs_nothing_but_the_file(db_path: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    os.unlink(persist.path_in(db_path))

    def refuse(*args: object) -> str:
        raise PermissionError("read-only directory")

    monkeypatch.setattr(persist, "write", refuse)  # what a directory the process may not write gives
    with HashDB(db_path, readonly=True) as db:
        db.refresh()
        assert db.save_index() is None
        assert_exact(db, records(db_path))
    assert not os.path.exists(persist.path_in(db_path))
    assert not [f for f in os.listdir(db_path) if f.endswith(".tmp")]


def test_digest_notices_moved_and_flipped_words() -> None:
    a = np.arange(1 << 18, dtype=np.uint64)
    base = persist.digest(a)
    b = a.copy()
    b[[0, (1 << 17) + 5]] = b[[(1 << 17) + 5, 0]]  # two words swapped across chunks
    assert persist.digest(b) != base
    c = a.copy()
    c[12345] ^= np.uint64(1 << 40)
    assert persist.digest(c) != base
    assert persist.digest(a[:-1]) != base


def test_numpy_answers_check_each_chunk_they_read_and_fall_back_on_a_bad_one(db_path: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(hashdb_db, "NUMPY_SECONDS", 1e9)  # stay on the numpy path
    recs = records(db_path)
    with HashDB(db_path, readonly=True) as db:  # a good file: answered from it, without numba's kernels
        assert db.radius(recs["k00010"], 3) == brute_radius(recs, recs["k00010"], 3)
        assert db.stats()["index_source"] == "file" and db.stats()["index"]["engine"] == "numpy"
    header = persist.read_header(db_path)
    codes_at = next(a["offset"] for a in header["arrays"] if a["name"] == "codes")
    with open(persist.path_in(db_path), "r+b") as f:  # key k00000 has id 0: its code is the first row
        f.seek(codes_at + 3)
        f.write(b"\x5a")
    with HashDB(db_path, readonly=True) as db:
        assert db.radius(recs["k00000"], 3) == brute_radius(recs, recs["k00000"], 3)
        assert db.stats()["index_source"] == "tables"
        assert db.knn(recs["k00001"], 4) == brute_knn(recs, recs["k00001"], 4)


# ---------------------------------------------------------------- crafted files (issue 17): sums recomputed


def _craft(path: str, edit) -> None:  # type: ignore[no-untyped-def]
    """Rewrite the index file with ``edit(arrays, scalars)`` applied and every sum and crc recomputed, as an
    attacker with write access to the directory could."""
    header = persist.read_header(path)
    _, mapped, _ = persist.read(path, {})
    arrays = {name: np.array(a) for name, a in mapped.items()}
    scalars = dict(header["scalars"])
    edit(arrays, scalars)
    persist.write(path, {k: header[k] for k in ("bits", "database", "seq", "log_crc")}, arrays, scalars)


def _ramp(arrays, scalars) -> None:  # type: ignore[no-untyped-def]
    # monotone, spanning, in bounds: only the entries' contents show the directory is not theirs
    width = arrays["mih_offsets"].shape[1]
    arrays["mih_offsets"][:] = np.linspace(0, scalars["n_base"], width).astype(np.int32)


def _id_past_capacity(arrays, scalars) -> None:  # type: ignore[no-untyped-def]
    scalars["id_bits"] += 8  # entries now decode to ids far past the code matrix
    entries = arrays["mih_entries"]
    if scalars["id_bits"] + int(arrays["mih_lens"].max()) - scalars["t"] > 8 * entries.itemsize:
        arrays["mih_entries"] = entries.astype(np.uint64)


CRAFTED = {
    "entry ids past the code matrix": _id_past_capacity,
    "ramped offsets": _ramp,
    "offsets past the table": lambda a, s: a["mih_offsets"].__setitem__((0, -1), s["n_base"] + 100),
    "pending ids past the code matrix": lambda a, s: a.__setitem__("mih_delta", np.array([10**9], np.int64)),
    "a substring past the last bit": lambda a, s: a["mih_starts"].__setitem__(0, BITS - 1),
    "t of another directory": lambda a, s: s.__setitem__("t", s["t"] + 1),
    "t not an int": lambda a, s: s.__setitem__("t", [1] * 3),
    "an id listed twice": lambda a, s: a["mih_entries"].__setitem__((0, 1), a["mih_entries"][0, 0]),
    "entries swapped between tables": lambda a, s: a["mih_entries"].__setitem__(0, a["mih_entries"][1].copy()),
}


@pytest.mark.parametrize("engine", ["numba", "numpy"])
@pytest.mark.parametrize("attack", list(CRAFTED))
def test_a_crafted_file_with_valid_sums_is_rebuilt_not_trusted(  # type: ignore[no-untyped-def]
    db_path: str, monkeypatch, attack: str, engine: str
) -> None:
    """Entry ids past the code matrix made the numba kernels segfault, ramped offsets made them answer 42 of
    42 queries wrongly, and the numpy path raised raw IndexError: every array and scalar is checked against
    the others, and a file that does not fit is rebuilt from LMDB. Answers stay the brute force's."""
    if engine == "numpy":
        monkeypatch.setattr(hashdb_db, "NUMPY_SECONDS", 1e9)
    recs = records(db_path)
    _craft(db_path, CRAFTED[attack])
    with HashDB(db_path, readonly=True) as db:
        assert_exact(db, recs)
        for q in list(recs.values())[::150]:  # queries over the whole file: every table run is read
            assert db.radius(q, 12) == brute_radius(recs, q, 12)
        if engine == "numba":  # the kernels take the tables whole: checked whole first
            assert db.stats()["index_source"] == "tables"


def test_a_header_nested_past_the_recursion_limit_is_rebuilt(db_path: str) -> None:
    """A header with a valid crc nesting 100,000 lists made json raise RecursionError out of every open."""
    recs = records(db_path)
    raw = b'{"version": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with open(persist.path_in(db_path), "wb") as f:
        f.write(persist._HEAD.pack(persist.MAGIC, len(raw)) + raw + persist._CRC.pack(zlib.crc32(raw)))
    with pytest.raises(persist.Rejected, match="corrupt"):
        persist.read_header(db_path)
    assert source_after_open(db_path) == "tables"
    with HashDB(db_path) as db:  # a writer's close decides about the file from its header: no error either
        assert_exact(db, recs)


def test_random_edits_with_valid_sums_never_change_an_answer(db_path: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Hypothesis: one array element or scalar of the index file set to an extreme or random value, sums and
    crc recomputed, on either engine: every answer equals brute force (the file is used only if it fits)."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    recs = records(db_path)
    pristine = open(persist.path_in(db_path), "rb").read()
    # not "codes": a code row edited with its sums is the file's word against LMDB's, which only reading LMDB
    # settles (the numba path notices it disagrees with the tables; a numpy scan does not: see docs/index.md)
    names = ["alive", "mih_starts", "mih_lens", "mih_offsets", "mih_entries", "mih_collisions", "mih_delta"]
    values = st.sampled_from([0, 1, -1, 2**31 - 1, 2**32 - 1, 2**40, 2**63 - 1, 7])

    @settings(max_examples=12, deadline=None, derandomize=True, database=None)
    @given(st.sampled_from(names + ["t", "id_bits", "n_base", "tombstones"]), st.integers(0, 10**9), values,
           st.booleans())  # fmt: skip
    def run(target: str, where: int, value: int, numpy_engine: bool) -> None:
        def edit(arrays, scalars) -> None:  # type: ignore[no-untyped-def]
            if target in arrays:
                flat = arrays[target].reshape(-1)
                if flat.size:
                    info = np.iinfo(flat.dtype) if flat.dtype.kind in "iu" else None
                    flat[where % flat.size] = value if info is None else min(max(value, info.min), info.max)
            else:
                scalars[target] = value

        with open(persist.path_in(db_path), "wb") as f:
            f.write(pristine)
        _craft(db_path, edit)
        monkeypatch.setattr(hashdb_db, "NUMPY_SECONDS", 1e9 if numpy_engine else 0.0)
        with HashDB(db_path, readonly=True) as db:
            for q in list(recs.values())[::600]:
                assert db.radius(q, 10) == brute_radius(recs, q, 10)
            q = recs["k00007"]
            assert db.knn(q, 5) == brute_knn(recs, q, 5)

    run()


TABLE_EDITS = {
    "ramped offsets": _ramp,
    "an id listed twice": CRAFTED["an id listed twice"],
    "entries swapped between tables": CRAFTED["entries swapped between tables"],
    "entry ids past the code matrix": _id_past_capacity,
    "two entries of a run swapped": lambda a, s: a["mih_entries"][0].__setitem__(
        slice(0, 2), a["mih_entries"][0][1::-1].copy()),
    "a live id dropped for another": lambda a, s: a["mih_entries"][1].__setitem__(
        -1, a["mih_entries"][1][-1] - np.uint32(1) if a["mih_entries"][1][-1] & 1 else a["mih_entries"][1][-1] + 1),
    "nothing": lambda a, s: None,
}


@pytest.mark.parametrize("edit", list(TABLE_EDITS))
def test_the_whole_table_check_rejects_what_the_chunk_checks_reject(db_path: str, edit: str) -> None:
    """Before the numba kernels take the tables, SavedTables.whole checks them in one numba pass per table
    (validate_kernels.py) instead of chunk by chunk in numpy: on every crafted table the two must agree, to the
    problem they name."""
    from hashdb.index.validate import SavedTables

    _craft(db_path, TABLE_EDITS[edit])
    header = persist.read_header(db_path)
    _, arrays, _ = persist.read(db_path, {})
    verdicts = []
    for path in ("chunks", "whole"):
        try:
            saved = SavedTables(header["bits"], dict(arrays), dict(header["scalars"]))
            if path == "whole":
                assert saved.whole("mih_entries") and not saved.whole("mih_offsets")
            else:
                saved.chunk("mih_entries", 0, arrays["mih_entries"].nbytes)
            saved.complete()
            verdicts.append("kept")
        except persist.Rejected as e:
            verdicts.append(str(e))
    # the same table rejected (an id moved to another one is both a duplicate and a mismatch: either may be named)
    assert [v.split(" (")[0].split(" ")[:3] for v in verdicts] == [verdicts[0].split(" (")[0].split(" ")[:3]] * 2
    assert all((v == "kept") == (edit == "nothing") for v in verdicts)
    if edit != "a live id dropped for another":
        assert verdicts[0] == verdicts[1]


def test_sorted_unique_is_np_unique() -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from hashdb.index.arrays import sorted_unique

    @given(st.lists(st.integers(-3, 40), max_size=60))
    @settings(max_examples=60, deadline=None)
    def check(values: list[int]) -> None:
        a = np.array(values, dtype=np.int64)
        np.testing.assert_array_equal(sorted_unique(a), np.unique(a))

    check()
