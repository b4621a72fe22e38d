"""Store: one open database (environment + tables + records + log), and the process's one Store per path.

This module ties the parts together; it knows keys, bytes and numpy arrays, not the in-memory index.
``HashDB`` (db.py) ties the two together.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import lmdb
import numpy as np

from ..codes import check_bits
from ..errors import BitsMismatch, NotADatabase, StorageError
from .env import DEFAULT_MODE, Environment, Txn, check_path, file_identity
from .log import OP_DELETE, OP_PUT, ChangeLog, LogBatch
from .records import Records, block_size, put_reserve
from .schema import (
    Tables,
    check_meta,
    database_id,
    get_meta,
    init_meta,
    open_layer_tables,
    open_tables,
    pack_meta,
    pack_seq,
    unpack_meta,
    unpack_seq,
)

LAYER_NEXT_ID = b"layer_next_id"
_POSITION = struct.Struct(">H")  # a layer's position in its model: the last 2 bytes of its key
# What one write did to one space: (sequence before, sequence after, the batch); None when untouched.
Change = tuple[int, int, LogBatch]
# One model's layers, validated: their names (msgpack of the str, as attrs values) and their joined codes.
LayerSet = tuple[list[bytes], bytes]


MAX_LAYERS = 4096  # per model: far above any CNN's eligible layers (db.py refuses more before writing)
_POSITIONS = [_POSITION.pack(p) for p in range(MAX_LAYERS)]


def layer_key(model_id: int, position: int) -> bytes:
    """The key of a layer record: its model's id and its position, so a model's layers are one key range."""
    return pack_seq(model_id) + _POSITION.pack(position)


class Store(Environment):
    """An open LMDB environment with the hashdb layout. Thread-safe; every call runs its own transaction.

    Write methods (put_many, delete_many, set_reader, compact_log) take the transaction of a ``write()``
    body; read methods take any transaction.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        bits: int | None = None,
        *,
        readonly: bool = False,
        create: bool = True,
        map_size: int | None = None,
        codec: dict[str, Any] | None = None,
        durable: bool = True,
        mode: int = DEFAULT_MODE,
    ) -> None:
        if bits is not None:
            bits = check_bits(bits)
        super().__init__(
            path,
            readonly=readonly,
            create=create and bits is not None,
            map_size=map_size,
            durable=durable,
            mode=mode,
            why_not_created="create=False was given" if not create else "no bits= was given to create it",
        )
        self.refs = 0
        self.layer_tables: Tables | None = None
        try:
            self.tables, self.layer_tables = open_tables(self)
            self.bits = init_meta(self, self.tables, bits, codec, block_size(bits) if bits is not None else 0)
            with self.read() as txn:
                block = get_meta(txn, self.tables, b"block")
                self.db_id = database_id(txn, self.tables)
        except BaseException:
            self.close()
            raise
        if not isinstance(block, int) or block <= 0 or block % 8:
            self.close()
            raise NotADatabase(f"{self.path!r} has no valid block size in its metadata: {block!r}")
        self.records = Records(self.tables, self.bits, block)
        self.log = ChangeLog(self.tables, self.bits)
        self.nbytes = self.bits // 8
        self.words = self.bits // 64
        self.block = block
        self.layer_records: Records | None = None
        self.layer_log: ChangeLog | None = None
        self._adopt_layer_tables(self.layer_tables)
        self.layers = LayerSpace(self)
        self.bitmap_bytes = self.records.bitmap_bytes
        self.block_bytes = self.records.block_bytes

    def _adopt_layer_tables(self, tables: Tables | None) -> None:
        if tables is not None:
            self.layer_records = Records(tables, self.bits, self.block, LAYER_NEXT_ID)
            self.layer_log = ChangeLog(tables, self.bits)
            self.layer_tables = tables

    def find_layer_tables(self) -> bool:
        """Whether the layer tables are open; a read-only handle of a database made before layers looks for
        them again (a writer may have added them since), with no transaction of ours active meanwhile."""
        if self.layer_records is not None:
            return True
        with self._env_lock.exclusive():
            self._check_open()
            if self.layer_records is None:
                try:
                    self._adopt_layer_tables(open_layer_tables(self, self.tables.meta))
                except lmdb.Error as e:
                    raise StorageError(f"cannot open the layer tables of {self.path!r}: {e}") from e
        return self.layer_records is not None

    # -------------------------------------------------------------------------------------------- meta

    def _get_meta(self, txn: Txn, name: bytes) -> Any:
        return get_meta(txn, self.tables, name)

    def _check_meta(self, txn: Txn, bits: int | None, codec: dict[str, Any] | None) -> int:
        return check_meta(txn, self.tables, self.path, bits, codec)

    def get_meta(self, name: str) -> Any:
        with self.read() as txn:
            return get_meta(txn, self.tables, name.encode())

    def set_meta(self, name: str, value: Any) -> None:
        packed = pack_meta(value)
        self.write(lambda txn: txn.put(name.encode(), packed, db=self.tables.meta))

    def stats(self) -> dict[str, Any]:
        """Counts, log positions, metadata and map figures of one snapshot (HashDB.stats() builds on it)."""
        with self.read() as txn:
            out = {
                "count": self.records.count(txn),
                "log_seq": self.log.last_seq(txn),
                "log_first_seq": self.log.first_seq(txn),
                "log_entries": self.log.entries(txn),
                "readers": len(self.log.readers(txn)),
                "created": get_meta(txn, self.tables, b"created"),
                "ids_allocated": get_meta(txn, self.tables, b"next_id"),
                "layers": self.layers.count(txn),
            }
        out["map_size"] = self.map_size()
        out["map_used"] = self.used_bytes()
        return out

    def current_seq(self) -> int:
        """The newest log sequence committed (0 for a database never written)."""
        with self.read() as txn:
            return self.log.last_seq(txn)

    def reserve_for_put(
        self,
        keys: Sequence[bytes],
        metas: Sequence[bytes | None] | None,
        layers: Sequence[LayerSet | None] | None = None,
    ) -> int:
        """The ``reserve=`` for a write() that upserts ``keys`` with ``metas`` (and ``layers``)."""
        reserve = put_reserve(self.nbytes, keys, metas)
        if layers is not None:
            n = sum(len(ls[0]) for ls in layers if ls is not None)
            names = sum(sum(map(len, ls[0])) for ls in layers if ls is not None)
            reserve += n * (3 * _POSITION.size + 3 * 8 + 3 * self.nbytes + 160) + names
        return reserve

    # --------------------------------------------------------------------------------------- reading

    def count(self, txn: Txn) -> int:
        return self.records.count(txn)

    def get(self, txn: Txn, key: bytes) -> tuple[bytes, Any] | None:
        return self.records.get(txn, key)

    def contains(self, txn: Txn, key: bytes) -> bool:
        return self.records.contains(txn, key)

    def keys_after(self, txn: Txn, after: bytes | None, limit: int) -> list[bytes]:
        return self.records.keys_after(txn, after, limit)

    def keys_of(self, txn: Txn, ids: np.ndarray) -> list[bytes]:
        return self.records.keys_of(txn, ids)

    def load_all(self, txn: Txn) -> tuple[np.ndarray, np.ndarray]:
        return self.records.load_all(txn)

    def layers_of(self, txn: Txn, key: bytes) -> list[tuple[str, bytes]] | None:
        """(name, code) of each layer of model ``key`` in stored order; None when the key is absent."""
        raw_id = txn.get(key, db=self.tables.ids)
        if raw_id is None:
            return None
        records = self.layer_records
        if records is None:
            return []
        out = []
        for lkey, raw_lid in records.with_prefix(txn, raw_id):
            name = unpack_meta(txn.get(lkey, db=records.tables.attrs))
            out.append((name, records.code_of(txn, unpack_seq(raw_lid))))
        return out

    def layer_owners(self, txn: Txn, ids: np.ndarray) -> list[tuple[bytes, int, str]]:
        """(model key, position, layer name) of layer ids the caller knows exist in ``txn``'s snapshot."""
        records = self.layer_records
        if records is None or not len(ids):
            return []
        get = txn.get
        keys_db, attrs_db = self.tables.keys, records.tables.attrs
        out = []
        for lkey in records.keys_of(txn, ids):
            model = get(lkey[:8], db=keys_db)
            raw_name = get(lkey, db=attrs_db)
            if model is None or raw_name is None:
                raise StorageError(f"layer {lkey.hex()} has no model or no name: the database is inconsistent")
            out.append((model, _POSITION.unpack(lkey[8:])[0], unpack_meta(raw_name)))
        return out

    # ------------------------------------------------------------------------------------------- log

    def last_seq(self, txn: Txn) -> int:
        return self.log.last_seq(txn)

    def first_seq(self, txn: Txn) -> int:
        return self.log.first_seq(txn)

    def log_entries(self, txn: Txn) -> int:
        return self.log.entries(txn)

    def log_entry(self, txn: Txn, seq: int) -> bytes | None:
        """The raw bytes of log entry ``seq`` (None when it is not in the log): what an index file stamps."""
        raw = txn.get(pack_seq(seq), db=self.tables.log) if seq > 0 else None
        return None if raw is None else bytes(raw)

    def sync(self) -> None:
        """Flush what non-durable writes left in the OS to disk (LMDB errors become StorageError)."""
        try:
            self.env.sync(True)
        except lmdb.Error as e:
            raise StorageError(f"cannot sync {self.path!r}: {e}") from e

    def read_log(self, txn: Txn, after: int) -> tuple[LogBatch, int] | None:
        return self.log.read(txn, after)

    def _append_log(self, txn: Txn, seq: int, op: bytes, ids: np.ndarray, codes: bytes) -> int:
        return self.log.append(txn, seq, op, ids, codes)

    # ----------------------------------------------------------------------------------------- writes

    def put_many(
        self,
        txn: Txn,
        keys: Sequence[bytes],
        codes: bytes,
        metas: Sequence[bytes | None] | None,
        layers: Sequence[LayerSet | None] | None = None,
    ) -> tuple[int, int, LogBatch, Change | None]:
        """Upsert validated records: distinct keys in ascending order, ``codes`` their joined canonical bytes,
        ``layers`` None (no key has layers) or one entry per key. A replaced key's earlier layers go.

        Returns (sequence before, sequence after, what changed) of the models, and the same of the layers
        (None when no layer was written or removed).
        """
        prev = self.log.last_seq(txn)
        ids, replaced = self.records.put(txn, keys, codes, metas)
        seq = self._append_log(txn, prev, OP_PUT, ids, codes)
        words = np.frombuffer(codes, dtype="<u8").reshape(len(keys), self.words).astype(np.uint64)
        layer_change = self._put_layers(txn, ids, replaced, layers)
        return prev, seq, LogBatch(ids, words, np.empty(0, np.int64)), layer_change

    def delete_many(self, txn: Txn, keys: Sequence[bytes]) -> tuple[int, int, LogBatch, Change | None]:
        """Delete keys (absent ones ignored) and their layers. Returns (previous seq, new seq, batch) of the
        models and of the layers (None when no layer went)."""
        prev = self.log.last_seq(txn)
        ids = self.records.delete(txn, keys)
        seq = self._append_log(txn, prev, OP_DELETE, ids, b"") if len(ids) else prev
        layer_change = self._put_layers(txn, ids[:0], ids, None)
        return prev, seq, LogBatch(np.empty(0, np.int64), np.empty((0, self.words), np.uint64), ids), layer_change

    def _put_layers(
        self, txn: Txn, ids: np.ndarray, earlier: np.ndarray, layers: Sequence[LayerSet | None] | None
    ) -> Change | None:
        """Give the models ``ids`` the layers ``layers`` (one entry per id, or None: none of them has any),
        removing the layers models ``earlier`` had (their ids: replaced or deleted models) that are not
        rewritten. Model-only writes to a database without layers cost one table stat."""
        records, changelog = self.layer_records, self.layer_log
        if records is None or changelog is None:
            if layers is not None and any(ls is not None and ls[0] for ls in layers):
                raise StorageError(f"{self.path!r} has no layer tables (open it writable once to add them)")
            return None
        old: list[bytes] = []
        if len(earlier) and records.count(txn):
            for model_id in earlier.tolist():
                old.extend(k for k, _ in records.with_prefix(txn, pack_seq(model_id)))
        new_keys: list[bytes] = []
        names: list[bytes] = []
        code_parts: list[bytes] = []
        if layers is not None:
            # Key order is (model id, position): walk the models by id, each one's layers in order.
            for i in np.argsort(ids, kind="stable").tolist():
                found = layers[i]
                if found is not None and found[0]:
                    if len(found[0]) > MAX_LAYERS:
                        raise StorageError(f"{len(found[0])} layers for one model; at most {MAX_LAYERS} are stored")
                    base = pack_seq(int(ids[i]))
                    new_keys.extend([base + p for p in _POSITIONS[: len(found[0])]])  # layer_key() of each
                    names.extend(found[0])
                    code_parts.append(found[1])
        if not old and not new_keys:
            return None
        prev = changelog.last_seq(txn)
        seq = prev
        kept = set(new_keys)
        gone = [k for k in old if k not in kept]
        deleted = records.delete(txn, gone) if gone else np.empty(0, np.int64)
        if len(deleted):
            seq = changelog.append(txn, seq, OP_DELETE, deleted, b"")
        codes = b"".join(code_parts)
        put_ids = np.empty(0, np.int64)
        if new_keys:
            put_ids, _ = records.put(txn, new_keys, codes, names)
            seq = changelog.append(txn, seq, OP_PUT, put_ids, codes)
        words = np.frombuffer(codes, dtype="<u8").reshape(len(new_keys), self.words).astype(np.uint64)
        return prev, seq, LogBatch(put_ids, words, deleted)

    def set_reader(self, txn: Txn, token: int, seq: int | None) -> None:
        self.log.set_reader(txn, token, seq)

    def readers(self, txn: Txn) -> dict[tuple[int, int], int]:
        return self.log.readers(txn)

    def compact_log(self, txn: Txn, honour_readers: bool = True) -> int:
        return self.log.compact(txn, honour_readers)


