"""HashDB: the public object. Validates input, writes through store.py, answers queries from hashdb.index.

Consistency: the in-memory index remembers the last log sequence it applied. Every query opens one read
transaction, compares that with the newest sequence in the log, replays what is new (or rebuilds when the
log was compacted past it), answers from the index, and maps ids back to keys in the same snapshot. So a
query sees every write committed before it began, by this process or any other. The index's life (log
replay, the index file, the move from numpy to the numba kernels, the readers table) is one LiveIndex
(live_index.py) that each handle owns.

Per-layer codes (``insert(..., layers=)``) are a second space of records in the same environment, written in
the same transaction as their model's record, with their own log and their own LiveIndex (its own index
file), so ``layer_radius`` is exact and current in the same way. A layer match maps back to (model key,
layer name) in the query's snapshot.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import numpy as np

from .codes import Code, bytes_to_words, check_bits, many_to_bytes, to_bytes
from .errors import InvalidArgument, InvalidCode, InvalidKey, InvalidMeta, KeyNotFound, StorageError, shown
from .index.contract import FORCES  # noqa: F401 - numpy only; defined once there, re-exported for callers
from .live_index import LiveIndex
from .store import (
    DEFAULT_MODE,
    MAX_KEY_BYTES,
    MAX_LAYERS,
    Change,
    LayerSet,
    LogBatch,
    Store,
    Txn,
    open_store,
    pack_meta,
    release_store,
)

if TYPE_CHECKING:
    from .index.memory import MemoryIndex
    from .ingest import Outcome
    from .matching import ModelMatch

log = logging.getLogger(__name__)

ITER_CHUNK = 4096  # keys per read transaction while iterating: no snapshot is held across user code

Match = tuple[str, int]
Pair = tuple[str, str, int]
LayerMatch = tuple[str, str, int]  # (model key, layer name, distance)
JOIN_ENGINES = ("local", "ray")
MAX_LAYER_NAME_BYTES = 1024  # utf-8 bytes of one layer name (tensor names are rarely over 200)


class Cluster(NamedTuple):
    """A connected component of the "within r" graph: its keys (sorted) and edges (key_a, key_b, distance)."""

    keys: list[str]
    edges: list[Pair]


def _persist() -> Any:
    from .index import persist  # numpy only

    return persist


def key_bytes(key: Any) -> bytes:
    """The utf-8 bytes of a valid key, or InvalidKey."""
    if not isinstance(key, str):
        raise InvalidKey(f"key must be a str, got {type(key).__name__}")
    if not key:
        raise InvalidKey("key must not be empty")
    try:
        raw = key.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidKey(f"key is not encodable as utf-8: {e}") from None
    if len(raw) > MAX_KEY_BYTES:
        raise InvalidKey(f"key is {len(raw)} utf-8 bytes; at most {MAX_KEY_BYTES} are allowed")
    return raw


def keys_bytes(keys: list[Any]) -> list[bytes]:
    """key_bytes() of every key; the common all-valid case runs without a Python call per key."""
    if all(type(k) is str for k in keys):
        try:
            raw = [k.encode("utf-8") for k in keys]
        except UnicodeEncodeError:
            raw = None
        if raw is not None and (not raw or (min(map(len, raw)) > 0 and max(map(len, raw)) <= MAX_KEY_BYTES)):
            return raw
    return [key_bytes(k) for k in keys]


def meta_bytes(meta: Any) -> bytes | None:
    """msgpack of a metadata dict (None for no metadata), or InvalidMeta."""
    if meta is None:
        return None
    if not isinstance(meta, dict):
        raise InvalidMeta(f"meta must be a dict or None, got {type(meta).__name__}")
    try:
        return pack_meta(meta)
    except (TypeError, ValueError, OverflowError) as e:
        raise InvalidMeta(f"meta is not msgpack-serializable: {e}") from None


def layer_set(layers: Any, bits: int, key: Any, names_seen: dict[str, bytes] | None = None) -> LayerSet | None:
    """One model's layers, ``[(name, code), ...]``, validated and packed (None when there are none), or
    InvalidArgument / InvalidCode naming the key and the layer. ``names_seen`` carries the names already
    checked (and packed) between the models of one call: most models of a collection share layer names."""
    if layers is None:
        return None
    if isinstance(layers, str | bytes | dict) or not isinstance(layers, Iterable):
        raise InvalidArgument(
            f"layers of key {shown(key)} must be a sequence of (name, code) pairs, got {type(layers).__name__}"
        )
    items = list(layers)
    if not items:
        return None
    if len(items) > MAX_LAYERS:
        raise InvalidArgument(f"key {shown(key)} has {len(items)} layers; at most {MAX_LAYERS} are allowed")
    seen = {} if names_seen is None else names_seen
    nbytes = bits // 8
    names: list[bytes] = []
    codes: list[bytes] = []
    for i, item in enumerate(items):
        if not isinstance(item, tuple | list) or len(item) != 2:
            raise InvalidArgument(f"layer {i} of key {shown(key)} must be a (name, code) pair, got {shown(item)}")
        name, code = item
        packed = seen.get(name) if type(name) is str else None
        if packed is None:
            packed = seen[name] = _layer_name(name, i, key)
        names.append(packed)
        if type(code) is bytes and len(code) == nbytes:  # the common case, as the codec gives them
            codes.append(code)
            continue
        try:
            codes.append(to_bytes(code, bits))
        except InvalidCode as e:
            raise InvalidCode(f"layer {i} ({shown(name)}) of key {shown(key)}: {e}") from None
    return names, b"".join(codes)


def _layer_name(name: Any, i: int, key: Any) -> bytes:
    """A valid layer name as stored (msgpack of the str), or InvalidArgument."""
    if not isinstance(name, str) or not name:
        raise InvalidArgument(f"layer {i} of key {shown(key)}: its name must be a non-empty str, got {shown(name)}")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise InvalidArgument(f"layer {i} of key {shown(key)}: its name is not encodable as utf-8: {e}") from None
    if size > MAX_LAYER_NAME_BYTES:
        raise InvalidArgument(
            f"layer {i} of key {shown(key)}: its name is {size} utf-8 bytes; at most {MAX_LAYER_NAME_BYTES} are allowed"
        )
    return pack_meta(name)


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        raise InvalidArgument(f"{name} must be an int >= {low}, got {shown(value)}")
    return int(value)


def _check_force(force: Any) -> str | None:
    from .index.contract import check_force  # numpy only

    return check_force(force)


def _as_list(items: Any, what: str) -> list[Any]:
    if isinstance(items, str | bytes | dict) or not isinstance(items, Iterable):
        raise InvalidArgument(f"{what} must be a sequence, got {type(items).__name__}")
    return list(items)


class HashDB:
    """An exact Hamming-distance database of fixed-width binary codes under string keys.

    ``HashDB(path, bits=256)`` creates the directory or opens it; ``bits`` is stored and must match on
    reopen (BitsMismatch); ``bits=None`` opens an existing database with its stored width. Safe to share
    between threads of one process; several processes may open the same directory at once.

    Options: ``readonly`` (no writes, no lock-step registry entry), ``map_size`` (initial LMDB map in bytes;
    it doubles by itself when full), ``codec`` (the codec config to store with a new database, checked
    against the stored one on open), ``durable=False`` (no fsync per commit: many times more single-record
    writes per second; a crash may lose the newest transactions, never corrupt the file), ``create=False``
    (never create: a missing database is DatabaseNotFound even with ``bits``), ``mode`` (of a new database's
    directory, default 0o700 = owner only; its files get the same read/write bits, e.g. 0o770 -> files 0o660
    for a shared group; the umask is not applied). ``readonly`` takes no LMDB write lock and creates nothing.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        bits: int | None = None,
        *,
        readonly: bool = False,
        map_size: int | None = None,
        codec: dict[str, Any] | None = None,
        durable: bool = True,
        create: bool = True,
        mode: int = DEFAULT_MODE,
    ) -> None:
        if bits is not None:
            bits = check_bits(bits)
        if codec is not None and not isinstance(codec, dict):
            raise InvalidArgument(f"codec must be a dict or None, got {type(codec).__name__}")
        if codec is not None:
            meta_bytes(codec)
        self._store = open_store(
            path, bits, readonly=readonly, create=create, map_size=map_size, codec=codec, durable=durable, mode=mode
        )
        self._readonly = readonly
        self._closed = False
        if codec is not None and not readonly and self._store.get_meta("codec") is None:
            self._store.set_meta("codec", codec)
        # The in-memory index, kept in step with LMDB: log replay, index file, reader registry (live_index.py).
        self._live = LiveIndex(lambda: self._s, self._store.path, self._store.bits, readonly)
        # The same over the layer space, with its own log, readers and index file.
        self._layer_live = LiveIndex(
            lambda: self._s.layers,
            self._store.path,
            self._store.bits,
            readonly,
            _persist().LAYERS_FILENAME,
            {"space": "layers"},
        )

    # ------------------------------------------------------------------------------------- properties

    @property
    def _s(self) -> Store:
        """The store, or StorageError once this handle is closed."""
        if self._closed:
            raise StorageError(f"database {self._store.path!r} is closed")
        return self._store

    @property
    def _w(self) -> Store:
        """The store for a write, or StorageError when closed or read-only."""
        if self._readonly:
            raise StorageError(f"database {self._store.path!r} is open read-only")
        return self._s

    @property
    def bits(self) -> int:
        return self._store.bits

    @property
    def path(self) -> str:
        return self._store.path

    @property
    def readonly(self) -> bool:
        return self._readonly

    @property
    def codec(self) -> dict[str, Any] | None:
        """The codec configuration stored with the database (None if never set)."""
        return self._s.get_meta("codec")

    def set_codec(self, config: dict[str, Any] | None) -> None:
        """Store the codec configuration the codes were made with (replaces any earlier one)."""
        if config is not None and not isinstance(config, dict):
            raise InvalidArgument(f"codec must be a dict or None, got {type(config).__name__}")
        meta_bytes(config)
        self._w.set_meta("codec", config)

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self.bits} bits"
        return f"HashDB({self.path!r}, {state})"

    # ----------------------------------------------------------------------------------------- writes

    def insert(
        self,
        key: str,
        code: Code,
        meta: dict[str, Any] | None = None,
        *,
        layers: Sequence[tuple[str, Code]] | None = None,
    ) -> None:
        """Insert ``key`` or replace its code, metadata and layer codes (meta=None removes earlier metadata;
        layers=None or [] earlier layer codes). ``layers``: (layer name, code of db.bits) in the model's
        order, at most 4096, names non-empty of at most 1024 utf-8 bytes."""
        kb = key_bytes(key)
        cb = to_bytes(code, self.bits)
        mb = meta_bytes(meta)
        ls = layer_set(layers, self.bits, key)
        self._put([kb], cb, None if mb is None else [mb], None if ls is None else [ls])

    def insert_many(
        self,
        keys: Sequence[str],
        codes: Any,
        metas: Sequence[dict[str, Any] | None] | None = None,
        *,
        layers: Sequence[Sequence[tuple[str, Code]] | None] | None = None,
    ) -> int:
        """Insert or replace many records in one transaction; returns how many distinct keys were written.

        ``codes`` is a sequence of codes or an (n, bits/8) uint8 / (n, bits) bool array; ``layers`` None or
        one entry per key (its layers as insert() takes them, or None). A key repeated within the call takes
        its last code, meta and layers. Everything is validated before the transaction, so a bad record
        anywhere leaves the database unchanged.
        """
        keys = _as_list(keys, "keys")
        matrix = self._code_matrix(codes)
        if len(matrix) != len(keys):
            raise InvalidArgument(f"{len(keys)} keys but {len(matrix)} codes")
        raw_metas: list[bytes | None] | None = None
        if metas is not None:
            metas = _as_list(metas, "metas")
            if len(metas) != len(keys):
                raise InvalidArgument(f"{len(keys)} keys but {len(metas)} metas")
            raw_metas = [meta_bytes(m) for m in metas]
            if all(m is None for m in raw_metas):
                raw_metas = None
        raw_layers: list[LayerSet | None] | None = None
        if layers is not None:
            layers = _as_list(layers, "layers")
            if len(layers) != len(keys):
                raise InvalidArgument(f"{len(keys)} keys but {len(layers)} entries of layers")
            seen: dict[str, bytes] = {}
            raw_layers = [layer_set(ls, self.bits, k, seen) for k, ls in zip(keys, layers, strict=True)]
            if all(ls is None for ls in raw_layers):
                raw_layers = None
        raw_keys = keys_bytes(keys)
        if not raw_keys:
            return 0
        if len(set(raw_keys)) != len(raw_keys):  # a repeated key keeps its last code, meta and layers
            keep = sorted({k: i for i, k in enumerate(raw_keys)}.values())
            raw_keys = [raw_keys[i] for i in keep]
            matrix = matrix[keep]
            raw_metas = None if raw_metas is None else [raw_metas[i] for i in keep]
            raw_layers = None if raw_layers is None else [raw_layers[i] for i in keep]
        # Sorted keys make LMDB's inserts sequential: measured 0.36 s vs 1.09 s for 1M keys in random order.
        order = sorted(range(len(raw_keys)), key=raw_keys.__getitem__)
        kb = [raw_keys[i] for i in order]
        mb = None if raw_metas is None else [raw_metas[i] for i in order]
        lb = None if raw_layers is None else [raw_layers[i] for i in order]
        self._put(kb, matrix[np.fromiter(order, np.intp, len(order))].tobytes(), mb, lb)
        return len(kb)

    def write_batch(self, ops: Sequence[tuple[str, dict[str, Any]]]) -> list[Any]:
        """Run writes in order: ``[("insert", {"key", "code", "meta"?, "layers"?}), ("delete", {"key"}), ...]``.

        Returns one entry per op: its result, or the exception it raised (never raised; lmdb failures come
        as StorageError), and the later ops still run. Inserts next to each other commit as one
        insert_many (one transaction, one fsync), a key written twice taking its last code and meta as if
        they ran one after the other; if that commit fails, nothing of it was written and each insert of
        the group runs alone, so only a bad one gets the error. Ops: insert, insert_many, delete, delete_many.
        """
        results: list[Any] = []
        i = 0
        while i < len(ops):
            j = i
            while j < len(ops) and ops[j][0] == "insert":
                j += 1
            if j - i > 1:
                group = [args for _, args in ops[i:j]]
                try:
                    metas = [a.get("meta") for a in group]
                    layers = [a.get("layers") for a in group]
                    keys = [a["key"] for a in group]
                    codes = [a["code"] for a in group]
                    self.insert_many(keys, codes, metas, layers=None if all(x is None for x in layers) else layers)
                except Exception:  # noqa: BLE001 - a bad entry or a failed commit: run them one by one below
                    pass
                else:
                    results.extend([None] * len(group))
                    i = j
                    continue
            for name, args in ops[i : max(j, i + 1)]:
                results.append(self._write_one(name, args))
            i = max(j, i + 1)
        return results

    def _write_one(self, name: str, args: dict[str, Any]) -> Any:
        if name not in ("insert", "insert_many", "delete", "delete_many", "set_codec"):
            return InvalidArgument(f"not a write operation: {shown(name)}")
        try:
            return getattr(self, name)(**args)
        except TypeError as e:  # arguments that do not fit the method
            return InvalidArgument(f"{name}: {e}")
        except Exception as e:  # noqa: BLE001 - returned in the op's place, by contract (the store raises
            return e  # StorageError for every LMDB failure)
            return e

    def _code_matrix(self, codes: Any) -> np.ndarray:
        """Codes as an (n, bits/8) uint8 matrix; an array input is converted without a step per row."""
        nb = self.bits // 8
        if isinstance(codes, np.ndarray) and codes.ndim == 2:
            if codes.dtype == np.uint8 and codes.shape[1] == nb:
                return np.ascontiguousarray(codes)
            if codes.dtype == np.bool_ and codes.shape[1] == self.bits:
                return np.packbits(codes, axis=1)
        raw = many_to_bytes(codes, self.bits)
        return np.frombuffer(b"".join(raw), dtype=np.uint8).reshape(len(raw), nb)

    def _put(
        self, kb: list[bytes], codes: bytes, mb: list[bytes | None] | None, lb: list[LayerSet | None] | None
    ) -> None:
        reserve = self._s.reserve_for_put(kb, mb, lb)

        def body(txn: Txn) -> tuple[int, int, LogBatch, Change | None]:
            result = self._s.put_many(txn, kb, codes, mb, lb)
            self._maintain(txn, result[3] is not None)
            return result

        self._after_write(*self._w.write(body, reserve=reserve))

    def add_models(
        self,
        sources: Iterable[Any],
        *,
        workers: int | None = None,
        engine: str = "local",
        ray_address: str | None = None,
        meta: dict[str, Any] | None = None,
        incremental: bool = True,
        timeout: float | None = None,
    ) -> Iterator[Outcome]:
        """Hash the models at ``sources`` (files, folders, ModelUnits) and store them: what ``hashdb add``
        does (hashdb.ingest.add_models). Yields one ``Outcome`` per entry: added, replaced, unchanged (its
        file was stored before and has not changed since: not hashed again) or failed (with the error)."""
        from .ingest import add_models

        return add_models(self, sources, workers=workers, engine=engine, ray_address=ray_address, meta=meta,
                          incremental=incremental, timeout=timeout)  # fmt: skip

    def check_codec(self, config: dict[str, Any]) -> str | None:
        """Record ``config`` as the database's codec if it holds none; return a warning when it holds another
        (the one set-or-warn rule of add, import and ``export | add``: hashdb.ingest.check_codec)."""
        from .ingest import check_codec

        return check_codec(self, config)

    def delete(self, key: str) -> bool:
        """Delete ``key``; False if it was absent."""
        return self.delete_many([key]) == 1

    def delete_many(self, keys: Sequence[str]) -> int:
        """Delete keys in one transaction (absent ones are ignored); returns how many existed."""
        kb = sorted({key_bytes(k) for k in _as_list(keys, "keys")})
        if not kb:
            return 0

        def body(txn: Txn) -> tuple[int, int, LogBatch, Change | None]:
            result = self._s.delete_many(txn, kb)
            if result[1] != result[0]:
                self._maintain(txn, result[3] is not None)
            return result

        prev, seq, batch, layer_change = self._w.write(body)
        self._after_write(prev, seq, batch, layer_change)
        return len(batch.deleted_ids)

    def _maintain(self, txn: Txn, layers_changed: bool = False) -> None:
        """Inside a write: record our log position (a compaction hint) and compact the log (the layer log
        too when this write changed layers)."""
        live = self._live
        if live.index is not None:
            self._s.set_reader(txn, live.token, live.applied)
        self._s.compact_log(txn)
        if layers_changed:
            layer_live = self._layer_live
            if layer_live.index is not None:
                self._s.layers.set_reader(txn, layer_live.token, layer_live.applied)
            self._s.layers.compact_log(txn)

    def _after_write(self, prev: int, seq: int, batch: LogBatch, layer_change: Change | None = None) -> None:
        self._live.after_write(prev, seq, batch)
        if layer_change is not None:
            self._layer_live.after_write(*layer_change)

    def compact_log(self, honour_readers: bool = True) -> int:
        """Drop log entries every live reader has applied (all but the newest with honour_readers=False),
        in the models' log and the layers' log.

        Writes compact automatically; this is for tools and tests. Readers left behind rebuild their index
        from the tables on their next query. Returns the number of entries dropped.
        """
        store = self._w

        def body(txn: Txn) -> int:
            return store.compact_log(txn, honour_readers) + store.layers.compact_log(txn, honour_readers)

        return store.write(body)

    # ------------------------------------------------------------------------------------------ reads

    def get(self, key: str) -> tuple[bytes, dict[str, Any] | None]:
        """(code bytes, meta or None) of ``key``; KeyNotFound if absent."""
        kb = key_bytes(key)
        with self._s.read() as txn:
            found = self._s.get(txn, kb)
        if found is None:
            raise KeyNotFound(f"key not found: {shown(key, 600)}")
        return found

    def __contains__(self, key: object) -> bool:
        try:
            kb = key_bytes(key)
        except InvalidKey:
            return False
        with self._s.read() as txn:
            return self._s.contains(txn, kb)

    def __len__(self) -> int:
        with self._s.read() as txn:
            return self._s.count(txn)

    def __iter__(self) -> Iterator[str]:
        """Keys in utf-8 byte order. Each chunk is read in its own snapshot: concurrent writes may show."""
        after = None
        while True:
            with self._s.read() as txn:
                chunk = self._s.keys_after(txn, after, ITER_CHUNK)
            if not chunk:
                return
            for kb in chunk:
                yield kb.decode("utf-8")
            after = chunk[-1]

    def keys(self) -> list[str]:
        return list(self)

    def layers(self, key: str) -> list[tuple[str, bytes]]:
        """(layer name, code) of each layer code stored with ``key``, in stored order; KeyNotFound if absent."""
        kb = key_bytes(key)
        self._s.find_layer_tables()
        with self._s.read() as txn:
            found = self._s.layers_of(txn, kb)
        if found is None:
            raise KeyNotFound(f"key not found: {shown(key, 600)}")
        return found

    def layer_count(self) -> int:
        """How many layer codes the database holds (over all models)."""
        self._s.find_layer_tables()
        with self._s.read() as txn:
            return self._s.layers.count(txn)

    def keys_after(self, after: str | None = None, limit: int = ITER_CHUNK) -> list[str]:
        """Up to ``limit`` keys in utf-8 byte order, strictly after ``after`` (from the first when None)."""
        limit = _check_int("limit", limit, 1)
        start = None if after is None else key_bytes(after)
        with self._s.read() as txn:
            return [kb.decode("utf-8") for kb in self._s.keys_after(txn, start, limit)]

    # ---------------------------------------------------------------------------------------- queries

    def radius(self, code: Code, r: int, force: str | None = None) -> list[Match]:
        """Every key within Hamming distance <= r of ``code``, sorted by (distance, key)."""
        return self._radius_one(code, r, force, layers=False)

    def radius_many(self, codes: Any, r: int, force: str | None = None) -> list[list[Match]]:
        """radius() for each code, all answered from one snapshot."""
        return self._radius_many(codes, r, force, layers=False)

    def layer_radius(self, code: Code, r: int, force: str | None = None) -> list[LayerMatch]:
        """Every stored layer code within Hamming distance <= r of ``code``, as (model key, layer name,
        distance), sorted by (distance, model key, the layer's position in its model)."""
        return self._radius_one(code, r, force, layers=True)

    def layer_radius_many(self, codes: Any, r: int, force: str | None = None) -> list[list[LayerMatch]]:
        """layer_radius() for each code, all answered from one snapshot."""
        return self._radius_many(codes, r, force, layers=True)

    def _radius_one(self, code: Code, r: int, force: str | None, *, layers: bool) -> list[Any]:
        """radius() over the model codes, or layer_radius() over the layer codes."""
        r = _check_int("r", r, 0)
        force = _check_force(force)
        query = bytes_to_words(to_bytes(code, self.bits), self.bits)
        r = min(r, self.bits)
        ask = lambda index: [index.radius(query, r, force=force)]  # noqa: E731
        return self._query(ask, force, self._to_layer_matches if layers else None, layers=layers)[0]

    def _radius_many(self, codes: Any, r: int, force: str | None, *, layers: bool) -> list[list[Any]]:
        """radius_many() over the model codes, or layer_radius_many() over the layer codes."""
        r = _check_int("r", r, 0)
        force = _check_force(force)
        raw = many_to_bytes(codes, self.bits)
        if not raw:
            return []
        queries = bytes_to_words(raw, self.bits)
        r = min(r, self.bits)
        ask = lambda index: index.radius_many(queries, r, force=force)  # noqa: E731
        return self._query(ask, force, self._to_layer_matches if layers else None, layers=layers)

    def knn(self, code: Code, k: int, force: str | None = None) -> list[Match]:
        """The k nearest keys, sorted by (distance, key); among equal distances the smaller keys win."""
        k = _check_int("k", k, 1)
        force = _check_force(force)
        query = bytes_to_words(to_bytes(code, self.bits), self.bits)
        # Any k past the number of codes means "all of them"; clamping keeps huge k out of the int64 kernels.
        return self._query(lambda index: [index.knn(query, max(1, min(k, len(index))), force=force)], force)[0][:k]

    def find_matches(
        self,
        code: Code,
        layers: Sequence[tuple[str, Code]] | None = None,
        *,
        radius: int | None = None,
        knn: int | None = None,
        layer_radius: int | None = None,
        family: str | None = None,
    ) -> list[ModelMatch]:
        """Whole and partial matches of a suspect, each with its rates (hashdb.matching.find_matches): what
        ``hashdb query`` answers. ``code``, ``layers`` and ``family`` come from ``ModelHasher.suspect(model)``."""
        from .matching import find_matches

        return find_matches(self, code, layers, radius=radius, knn=knn, layer_radius=layer_radius, family=family)

    def pairs(self, r: int, *, engine: str = "local", ray_address: str | None = None) -> list[Pair]:
        """Every unordered pair of keys within Hamming distance <= r, once each as (key_a, key_b, distance)
        with key_a < key_b, sorted by (distance, key_a, key_b): an exact self-join of one snapshot (MIH for
        small r, tiled all-pairs popcount for large r; hashdb/index/join.py). ``engine='ray'`` splits it into
        row blocks computed by Ray tasks (``ray_address`` as in hashdb.raycluster.ray_init); same answer."""
        r = min(_check_int("r", r, 0), self.bits)
        if engine not in JOIN_ENGINES:
            raise InvalidArgument(f"engine must be one of {JOIN_ENGINES}, got {engine!r}")

        def ask(index: Any) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
            ids = index.matrix.live_ids()
            codes = index.matrix.codes[ids]
            if engine == "ray":
                from .index.ray_join import ray_self_join

                a, b, d = ray_self_join(codes, r, address=ray_address)
            else:
                from .index.join import self_join

                a, b, d = self_join(codes, r)
            return [(ids[a], ids[b], d)]

        return self._query(ask, "kernels", self._to_pairs)[0]

    def clusters(self, r: int, *, engine: str = "local", ray_address: str | None = None) -> list[Cluster]:
        """Connected components (of two or more keys) of the graph of pairs(r), largest first, then by first key."""
        from .index.join import components

        edges = self.pairs(r, engine=engine, ray_address=ray_address)
        if not edges:
            return []
        number: dict[str, int] = {}
        ends = np.empty((2, len(edges)), np.int64)
        for k, (a, b, _) in enumerate(edges):
            ends[0, k] = number.setdefault(a, len(number))
            ends[1, k] = number.setdefault(b, len(number))
        label = components(len(number), ends[0], ends[1])
        keys = list(number)
        members: dict[int, list[str]] = {}
        for i, root in enumerate(label.tolist()):
            members.setdefault(root, []).append(keys[i])
        cluster_edges: dict[int, list[Pair]] = {}
        for k, edge in enumerate(edges):
            cluster_edges.setdefault(int(label[ends[0, k]]), []).append(edge)
        out = [Cluster(sorted(members[root]), cluster_edges[root]) for root in members]
        out.sort(key=lambda c: (-len(c.keys), c.keys[0]))
        return out

    def refresh(self) -> int:
        """Bring the in-memory index up to date and build its tables now, not when queries make them pay off
        (a server about to answer many queries); returns the log sequence it reflects."""
        self._query(lambda index: [], "kernels")
        lives = [self._live]
        if self.layer_count():
            self._query(lambda index: [], "kernels", layers=True)
            lives.append(self._layer_live)
        for live in lives:
            with live.lock:
                index = live.index
                if index is not None and index.engine == "kernels":  # forced there by the query above
                    cast("MemoryIndex", index).prepare()
        return self._live.applied

    def _query(self, ask: Any, force: str | None = None, convert: Any = None, *, layers: bool = False) -> list[Any]:
        """Answer ``ask(index)`` from the index of the models (or of the layers) brought to one snapshot, and
        ``convert`` each answer to keys in that snapshot."""
        if layers:
            self._s.find_layer_tables()
        for _ in range(100):
            live = self._layer_live if layers else self._live
            with self._s.read() as txn:
                last = (self._s.layers if layers else self._s).last_seq(txn)
                with live.lock:
                    if live.index is not None and live.applied > last:
                        continue  # another thread refreshed from a newer snapshot: take a newer one too
                    try:
                        answers = live.answer(txn, last, ask, force)
                    except _persist().Rejected as e:  # a mapped chunk failed its check mid-query
                        log.info("index file of %r not used: %s", self.path, e)
                        live.index, live.file_rejected = None, True
                        answers = live.answer(txn, last, ask, force)
                out = [(convert or self._to_matches)(txn, *answer) for answer in answers]
            live.register_if_due()
            return out
        raise StorageError("could not get a snapshot at least as new as the index")

    def _to_matches(self, txn: Txn, ids: np.ndarray, dists: np.ndarray) -> list[Match]:
        if len(ids) == 0:
            return []
        keys = self._s.keys_of(txn, ids)
        pairs = sorted(zip(np.asarray(dists).tolist(), keys, strict=True))
        return [(k.decode("utf-8"), d) for d, k in pairs]

    def _to_layer_matches(self, txn: Txn, ids: np.ndarray, dists: np.ndarray) -> list[LayerMatch]:
        if len(ids) == 0:
            return []
        owners = self._s.layer_owners(txn, ids)
        rows = sorted(
            (d, model, position, name)
            for d, (model, position, name) in zip(np.asarray(dists).tolist(), owners, strict=True)
        )
        return [(model.decode("utf-8"), name, d) for d, model, _, name in rows]

    def _to_pairs(self, txn: Txn, ids_a: np.ndarray, ids_b: np.ndarray, dists: np.ndarray) -> list[Pair]:
        if len(dists) == 0:
            return []
        ids, where = np.unique(np.concatenate([ids_a, ids_b]), return_inverse=True)
        keys = [k.decode("utf-8") for k in self._s.keys_of(txn, ids)]
        n = len(ids_a)
        out = []
        for x, y, d in zip(where[:n].tolist(), where[n:].tolist(), np.asarray(dists).tolist(), strict=True):
            a, b = keys[x], keys[y]
            out.append((a, b, d) if a < b else (b, a, d))
        out.sort(key=lambda p: (p[2], p[0], p[1]))
        return out

    def save_index(self) -> str | None:
        """Write the index file now (building the tables first if needed): the in-memory index, stamped with
        the log sequence it reflects, so the next process maps it instead of rebuilding. Returns its path, or
        None when the directory is not writable. ``close()`` does this by itself when it pays off."""
        self._query(lambda index: [], "kernels")
        with self._live.lock:
            return self._live.write_file()

    # ------------------------------------------------------------------------------------ housekeeping

    def stats(self) -> dict[str, Any]:
        """Counts, sizes and log positions (for the CLI's ``stats`` and monitoring)."""
        self._s.find_layer_tables()
        found = self._s.stats()
        live = self._live
        with live.lock:
            index = None if live.index is None else live.index.stats()
            index_bytes = 0 if live.index is None else int(live.index.nbytes())
            applied = live.applied
        with self._layer_live.lock:
            layer_index = self._layer_live.index
            layer_index_bytes = 0 if layer_index is None else int(layer_index.nbytes())
        return {
            "count": found["count"],
            "bits": self.bits,
            "path": self.path,
            "readonly": self.readonly,
            "created": found["created"],
            "map_size": found["map_size"],
            "map_used": found["map_used"],
            "ids_allocated": found["ids_allocated"],
            "log_seq": found["log_seq"],
            "log_first_seq": found["log_first_seq"],
            "log_entries": found["log_entries"],
            "readers": found["readers"],
            "index_seq": applied,
            "index_rebuilds": self._live.rebuilds,
            "index_source": self._live.source,
            "index_bytes": index_bytes,
            "index": index,
            "layers": found["layers"],
            "layer_index_bytes": layer_index_bytes,
        }

    def close(self) -> None:
        """Release the index and this handle's share of LMDB; idempotent. Other methods raise StorageError."""
        if self._closed:
            return
        store = self._store
        if not self.readonly and (self._live.registered_at is not None or self._layer_live.registered_at is not None):

            def forget(txn: Txn) -> None:
                store.set_reader(txn, self._live.token, None)
                store.layers.set_reader(txn, self._layer_live.token, None)

            try:
                store.write(forget)
            except StorageError:
                pass  # a stale registry entry only delays compaction until its pid is gone
        try:
            if self._live.file_due():
                self.save_index()
        except Exception:  # noqa: BLE001 - the index file is an optimisation: closing must not fail on it
            log.exception("could not refresh the index file of %r", self.path)
        try:
            if self._layer_live.file_due():
                self._query(lambda index: [], "kernels", layers=True)
                with self._layer_live.lock:
                    self._layer_live.write_file()
        except Exception:  # noqa: BLE001 - as above
            log.exception("could not refresh the layer index file of %r", self.path)
        self._closed = True
        release_store(self._store)
        with self._live.lock:
            self._live.index = None
        with self._layer_live.lock:
            self._layer_live.index = None

    def __del__(self) -> None:
        # A handle dropped without close() must not keep the shared environment open forever.
        try:
            if not self._closed:
                self._closed = True
                release_store(self._store)
        except Exception:  # noqa: BLE001 - nothing sensible to do in a finalizer (e.g. at interpreter exit)
            pass

    def __enter__(self) -> HashDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = [
    "MAX_LAYERS",
    "MAX_LAYER_NAME_BYTES",
    "HashDB",
    "LayerMatch",
    "Match",
    "key_bytes",
    "layer_set",
    "meta_bytes",
]
