"""Hypothesis: any sequence of writes, reopens and log compactions leaves HashDB answering exactly like a
plain dict searched by brute force, for every code width and every index structure."""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
from db_helpers import brute_knn, brute_radius
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import hashdb.live_index as hashdb_db  # the index lifecycle and its constants
from hashdb import HashDB, KeyNotFound
from hashdb.db import FORCES
from hashdb.index import persist

KEYS = st.sampled_from([f"k{i}" for i in range(12)] + ["é", "a/b", "K", "k1 "])
BASES = 4  # codes are a few bit flips away from one of a few base codes, so small radii find something


def code_strategy(bits: int) -> st.SearchStrategy[bytes]:
    rng = np.random.default_rng(bits)
    bases = [rng.integers(0, 256, bits // 8, dtype=np.uint8) for _ in range(BASES)]

    def build(args: tuple[int, list[int]]) -> bytes:
        base, flips = args
        bits_arr = np.unpackbits(bases[base])
        for f in flips:
            bits_arr[f] ^= 1
        return np.packbits(bits_arr).tobytes()

    return st.tuples(st.integers(0, BASES - 1), st.lists(st.integers(0, bits - 1), max_size=12)).map(build)


BOOLS = st.booleans()
METAS = st.none() | st.dictionaries(st.sampled_from(["a", "b"]), st.integers(-5, 5) | st.text(max_size=3), max_size=2)


class HashDBMachine(RuleBasedStateMachine):
    bits = 64

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="hashdb-prop-")
        self.path = f"{self.dir}/db"
        self.db = HashDB(self.path, bits=self.bits)
        # A second handle with its own index: writes through one reach the other only via the log.
        self.other = HashDB(self.path)
        self.model: dict[str, tuple[bytes, dict | None]] = {}
        self.codes = code_strategy(self.bits)

    def handle(self, other: bool) -> HashDB:
        return self.other if other else self.db

    def teardown(self) -> None:
        self.db.close()
        self.other.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def records(self) -> dict[str, bytes]:
        return {k: c for k, (c, _) in self.model.items()}

    @initialize(data=st.data())
    def start_with_a_bulk_load(self, data: st.DataObject) -> None:
        keys = data.draw(st.lists(KEYS, max_size=10))
        codes = [data.draw(self.codes) for _ in keys]
        self.db.insert_many(keys, codes)
        for k, c in zip(keys, codes, strict=True):
            self.model[k] = (c, None)

    @rule(key=KEYS, data=st.data(), meta=METAS, other=st.booleans())
    def insert(self, key: str, data: st.DataObject, meta: dict | None, other: bool) -> None:
        code = data.draw(self.codes)
        self.handle(other).insert(key, code, meta)
        self.model[key] = (code, meta)

    @rule(data=st.data(), other=st.booleans())
    def insert_many(self, data: st.DataObject, other: bool) -> None:
        keys = data.draw(st.lists(KEYS, max_size=8))
        codes = [data.draw(self.codes) for _ in keys]
        metas = data.draw(st.none() | st.lists(METAS, min_size=len(keys), max_size=len(keys)))
        as_array = data.draw(st.booleans())
        payload = np.frombuffer(b"".join(codes), np.uint8).reshape(len(keys), self.bits // 8) if as_array else codes
        self.handle(other).insert_many(keys, payload, metas)
        for i, k in enumerate(keys):
            self.model[k] = (codes[i], None if metas is None else metas[i])

    @rule(key=KEYS, other=st.booleans())
    def delete(self, key: str, other: bool) -> None:
        assert self.handle(other).delete(key) == (key in self.model)
        self.model.pop(key, None)

    @rule(both=st.booleans())
    def reopen(self, both: bool) -> None:
        self.db.close()
        if both:  # the environment itself closes only when no handle is left
            self.other.close()
            self.other = HashDB(self.path)
        self.db = HashDB(self.path)

    @rule(honour_readers=st.booleans())
    def compact_log(self, honour_readers: bool) -> None:
        self.db.compact_log(honour_readers=honour_readers)

    @rule(data=st.data(), r=st.integers(0, 20) | st.integers(0, 300), force=st.sampled_from(FORCES), other=BOOLS)
    def radius(self, data: st.DataObject, r: int, force: str | None, other: bool) -> None:
        query = data.draw(self.codes)
        assert self.handle(other).radius(query, r, force=force) == brute_radius(self.records(), query, r)

    @rule(data=st.data(), r=st.integers(0, 24), force=st.sampled_from(FORCES), other=st.booleans())
    def radius_many(self, data: st.DataObject, r: int, force: str | None, other: bool) -> None:
        queries = data.draw(st.lists(self.codes, max_size=3))
        expected = [brute_radius(self.records(), q, r) for q in queries]
        assert self.handle(other).radius_many(queries, r, force=force) == expected

    @rule(data=st.data(), k=st.integers(1, 20), force=st.sampled_from(FORCES), other=st.booleans())
    def knn(self, data: st.DataObject, k: int, force: str | None, other: bool) -> None:
        query = data.draw(self.codes)
        assert self.handle(other).knn(query, k, force=force) == brute_knn(self.records(), query, k)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def get(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.model)))
        assert self.db.get(key) == self.model[key]

    @invariant()
    def keys_and_length_match(self) -> None:
        assert len(self.db) == len(self.model)
        assert list(self.db) == sorted(self.model, key=lambda k: k.encode())
        missing = next((k for k in ("k0", "k5") if k not in self.model), None)
        if missing is not None:
            assert missing not in self.db
            try:
                self.db.get(missing)
            except KeyNotFound:
                pass
            else:
                raise AssertionError(f"{missing} should be absent")


SETTINGS = settings(
    max_examples=40,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class Machine64(HashDBMachine):
    bits = 64


class Machine128(HashDBMachine):
    bits = 128


class Machine256(HashDBMachine):
    bits = 256


TestHashDB64 = Machine64.TestCase
TestHashDB64.settings = SETTINGS
TestHashDB128 = Machine128.TestCase
TestHashDB128.settings = SETTINGS
TestHashDB256 = Machine256.TestCase
TestHashDB256.settings = SETTINGS


class PersistedMachine(HashDBMachine):
    """The same, with an index file written on every close and by explicit saves, and older copies of it
    put back (stale by a few writes, or compacted past): answers must stay exactly the brute force's."""

    bits = 64

    def __init__(self) -> None:
        self.saved_min = hashdb_db.PERSIST_MIN_CODES
        hashdb_db.PERSIST_MIN_CODES = 0
        super().__init__()
        self.kept: str | None = None

    def teardown(self) -> None:
        try:
            super().teardown()
        finally:
            hashdb_db.PERSIST_MIN_CODES = self.saved_min

    @rule(other=st.booleans())
    def save_index(self, other: bool) -> None:
        path = self.handle(other).save_index()
        assert path is not None and os.path.exists(path)

    @rule()
    def keep_index_file(self) -> None:
        current = persist.path_in(self.path)
        if os.path.exists(current):
            self.kept = f"{self.dir}/kept.index"
            shutil.copyfile(current, self.kept)

    @precondition(lambda self: self.kept is not None)
    @rule()
    def put_back_an_older_index_file_and_reopen(self) -> None:
        self.db.close()
        self.other.close()
        shutil.copyfile(self.kept, persist.path_in(self.path))
        self.db = HashDB(self.path)
        self.other = HashDB(self.path)


TestHashDBPersisted = PersistedMachine.TestCase
TestHashDBPersisted.settings = settings(SETTINGS, max_examples=20)
