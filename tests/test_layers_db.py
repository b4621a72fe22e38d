"""Per-layer codes stored beside the model codes: layer_radius equals brute force after any writes, replaces,
deletes, compactions and reopens, through two handles and across processes; a bad layer anywhere leaves the
database as it was; a database made before layers opens (writable and read-only); the layer index file is
rebuilt when stale or foreign."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import lmdb
import numpy as np
import pytest
from db_helpers import REPO
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import hashdb.live_index as live_index
from hashdb import HashDB, KeyNotFound
from hashdb.codes import hamming
from hashdb.db import FORCES, MAX_LAYER_NAME_BYTES, MAX_LAYERS
from hashdb.errors import HashDBError, InvalidArgument, InvalidCode
from hashdb.index import persist
from hashdb.store import LAYER_NEXT_ID, LAYER_TABLES

Layers = list[tuple[str, bytes]]

KEYS = st.sampled_from([f"m{i}" for i in range(8)] + ["é", "a/b"])
NAMES = st.sampled_from(["conv1.weight", "conv2.weight", "layer1.0.conv1", "fc", "ü", "conv1.weight"])
BASES = 3


def code_strategy(bits: int) -> st.SearchStrategy[bytes]:
    """Codes a few bit flips from one of a few bases, so that small radii find something."""
    rng = np.random.default_rng(bits + 7)
    bases = [rng.integers(0, 256, bits // 8, dtype=np.uint8) for _ in range(BASES)]

    def build(args: tuple[int, list[int]]) -> bytes:
        base, flips = args
        bits_arr = np.unpackbits(bases[base])
        for f in flips:
            bits_arr[f] ^= 1
        return np.packbits(bits_arr).tobytes()

    return st.tuples(st.integers(0, BASES - 1), st.lists(st.integers(0, bits - 1), max_size=10)).map(build)


def brute_layer_radius(model: dict[str, tuple[bytes, Layers]], query: bytes, r: int) -> list[tuple[str, str, int]]:
    """Every (model key, layer name, distance) within r, sorted by (distance, model key, layer position)."""
    hits = []
    for key, (_, layers) in model.items():
        for pos, (name, code) in enumerate(layers):
            d = hamming(code, query)
            if d <= r:
                hits.append((d, key, pos, name))
    hits.sort()
    return [(key, name, d) for d, key, _, name in hits]


class LayersMachine(RuleBasedStateMachine):
    bits = 64

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="hashdb-layers-")
        self.path = f"{self.dir}/db"
        self.db = HashDB(self.path, bits=self.bits)
        # A second handle with its own indexes: writes through one reach the other only via the logs.
        self.other = HashDB(self.path)
        self.model: dict[str, tuple[bytes, Layers]] = {}
        self.codes = code_strategy(self.bits)
        self.layers = st.lists(st.tuples(NAMES, self.codes), max_size=4)

    def handle(self, other: bool) -> HashDB:
        return self.other if other else self.db

    def teardown(self) -> None:
        self.db.close()
        self.other.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @initialize(data=st.data())
    def start_with_a_bulk_load(self, data: st.DataObject) -> None:
        keys = data.draw(st.lists(KEYS, max_size=6))
        codes = [data.draw(self.codes) for _ in keys]
        layers = [data.draw(self.layers) for _ in keys]
        self.db.insert_many(keys, codes, layers=layers)
        for k, c, ls in zip(keys, codes, layers, strict=True):
            self.model[k] = (c, ls)

    @rule(key=KEYS, data=st.data(), other=st.booleans(), as_none=st.booleans())
    def insert(self, key: str, data: st.DataObject, other: bool, as_none: bool) -> None:
        code = data.draw(self.codes)
        layers = data.draw(self.layers)
        # None and [] both mean "no layer codes": earlier ones of a replaced key go.
        self.handle(other).insert(key, code, layers=None if as_none and not layers else layers)
        self.model[key] = (code, layers)

    @rule(key=KEYS, data=st.data(), other=st.booleans())
    def insert_without_layers(self, key: str, data: st.DataObject, other: bool) -> None:
        code = data.draw(self.codes)
        self.handle(other).insert(key, code, {"v": 1})
        self.model[key] = (code, [])

    @rule(data=st.data(), other=st.booleans())
    def insert_many(self, data: st.DataObject, other: bool) -> None:
        keys = data.draw(st.lists(KEYS, max_size=5))
        codes = [data.draw(self.codes) for _ in keys]
        layers = data.draw(st.none() | st.lists(st.none() | self.layers, min_size=len(keys), max_size=len(keys)))
        self.handle(other).insert_many(keys, codes, layers=layers)
        for i, k in enumerate(keys):  # a repeated key takes its last code and layers
            self.model[k] = (codes[i], [] if layers is None or layers[i] is None else layers[i])

    @rule(data=st.data(), other=st.booleans())
    def write_batch(self, data: st.DataObject, other: bool) -> None:
        keys = data.draw(st.lists(KEYS, min_size=1, max_size=4))
        ops = []
        for k in keys:
            if data.draw(st.booleans()) or k not in self.model:
                code, layers = data.draw(self.codes), data.draw(self.layers)
                ops.append(("insert", {"key": k, "code": code, "layers": layers}))
                self.model[k] = (code, layers)
            else:
                ops.append(("delete", {"key": k}))
                self.model.pop(k)
        results = self.handle(other).write_batch(ops)
        assert not [r for r in results if isinstance(r, Exception)]

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

    @rule(data=st.data(), r=st.integers(0, 16) | st.integers(0, 70), force=st.sampled_from(FORCES), other=st.booleans())
    def layer_radius(self, data: st.DataObject, r: int, force: str | None, other: bool) -> None:
        query = data.draw(self.codes)
        assert self.handle(other).layer_radius(query, r, force=force) == brute_layer_radius(self.model, query, r)

    @rule(data=st.data(), r=st.integers(0, 20), force=st.sampled_from(FORCES), other=st.booleans())
    def layer_radius_many(self, data: st.DataObject, r: int, force: str | None, other: bool) -> None:
        queries = data.draw(st.lists(self.codes, max_size=3))
        expected = [brute_layer_radius(self.model, q, r) for q in queries]
        assert self.handle(other).layer_radius_many(queries, r, force=force) == expected

    @precondition(lambda self: self.model)
    @rule(data=st.data(), other=st.booleans())
    def layers_of_a_key(self, data: st.DataObject, other: bool) -> None:
        key = data.draw(st.sampled_from(sorted(self.model)))
        assert self.handle(other).layers(key) == self.model[key][1]

    @invariant()
    def counts_match(self) -> None:
        assert self.db.layer_count() == sum(len(ls) for _, ls in self.model.values())
        assert self.db.stats()["layers"] == self.db.layer_count()
        assert len(self.db) == len(self.model)


SETTINGS = settings(
    max_examples=25,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class Machine128(LayersMachine):
    bits = 128


class PersistedLayersMachine(LayersMachine):
    """The same, with the layer index file written on every close and older copies of it put back (stale by
    a few writes, or compacted past): answers must stay exactly the brute force's."""

    def __init__(self) -> None:
        self.saved_min = live_index.PERSIST_MIN_CODES
        live_index.PERSIST_MIN_CODES = 0
        super().__init__()
        self.kept: str | None = None

    def teardown(self) -> None:
        try:
            super().teardown()
        finally:
            live_index.PERSIST_MIN_CODES = self.saved_min

    @rule()
    def keep_layer_index_file(self) -> None:
        current = persist.path_in(self.path, persist.LAYERS_FILENAME)
        if os.path.exists(current):
            self.kept = f"{self.dir}/kept.index"
            shutil.copyfile(current, self.kept)

    @precondition(lambda self: self.kept is not None)
    @rule()
    def put_back_an_older_layer_index_file_and_reopen(self) -> None:
        self.db.close()
        self.other.close()
        shutil.copyfile(self.kept, persist.path_in(self.path, persist.LAYERS_FILENAME))
        self.db = HashDB(self.path)
        self.other = HashDB(self.path)


