"""Store: one open database (environment + tables + records + log), and the process's one Store per path.

This module ties the parts together; it knows keys, bytes and numpy arrays, not the in-memory index.
``HashDB`` (db.py) ties the two together.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any

import lmdb
import numpy as np

from ..codes import check_bits
from ..errors import BitsMismatch, NotADatabase, StorageError
from .env import DEFAULT_MODE, Environment, Txn, check_path, file_identity
from .log import OP_DELETE, OP_PUT, ChangeLog, LogBatch
from .records import Records, block_size, put_reserve
from .schema import check_meta, database_id, get_meta, init_meta, open_tables, pack_meta, pack_seq


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
        try:
            self.tables = open_tables(self)
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
        self.bitmap_bytes = self.records.bitmap_bytes
        self.block_bytes = self.records.block_bytes

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
            }
        out["map_size"] = self.map_size()
        out["map_used"] = self.used_bytes()
        return out

    def current_seq(self) -> int:
        """The newest log sequence committed (0 for a database never written)."""
        with self.read() as txn:
            return self.log.last_seq(txn)

    def reserve_for_put(self, keys: Sequence[bytes], metas: Sequence[bytes | None] | None) -> int:
        """The ``reserve=`` for a write() that upserts ``keys`` with ``metas``."""
        return put_reserve(self.nbytes, keys, metas)

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
    ) -> tuple[int, int, LogBatch]:
        """Upsert validated records: distinct keys in ascending order, ``codes`` their joined canonical bytes.

        Returns (sequence before, sequence after, what changed).
        """
        prev = self.log.last_seq(txn)
        ids = self.records.put(txn, keys, codes, metas)
        seq = self._append_log(txn, prev, OP_PUT, ids, codes)
        words = np.frombuffer(codes, dtype="<u8").reshape(len(keys), self.words).astype(np.uint64)
        return prev, seq, LogBatch(ids, words, np.empty(0, np.int64))

    def delete_many(self, txn: Txn, keys: Sequence[bytes]) -> tuple[int, int, LogBatch]:
        """Delete keys (absent ones ignored). Returns (previous seq, new seq, batch)."""
        prev = self.log.last_seq(txn)
        ids = self.records.delete(txn, keys)
        seq = self._append_log(txn, prev, OP_DELETE, ids, b"") if len(ids) else prev
        return prev, seq, LogBatch(np.empty(0, np.int64), np.empty((0, self.words), np.uint64), ids)

    def set_reader(self, txn: Txn, token: int, seq: int | None) -> None:
        self.log.set_reader(txn, token, seq)

    def readers(self, txn: Txn) -> dict[tuple[int, int], int]:
        return self.log.readers(txn)

    def compact_log(self, txn: Txn, honour_readers: bool = True) -> int:
        return self.log.compact(txn, honour_readers)


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