class LayerSpace:
    """The layer space of a Store, under the names LiveIndex asks a Store for (count, load_all, read_log,
    ...), so one LiveIndex class keeps either space's index. Before the layer tables exist (a read-only open
    of a database made before layers) it is an empty space at sequence 0."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.path = store.path
        self.bits = store.bits
        self.db_id = store.db_id

    @property
    def durable(self) -> bool:
        return self.store.durable

    @contextmanager
    def read(self) -> Iterator[Txn]:
        with self.store.read() as txn:
            yield txn

    def write(self, body: Any, reserve: int = 0) -> Any:
        return self.store.write(body, reserve)

    def sync(self) -> None:
        self.store.sync()

    def count(self, txn: Txn) -> int:
        records = self.store.layer_records
        return 0 if records is None else records.count(txn)

    def load_all(self, txn: Txn) -> tuple[np.ndarray, np.ndarray]:
        records = self.store.layer_records
        if records is None:
            return np.empty(0, np.int64), np.empty((0, self.store.words), np.uint64)
        return records.load_all(txn)

    def last_seq(self, txn: Txn) -> int:
        changelog = self.store.layer_log
        return 0 if changelog is None else changelog.last_seq(txn)

    def first_seq(self, txn: Txn) -> int:
        changelog = self.store.layer_log
        return 0 if changelog is None else changelog.first_seq(txn)

    def log_entries(self, txn: Txn) -> int:
        changelog = self.store.layer_log
        return 0 if changelog is None else changelog.entries(txn)

    def log_entry(self, txn: Txn, seq: int) -> bytes | None:
        tables = self.store.layer_tables
        raw = txn.get(pack_seq(seq), db=tables.log) if seq > 0 and tables is not None else None
        return None if raw is None else bytes(raw)

    def read_log(self, txn: Txn, after: int) -> tuple[LogBatch, int] | None:
        changelog = self.store.layer_log
        if changelog is None:
            return LogBatch.empty(self.store.words), after
        return changelog.read(txn, after)

    def set_reader(self, txn: Txn, token: int, seq: int | None) -> None:
        if self.store.layer_log is not None:
            self.store.layer_log.set_reader(txn, token, seq)

    def readers(self, txn: Txn) -> dict[tuple[int, int], int]:
        changelog = self.store.layer_log
        return {} if changelog is None else changelog.readers(txn)

    def compact_log(self, txn: Txn, honour_readers: bool = True) -> int:
        changelog = self.store.layer_log
        return 0 if changelog is None else changelog.compact(txn, honour_readers)


_OPEN: dict[str, Store] = {}
_OPEN_LOCK = threading.Lock()


def open_store(
    path: str | os.PathLike[str],
    bits: int | None = None,
    *,
    readonly: bool = False,
    create: bool = True,
    map_size: int | None = None,
    codec: dict[str, Any] | None = None,
    durable: bool = True,
    mode: int = DEFAULT_MODE,
) -> Store:
    """The process's one Store for ``path``, opened on first use and shared by reference count.

    LMDB allows an environment to be open only once per process, so a second HashDB on the same directory
    shares the first one's Store (with its own index); the first opener's map_size and durable apply.
    Release with release_store().
    """
    if bits is not None:
        bits = check_bits(bits)
    path = check_path(path)
    real = os.path.realpath(path)
    with _OPEN_LOCK:
        store = _OPEN.get(real)
        if store is not None and store.identity != file_identity(real):
            store = None  # the directory was replaced: its holders keep the old env, we open the new one
        if store is not None and not store.closed:
            if store.readonly and not readonly:
                raise StorageError(f"{path!r} is already open read-only in this process")
            if bits is not None and bits != store.bits:
                raise BitsMismatch(f"{path!r} holds {store.bits}-bit codes, not {bits}")
            with store.read() as txn:
                store._check_meta(txn, bits, codec)
            store.refs += 1
            return store
        store = Store(
            path, bits, readonly=readonly, create=create, map_size=map_size, codec=codec, durable=durable, mode=mode
        )
        store.refs = 1
        _OPEN[real] = store
        return store


def release_store(store: Store) -> None:
    """Drop one reference; the last one closes the environment."""
    with _OPEN_LOCK:
        store.refs -= 1
        if store.refs > 0:
            return
        for real, known in list(_OPEN.items()):
            if known is store:
                del _OPEN[real]
    store.close()