TestLayers64 = LayersMachine.TestCase
TestLayers64.settings = SETTINGS
TestLayers128 = Machine128.TestCase
TestLayers128.settings = settings(SETTINGS, max_examples=10)
TestLayersPersisted = PersistedLayersMachine.TestCase
TestLayersPersisted.settings = settings(SETTINGS, max_examples=15)


# ------------------------------------------------------------------------------------------- plain tests

BITS = 64


def c(i: int) -> bytes:
    return i.to_bytes(BITS // 8, "big")


def everything(db: HashDB) -> tuple[object, ...]:
    """All a reader can observe of models and layers."""
    st_ = db.stats()
    return (
        {k: (db.get(k), db.layers(k)) for k in db},
        db.layer_count(),
        db.layer_radius(c(0), BITS),
        st_["log_seq"],
        st_["layers"],
    )


def test_insert_replace_delete_and_the_order_of_matches(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with HashDB(tmp_path / "db", bits=BITS) as db:
        db.insert("b", c(1), layers=[("conv1", c(1)), ("conv2", c(3))])
        db.insert("a", c(2), layers=[("x", c(3)), ("y", c(1))])
        # distance, then model key, then the layer's position in its model
        assert db.layer_radius(c(1), 1) == [("a", "y", 0), ("b", "conv1", 0), ("a", "x", 1), ("b", "conv2", 1)]
        assert db.layers("b") == [("conv1", c(1)), ("conv2", c(3))]
        db.insert("b", c(1), layers=[("only", c(7))])  # replacing a key replaces its layers
        assert db.layers("b") == [("only", c(7))]
        db.insert("a", c(2))  # no layers given: the earlier ones go, as meta=None removes metadata
        assert db.layers("a") == [] and db.layer_count() == 1
        assert db.delete("b")
        assert db.layer_count() == 0 and db.layer_radius(c(7), BITS) == []
        with pytest.raises(KeyNotFound):
            db.layers("b")
        assert db.stats()["layers"] == 0 and "layer_index_bytes" in db.stats()


BAD_LAYERS = [
    ([("", c(1))], InvalidArgument, "non-empty str"),
    ([(b"conv", c(1))], InvalidArgument, "non-empty str"),
    ([("x" * (MAX_LAYER_NAME_BYTES + 1), c(1))], InvalidArgument, "utf-8 bytes"),
    ([("\ud800", c(1))], InvalidArgument, "utf-8"),
    ([("conv", b"\x00" * 3)], InvalidCode, "layer 0 ('conv') of key 'm1'"),
    ([("conv", c(1), "extra")], InvalidArgument, "(name, code) pair"),
    ("conv", InvalidArgument, "sequence of (name, code) pairs"),
    ([(f"l{i}", c(i)) for i in range(MAX_LAYERS + 1)], InvalidArgument, f"at most {MAX_LAYERS}"),
]


@pytest.mark.parametrize(("bad", "error", "words"), BAD_LAYERS)
def test_a_bad_layer_anywhere_leaves_the_database_as_it_was(tmp_path, bad, error, words) -> None:  # type: ignore[no-untyped-def]
    with HashDB(tmp_path / "db", bits=BITS) as db:
        db.insert_many(["m0", "m1"], [c(0), c(1)], layers=[[("a", c(0))], [("b", c(1))]])
        before = everything(db)
        with pytest.raises(error, match=None) as caught:
            db.insert_many(["m0", "m1", "m2"], [c(5), c(6), c(7)], layers=[[("ok", c(5))], bad, None])
        assert isinstance(caught.value, HashDBError) and words in str(caught.value)
        assert "m1" in str(caught.value)  # the message names the record
        with pytest.raises(error):
            db.insert("m1", c(9), layers=bad)
        assert everything(db) == before
        # A write_batch runs the group alone after the failure: only the bad insert gets the error.
        results = db.write_batch(
            [("insert", {"key": "m0", "code": c(4), "layers": [("n", c(4))]}),
             ("insert", {"key": "m1", "code": c(4), "layers": bad})]  # fmt: skip
        )
        assert results[0] is None and isinstance(results[1], error)
        assert db.layers("m0") == [("n", c(4))] and db.layers("m1") == [("b", c(1))]


def test_layers_must_match_the_keys_in_number(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with HashDB(tmp_path / "db", bits=BITS) as db:
        with pytest.raises(InvalidArgument, match="2 keys but 1 entries of layers"):
            db.insert_many(["a", "b"], [c(1), c(2)], layers=[None])
        assert len(db) == 0


_CHILD = r"""
import json, sys
from hashdb import HashDB
path, op = sys.argv[1], sys.argv[2]
one, seven = (1).to_bytes(8, "big"), (7).to_bytes(8, "big")
with HashDB(path) as db:
    if op == "insert":
        db.insert("child", seven, layers=[("c1", seven), ("c2", one)])
    print(json.dumps([db.layer_radius(one, 0), db.layer_count()]))
"""


def child(path: str, op: str) -> list[object]:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, path, op], capture_output=True, text=True, timeout=120, env=env, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_another_process_sees_layer_writes_and_is_seen(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = str(tmp_path / "db")
    with HashDB(path, bits=BITS) as db:
        db.insert("parent", c(1), layers=[("p1", c(1))])
        assert db.layer_radius(c(1), 0) == [("parent", "p1", 0)]  # the index is built before the child writes
        assert child(path, "insert") == [[["child", "c2", 0], ["parent", "p1", 0]], 3]
        assert db.layer_radius(c(1), 0) == [("child", "c2", 0), ("parent", "p1", 0)]
        assert db.layers("child") == [("c1", c(7)), ("c2", c(1))]
        db.delete("child")
    assert child(path, "read") == [[["parent", "p1", 0]], 1]


def make_old_database(path: str) -> None:
    """A database as hashdb wrote it before layers: no layer tables, no layer id counter."""
    with HashDB(path, bits=BITS) as db:
        db.insert_many(["a", "b"], [c(1), c(2)], [{"v": 1}, None])
    env = lmdb.open(path, max_dbs=16)
    with env.begin(write=True) as txn:
        for name in LAYER_TABLES:
            txn.drop(env.open_db(name.encode(), txn=txn), delete=True)
        txn.delete(LAYER_NEXT_ID, db=env.open_db(b"meta", txn=txn))
    with env.begin() as txn:
        assert sorted(k.decode() for k, _ in txn.cursor()) == sorted(
            ["meta", "ids", "keys", "blocks", "attrs", "free", "log", "readers"]
        )
    env.close()


def test_a_database_made_before_layers_opens_read_only_and_writable(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = str(tmp_path / "old")
    make_old_database(path)
    with HashDB(path, readonly=True) as db:
        assert db.layer_count() == 0 and db.layers("a") == [] and db.layer_radius(c(1), BITS) == []
        assert db.layer_radius_many([c(1)], 3) == [[]]
        assert db.stats()["layers"] == 0 and db.radius(c(1), 0) == [("a", 0)]
        # A writer (another process) upgrades it and adds layers: this read-only handle then sees them.
        assert child(path, "insert") == [[["child", "c2", 0]], 2]
        assert db.layer_radius(c(1), 0) == [("child", "c2", 0)]
        assert db.layers("child") == [("c1", c(7)), ("c2", c(1))]
    make_old_database(str(tmp_path / "old2"))
    with HashDB(tmp_path / "old2") as db:  # a writable open creates the layer tables
        assert db.get("a") == (c(1), {"v": 1}) and db.layer_count() == 0
        db.insert("a", c(1), layers=[("l", c(3))])
        assert db.layer_radius(c(3), 0) == [("a", "l", 0)]


@pytest.fixture
def small_files(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(live_index, "PERSIST_MIN_CODES", 100)
    monkeypatch.setattr(live_index, "NUMPY_SECONDS", 0.0)


def fill(db: HashDB, n: int, seed: int) -> dict[str, tuple[bytes, Layers]]:
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, (n * 4, BITS // 8), dtype=np.uint8)
    keys = [f"k{i:04d}" for i in range(n)]
    layers = [[(f"conv{j}", codes[4 * i + j].tobytes()) for j in range(i % 4)] for i in range(n)]
    db.insert_many(keys, codes[::4], layers=layers)
    return {k: (codes[4 * i].tobytes(), layers[i]) for i, k in enumerate(keys)}


def test_the_layer_index_file_is_used_when_fresh_and_rebuilt_when_stale(tmp_path, small_files) -> None:  # type: ignore[no-untyped-def]
    path = str(tmp_path / "db")
    layer_file = persist.path_in(path, persist.LAYERS_FILENAME)
    with HashDB(path, bits=BITS) as db:
        model = fill(db, 200, seed=1)
    assert os.path.exists(layer_file) and persist.read_header(path, persist.LAYERS_FILENAME)["space"] == "layers"
    queries = [layers[0][1] for _, layers in model.values() if layers][:5]

    def check(db: HashDB) -> str | None:
        for q in queries:
            for r in (0, 5, 24):
                assert db.layer_radius(q, r) == brute_layer_radius(model, q, r)
        return db._layer_live.source

    with HashDB(path) as db:
        assert check(db) == "file"
    kept = str(tmp_path / "kept")
    shutil.copyfile(layer_file, kept)
    with HashDB(path) as db:  # enough writes for the log to be compacted past the kept file's sequence
        for i in range(0, 200, 3):
            key = f"k{i:04d}"
            db.insert(key, model[key][0], layers=[("new", c(i))])
            model[key] = (model[key][0], [("new", c(i))])
        db.compact_log(honour_readers=False)
    shutil.copyfile(kept, layer_file)
    with HashDB(path) as db:
        assert check(db) == "tables"  # stale: not trusted, rebuilt from LMDB
    # The model index file renamed as the layer one is foreign: rebuilt, answers unchanged.
    shutil.copyfile(persist.path_in(path), layer_file)
    with HashDB(path) as db:
        assert check(db) == "tables"


def test_refresh_warms_the_layer_index_only_when_there_are_layers(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with HashDB(tmp_path / "db", bits=BITS) as db:
        db.insert("a", c(1))
        db.refresh()
        assert db.stats()["index_bytes"] > 0 and db.stats()["layer_index_bytes"] == 0
        db.insert("b", c(2), layers=[("l", c(2))])
        db.refresh()
        assert db.stats()["layer_index_bytes"] > 0
        assert db.layer_radius(c(2), 0, force="mih") == [("b", "l", 0)]
