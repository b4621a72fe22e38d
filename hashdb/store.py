"""LMDB layout of a hashdb database: one environment (a directory) with named sub-databases.

    meta     name -> msgpack value: format version, bits, codec config, creation time, next id, block size
    ids      key (utf-8) -> dense id (8 bytes big-endian)
    keys     dense id (8 bytes big-endian) -> key
    blocks   block number b (8 bytes big-endian) -> the codes of ids b*B .. b*B+B-1: an alive bitmap of B
             bits (little-endian bit order), then B canonical codes (zeros where not alive)
    attrs    key -> msgpack map (user metadata; absent when the key has none)
    free     ids of deleted keys (8 bytes big-endian) -> b"", handed out again before fresh ones
    log      sequence (8 bytes big-endian) -> one batch of upserts or deletes (ids and codes)
    readers  pid + token -> last sequence that reader's in-memory index applied (compaction hint only)

Codes live in ``blocks``, by id, rather than in a key -> code table: reopening then reads a few thousand
page-sized values (one join, then numpy) instead of one value per key. Measured at 10M codes of 256 bits on
2 busy cores: reading a key -> code table and the key -> id table took 6.5 s, the codes table alone 3.75 s;
B is chosen so that one block fills two 4 KiB pages (248 codes at 256 bits), so rewriting the block of a
single insert stays cheap.

A key gets an id on first insert and keeps it while it exists. Freed ids are reused (smallest first), because
the in-memory index sizes its code matrix by the largest id: without reuse, churn would grow it without
bound. Replaying the log stays exact: each entry holds the codes themselves, and the net effect of a run of
entries is the last operation per id, whichever key the id named at the time.

This module knows keys, bytes and numpy arrays; it does not know the in-memory index. ``HashDB`` (db.py)
ties the two together.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import lmdb
import msgpack
import numpy as np

from .codes import check_bits
from .errors import BitsMismatch, InvalidArgument, StorageError

FORMAT_VERSION = 1
DEFAULT_MAP_SIZE = 1 << 30  # only address space: the file grows with the data, the map doubles when full
MAX_MAP_SIZE = 1 << 44
MAX_KEY_BYTES = 511
LOG_BATCH = 1 << 16  # records per log value; bounds the size of one value without adding many entries
# A live reader that stops querying pins the log at its position. Past this much log (or the size of the
# blocks table, if larger) compaction ignores such readers: they rebuild, which costs less than replaying.
LOG_PIN_BYTES = 64 << 20
OP_PUT = b"P"
OP_DELETE = b"D"

T = TypeVar("T")

_SEQ = struct.Struct(">Q")
_READER = struct.Struct(">IQ")
_LOG_HEAD = struct.Struct("<cI")


TABLES = ("meta", "ids", "keys", "blocks", "attrs", "free", "log", "readers")


def block_size(bits: int) -> int:
    """Codes per block: a multiple of 8 whose block (bitmap + codes + LMDB's 16-byte page header) fits 8 KiB."""
    per_code_bits = bits + 1
    return max(8, ((8192 - 64) * 8 // per_code_bits) // 8 * 8)


def pack_seq(seq: int) -> bytes:
    return _SEQ.pack(seq)


def unpack_seq(raw: bytes) -> int:
    return _SEQ.unpack(raw)[0]


def pack_meta(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def unpack_meta(raw: bytes) -> Any:
    return msgpack.unpackb(raw, raw=False, strict_map_key=False)


class RWLock:
    """Many shared holders or one exclusive holder; a waiting exclusive request blocks new shared ones.

    Not reentrant: a thread must not take the shared side twice (an exclusive waiter in between would
    deadlock it).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._shared = 0
        self._exclusive = False
        self._waiting = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive or self._waiting:
                self._cond.wait()
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                if not self._shared:
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            try:
                while self._exclusive or self._shared:
                    self._cond.wait()
            finally:
                self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


class LogBatch:
    """What one write transaction did, as flat arrays: upserted ids with their codes, and deleted ids."""

    __slots__ = ("put_ids", "put_codes", "deleted_ids")

    def __init__(self, put_ids: np.ndarray, put_codes: np.ndarray, deleted_ids: np.ndarray) -> None:
        self.put_ids = put_ids
        self.put_codes = put_codes
        self.deleted_ids = deleted_ids


def file_identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of the database file, to notice a directory deleted and created anew."""
    try:
        st = os.stat(os.path.join(path, "data.mdb"))
    except OSError:
        return None
    return st.st_dev, st.st_ino


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


class Store:
    """An open LMDB environment with the hashdb layout. Thread-safe; every call runs its own transaction."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        bits: int | None = None,
        *,
        readonly: bool = False,
        map_size: int | None = None,
        codec: dict[str, Any] | None = None,
        durable: bool = True,
    ) -> None:
        self.path = os.fspath(path)
        self.durable = durable
        self.readonly = readonly
        if bits is not None:
            bits = check_bits(bits)
        if map_size is not None and (isinstance(map_size, bool) or not isinstance(map_size, int) or map_size < 1):
            raise InvalidArgument(f"map_size must be a positive int, got {map_size!r}")
        exists = os.path.exists(os.path.join(self.path, "data.mdb"))
        if not exists and (readonly or bits is None):
            why = "it was opened read-only" if readonly else "no bits= was given to create it"
            raise StorageError(f"no hashdb database at {self.path!r}, and {why}")
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise StorageError(f"{self.path!r} exists and is not a directory")
        if not readonly:
            try:
                os.makedirs(self.path, exist_ok=True)
            except OSError as e:
                raise StorageError(f"cannot create the database directory {self.path!r}: {e}") from e
        self._env_lock = RWLock()
        self._map_lock = threading.Lock()
        try:
            self.env = lmdb.open(
                self.path,
                map_size=map_size or DEFAULT_MAP_SIZE,
                max_dbs=8,
                subdir=True,
                readonly=readonly,
                create=not readonly,
                readahead=False,
                # durable=False skips the fsync per commit: a crash may lose the newest transactions, but
                # without writemap LMDB never corrupts the file.
                sync=durable,
                metasync=durable,
            )
        except lmdb.Error as e:
            raise StorageError(f"cannot open LMDB environment at {self.path!r}: {e}") from e
        self.closed = False
        self.refs = 0
        try:
            self.page_size = int(self.env.stat()["psize"])
            # Free reader slots left by crashed processes; while held they keep LMDB from reusing pages.
            try:
                self.env.reader_check()
            except lmdb.Error:
                pass  # e.g. a lock file we may not write: only space reuse suffers
            self._open_tables(readonly)
            self.bits = self._init_meta(bits, codec)
        except BaseException:
            self.env.close()
            self.closed = True
            raise
        self.nbytes = self.bits // 8
        self.words = self.bits // 64
        self.identity = file_identity(self.path)
        with self.read() as txn:
            block = self._get_meta(txn, b"block")
        if not isinstance(block, int) or block <= 0 or block % 8:
            self.close()
            raise StorageError(f"{self.path!r} has no valid block size in its metadata: {block!r}")
        self.block = block
        self.bitmap_bytes = self.block // 8
        self.block_bytes = self.bitmap_bytes + self.block * self.nbytes

    # ----------------------------------------------------------------------------------------- opening

    def _open_tables(self, readonly: bool) -> None:
        names = TABLES
        try:
            if readonly:  # handles opened inside a read transaction die with it: let lmdb commit its own
                handles = {n: self.env.open_db(n.encode(), create=False) for n in names}
            else:
                with self.env.begin(write=True) as txn:
                    # Refuse (and leave untouched) an environment holding anything but our tables.
                    foreign = [k for k in txn.cursor().iternext(values=False) if k.decode("latin-1") not in names]
                    if foreign:
                        raise StorageError(f"{self.path!r} is an LMDB environment but not a hashdb database")
                    handles = {n: self.env.open_db(n.encode(), txn=txn) for n in names}
        except lmdb.NotFoundError as e:
            raise StorageError(f"{self.path!r} is not a hashdb database (missing table: {e})") from e
        except lmdb.Error as e:
            raise StorageError(f"cannot open the tables of {self.path!r}: {e}") from e
        self.meta_db = handles["meta"]
        self.blocks_db = handles["blocks"]
        self.attrs_db = handles["attrs"]
        self.ids_db = handles["ids"]
        self.keys_db = handles["keys"]
        self.free_db = handles["free"]
        self.log_db = handles["log"]
        self.readers_db = handles["readers"]

    def _init_meta(self, bits: int | None, codec: dict[str, Any] | None) -> int:
        with self.read() as txn:
            stored = txn.get(b"format", db=self.meta_db)
            if stored is not None:
                return self._check_meta(txn, bits, codec)
        if bits is None:
            raise StorageError(f"{self.path!r} holds no hashdb metadata, and no bits= was given to create it")
        if self.readonly:
            raise StorageError(f"{self.path!r} holds no hashdb metadata")

        def create(txn: lmdb.Transaction) -> int:
            if txn.get(b"format", db=self.meta_db) is not None:  # another process created it meanwhile
                return -1
            if txn.stat(self.ids_db)["entries"]:
                raise StorageError(f"{self.path!r} has data but no hashdb metadata")
            for name, value in (
                (b"format", FORMAT_VERSION),
                (b"bits", bits),
                (b"block", block_size(bits)),
                (b"created", time.time()),
                (b"next_id", 0),
                (b"codec", codec),
            ):
                txn.put(name, pack_meta(value), db=self.meta_db)
            return bits

        if self.write(create) == -1:
            with self.read() as txn:
                return self._check_meta(txn, bits, codec)
        return bits

    def _check_meta(self, txn: lmdb.Transaction, bits: int | None, codec: dict[str, Any] | None) -> int:
        version = unpack_meta(txn.get(b"format", db=self.meta_db))
        if version != FORMAT_VERSION:
            raise StorageError(f"{self.path!r} has format version {version!r}; this hashdb reads {FORMAT_VERSION}")
        raw = txn.get(b"bits", db=self.meta_db)
        if raw is None:
            raise StorageError(f"{self.path!r} has no stored code width")
        stored = unpack_meta(raw)
        if bits is not None and bits != stored:
            raise BitsMismatch(f"{self.path!r} holds {stored}-bit codes, not {bits}")
        if codec is not None:
            current = self._get_meta(txn, b"codec")
            if current is not None and current != codec:
                raise InvalidArgument(f"{self.path!r} was built with another codec config: {current!r}")
        return int(stored)

    def close(self) -> None:
        with self._env_lock.exclusive():
            if not self.closed:
                self.closed = True
                self.env.close()

    # ------------------------------------------------------------------------------------ transactions

    def _check_open(self) -> None:
        if self.closed:
            raise StorageError(f"database {self.path!r} is closed")

    @contextmanager
    def read(self) -> Iterator[lmdb.Transaction]:
        """A read transaction; adopts a map size another process grew."""
        for _ in range(8):
            with self._env_lock.shared():
                self._check_open()
                try:
                    txn = self.env.begin(buffers=False)
                except lmdb.MapResizedError:
                    txn = None
                if txn is not None:
                    with txn:
                        yield txn
                    return
            self._adopt_map_size()
        raise StorageError("the LMDB map keeps being resized by another process")

    def write(self, body: Callable[[lmdb.Transaction], T], reserve: int = 0) -> T:
        """Run ``body`` in one write transaction and commit; on MapFullError grow the map and rerun it.

        ``body`` must derive everything it writes from the transaction and its own arguments, so that a
        rerun after an abort is the same transaction again. ``reserve`` is an estimate of the bytes it
        adds, used to grow the map once up front rather than by repeated failures.
        """
        if self.readonly:
            raise StorageError(f"database {self.path!r} is open read-only")
        self._check_open()
        if reserve:
            self._ensure_room(reserve)
        for _ in range(64):
            grow = False
            with self._env_lock.shared():
                self._check_open()
                try:
                    with self.env.begin(write=True) as txn:
                        return body(txn)
                except lmdb.MapFullError:
                    grow = True
                except lmdb.MapResizedError:
                    pass
            if grow:
                self._grow_map()
            else:
                self._adopt_map_size()
        raise StorageError("could not commit the write: the LMDB map could not grow enough")

    def map_size(self) -> int:
        with self._env_lock.shared():  # env.info() must not race set_mapsize in another thread
            self._check_open()
            return int(self.env.info()["map_size"])

    def used_bytes(self) -> int:
        with self._env_lock.shared():
            self._check_open()
            return (int(self.env.info()["last_pgno"]) + 1) * self.page_size

    def _ensure_room(self, reserve: int) -> None:
        # Twice the estimate: LMDB keeps the previous version of every touched page until commit.
        need = self.used_bytes() + 2 * reserve
        if need > self.map_size():
            self._grow_map(need)

    def _grow_map(self, at_least: int = 0) -> None:
        with self._map_lock:
            current = self.map_size()
            target = max(2 * current, at_least)
            if target > MAX_MAP_SIZE:
                raise StorageError(f"the database needs a map larger than {MAX_MAP_SIZE} bytes")
            with self._env_lock.exclusive():
                self._check_open()
                if int(self.env.info()["map_size"]) == current:  # another thread may have grown it meanwhile
                    self.env.set_mapsize(target)

    def _adopt_map_size(self) -> None:
        with self._env_lock.exclusive():
            self._check_open()
            self.env.set_mapsize(0)  # 0 = take the size another process recorded

    # -------------------------------------------------------------------------------------------- meta

    def _get_meta(self, txn: lmdb.Transaction, name: bytes) -> Any:
        raw = txn.get(name, db=self.meta_db)
        return None if raw is None else unpack_meta(raw)

    def get_meta(self, name: str) -> Any:
        with self.read() as txn:
            return self._get_meta(txn, name.encode())

    def set_meta(self, name: str, value: Any) -> None:
        packed = pack_meta(value)
        self.write(lambda txn: txn.put(name.encode(), packed, db=self.meta_db))

    # --------------------------------------------------------------------------------------- reading

    def count(self, txn: lmdb.Transaction) -> int:
        return int(txn.stat(self.ids_db)["entries"])

    def get(self, txn: lmdb.Transaction, key: bytes) -> tuple[bytes, Any] | None:
        raw_id = txn.get(key, db=self.ids_db)
        if raw_id is None:
            return None
        code = self._code_of(txn, unpack_seq(raw_id))
        raw = txn.get(key, db=self.attrs_db)
        return code, (None if raw is None else unpack_meta(raw))

    def _code_of(self, txn: lmdb.Transaction, id_: int) -> bytes:
        blk, slot = divmod(id_, self.block)
        raw = txn.get(pack_seq(blk), db=self.blocks_db)
        if raw is None or not raw[slot >> 3] >> (slot & 7) & 1:
            raise StorageError(f"id {id_} has a key but no code: the database is inconsistent")
        start = self.bitmap_bytes + slot * self.nbytes
        return bytes(raw[start : start + self.nbytes])

    def contains(self, txn: lmdb.Transaction, key: bytes) -> bool:
        return txn.get(key, db=self.ids_db) is not None

    def keys_after(self, txn: lmdb.Transaction, after: bytes | None, limit: int) -> list[bytes]:
        """Up to ``limit`` keys in byte order, strictly after ``after`` (from the start when None)."""
        cursor = txn.cursor(db=self.ids_db)
        if after is None:
            if not cursor.first():
                return []
        else:
            if not cursor.set_range(after):
                return []
            if cursor.key() == after and not cursor.next():
                return []
        out: list[bytes] = []
        for key in cursor.iternext(keys=True, values=False):
            out.append(key)
            if len(out) >= limit:
                break
        return out

    def keys_of(self, txn: lmdb.Transaction, ids: np.ndarray) -> list[bytes]:
        """Keys of ids the caller knows exist in ``txn``'s snapshot."""
        get = txn.get
        db = self.keys_db
        packed = np.asarray(ids, dtype=">u8").tobytes()
        out = []
        for i in range(0, len(packed), 8):
            key = get(packed[i : i + 8], db=db)
            if key is None:
                raise StorageError(f"id {unpack_seq(packed[i : i + 8])} is in the index but not in the database")
            out.append(key)
        return out

    def load_all(self, txn: lmdb.Transaction) -> tuple[np.ndarray, np.ndarray]:
        """Every (id, code) of the snapshot as int64 ids (n,) and uint64 words (n, bits/64), in no set order.

        Two joins over the blocks table (its keys, its values) and a few numpy passes; no step per record.
        """
        raw_keys = b"".join(txn.cursor(db=self.blocks_db).iternext(keys=True, values=False))
        raw_vals = b"".join(txn.cursor(db=self.blocks_db).iternext(keys=False, values=True))
        blocks = np.frombuffer(raw_keys, dtype=">u8").astype(np.int64)
        n_blocks, per, bm = len(blocks), self.block, self.bitmap_bytes
        if len(raw_vals) != n_blocks * self.block_bytes:
            raise StorageError(f"the blocks table holds {len(raw_vals)} bytes, not {n_blocks} blocks")
        matrix = np.frombuffer(raw_vals, dtype=np.uint8).reshape(n_blocks, self.block_bytes)
        slots = np.arange(per, dtype=np.int64)
        full = np.all(matrix[:, :bm] == 0xFF, axis=1)
        # Full blocks (nearly all, after bulk loads) are copied whole, bitmaps dropped by a strided copy;
        # only partial blocks go through a row mask, which costs about 2.5x more per row (measured at 10M).
        if full.all():
            codes = np.ascontiguousarray(matrix[:, bm:]).reshape(-1, self.nbytes)
            ids = (blocks[:, None] * per + slots).ravel()
        else:
            whole = np.flatnonzero(full)
            part = np.flatnonzero(~full)
            alive = np.unpackbits(matrix[part, :bm], axis=1, bitorder="little").view(bool)
            part_rows = matrix[part, bm:].reshape(len(part) * per, self.nbytes)[alive.ravel()]
            part_ids = (blocks[part, None] * per + slots)[alive]
            n_whole = len(whole) * per
            codes = np.empty((n_whole + len(part_ids), self.nbytes), dtype=np.uint8)
            dest = codes[:n_whole].reshape(len(whole), per * self.nbytes)
            # Copy runs of consecutive full blocks as slices: no temporary, one pass over the bytes.
            breaks = np.flatnonzero(np.diff(whole) != 1) + 1
            runs = zip(np.r_[0, breaks].tolist(), np.r_[breaks, len(whole)].tolist(), strict=True)
            for lo, hi in runs if len(whole) else ():
                dest[lo:hi] = matrix[whole[lo] : whole[hi - 1] + 1, bm:]
            codes[n_whole:] = part_rows
            ids = np.concatenate([(blocks[whole, None] * per + slots).ravel(), part_ids])
        codes = codes.view("<u8").astype(np.uint64, copy=False)
        if len(ids) != self.count(txn):
            raise StorageError(f"{len(ids)} codes in blocks but {self.count(txn)} keys: the database is inconsistent")
        return ids, codes.reshape(len(ids), self.words)

    def _write_blocks(self, txn: lmdb.Transaction, ids: np.ndarray, rows: np.ndarray | None) -> None:
        """Set the codes of distinct ``ids`` to ``rows`` (n, bits/8) uint8, or clear them when rows is None."""
        if not len(ids):
            return
        order = np.argsort(ids, kind="stable")
        ids = ids[order]
        per, bm = self.block, self.bitmap_bytes
        blk = ids // per
        slot = ids - blk * per
        touched = np.unique(blk)
        pos = np.searchsorted(touched, blk)
        packed_keys = touched.astype(">u8").tobytes()
        bitmap = np.zeros((len(touched), bm), dtype=np.uint8)
        body = np.zeros((len(touched), per, self.nbytes), dtype=np.uint8)
        cursor = txn.cursor(db=self.blocks_db)
        last = unpack_seq(cursor.key()) if cursor.last() else -1
        get = txn.get
        db = self.blocks_db
        for i in range(int(np.searchsorted(touched, last, side="right"))):  # blocks past the end are new
            raw = get(packed_keys[8 * i : 8 * i + 8], db=db)
            if raw is not None:
                bitmap[i] = np.frombuffer(raw, dtype=np.uint8, count=bm)
                body[i] = np.frombuffer(raw, dtype=np.uint8, offset=bm).reshape(per, self.nbytes)
        alive = np.unpackbits(bitmap, axis=1, bitorder="little")
        if rows is None:
            alive[pos, slot] = 0
            body[pos, slot] = 0
        else:
            alive[pos, slot] = 1
            body[pos, slot] = rows[order]
        bitmap = np.packbits(alive, axis=1, bitorder="little")
        values = np.concatenate([bitmap, body.reshape(len(touched), -1)], axis=1)
        keep = alive.any(axis=1)
        items = [(packed_keys[8 * i : 8 * i + 8], values[i].tobytes()) for i in np.flatnonzero(keep).tolist()]
        cursor.putmulti(items, append=bool(items) and last < int(touched[0]))
        for i in np.flatnonzero(~keep).tolist():  # a block with no code left goes away
            txn.delete(packed_keys[8 * i : 8 * i + 8], db=db)

    # ------------------------------------------------------------------------------------------- log

    def last_seq(self, txn: lmdb.Transaction) -> int:
        cursor = txn.cursor(db=self.log_db)
        return unpack_seq(cursor.key()) if cursor.last() else 0

    def first_seq(self, txn: lmdb.Transaction) -> int:
        cursor = txn.cursor(db=self.log_db)
        return unpack_seq(cursor.key()) if cursor.first() else 0

    def log_entries(self, txn: lmdb.Transaction) -> int:
        return int(txn.stat(self.log_db)["entries"])

    def read_log(self, txn: lmdb.Transaction, after: int) -> tuple[LogBatch, int] | None:
        """Net effect of every log entry with sequence > ``after``: the last operation per id wins.

        Returns None when entries after ``after`` were compacted away (the caller must rebuild), else
        the batch and the newest sequence in it.
        """
        cursor = txn.cursor(db=self.log_db)
        if not cursor.set_range(pack_seq(after + 1)):
            return LogBatch(np.empty(0, np.int64), np.empty((0, self.words), np.uint64), np.empty(0, np.int64)), after
        if unpack_seq(cursor.key()) != after + 1:
            return None
        id_parts: list[np.ndarray] = []
        is_put_parts: list[np.ndarray] = []
        code_parts: list[np.ndarray] = []
        last = after
        for key, value in cursor.iternext():
            last = unpack_seq(key)
            op, n = _LOG_HEAD.unpack_from(value)
            ids = np.frombuffer(value, dtype="<i8", count=n, offset=_LOG_HEAD.size)
            id_parts.append(ids)
            if op == OP_PUT:
                start = _LOG_HEAD.size + 8 * n
                codes = np.frombuffer(value, dtype="<u8", count=n * self.words, offset=start)
                code_parts.append(codes.reshape(n, self.words))
                is_put_parts.append(np.ones(n, dtype=bool))
            else:
                code_parts.append(np.zeros((n, self.words), dtype=np.uint64))
                is_put_parts.append(np.zeros(n, dtype=bool))
        if not id_parts:
            return LogBatch(np.empty(0, np.int64), np.empty((0, self.words), np.uint64), np.empty(0, np.int64)), last
        ids = np.concatenate(id_parts).astype(np.int64)
        is_put = np.concatenate(is_put_parts)
        codes = np.concatenate(code_parts).astype(np.uint64)
        # Last occurrence of each id: unique over the reversed sequence keeps the first = the newest.
        _, rev_first = np.unique(ids[::-1], return_index=True)
        newest = len(ids) - 1 - rev_first
        newest.sort()
        put = newest[is_put[newest]]
        gone = newest[~is_put[newest]]
        return LogBatch(ids[put], codes[put], ids[gone]), last

    def _append_log(self, txn: lmdb.Transaction, seq: int, op: bytes, ids: np.ndarray, codes: bytes) -> int:
        """Append one or more entries after ``seq``; returns the newest sequence written."""
        raw_ids = np.ascontiguousarray(ids, dtype="<i8")
        nb = self.nbytes
        cursor = txn.cursor(db=self.log_db)
        for start in range(0, len(raw_ids), LOG_BATCH):
            part = raw_ids[start : start + LOG_BATCH]
            seq += 1
            value = _LOG_HEAD.pack(op, len(part)) + part.tobytes()
            if op == OP_PUT:
                value += codes[start * nb : (start + len(part)) * nb]
            cursor.put(pack_seq(seq), value, append=True)
        return seq

    # ----------------------------------------------------------------------------------------- writes

    def put_many(
        self,
        txn: lmdb.Transaction,
        keys: Sequence[bytes],
        codes: bytes,
        metas: Sequence[bytes | None] | None,
    ) -> tuple[int, int, LogBatch]:
        """Upsert validated records: distinct keys in ascending order, ``codes`` their joined canonical bytes.

        Returns (sequence before, sequence after, what changed).
        """
        prev = self.last_seq(txn)
        n = len(keys)
        nb = self.nbytes
        cursor = txn.cursor(db=self.ids_db)
        # Keys beyond the table's last key (always so for a bulk load into an empty database) can be
        # appended: LMDB then fills pages without searching or splitting.
        beyond = not cursor.last() or cursor.key() < keys[0]
        if not beyond:
            get = txn.get
            ids_db = self.ids_db
            existing: list[bytes | None] = [get(k, db=ids_db) for k in keys]
            new_pos = [i for i, e in enumerate(existing) if e is None]
        else:
            existing = [None] * n
            new_pos = list(range(n))
        n_new = len(new_pos)
        if n_new:
            new_id_bytes = self._take_free_ids(txn, n_new)
            reused = len(new_id_bytes)
            if reused < n_new:
                next_id = self._get_meta(txn, b"next_id")
                fresh = np.arange(next_id, next_id + n_new - reused, dtype=">u8").tobytes()
                new_id_bytes += [fresh[j : j + 8] for j in range(0, len(fresh), 8)]
                txn.put(b"next_id", pack_meta(next_id + n_new - reused), db=self.meta_db)
            new_keys = keys if n_new == n else [keys[i] for i in new_pos]
            cursor.putmulti(zip(new_keys, new_id_bytes, strict=True), append=beyond)
            # Ids come out ascending; when all are fresh they extend the keys table at its end.
            txn.cursor(db=self.keys_db).putmulti(zip(new_id_bytes, new_keys, strict=True), append=not reused)
            if n_new == n:
                existing = new_id_bytes  # type: ignore[assignment]
            else:
                for j, i in enumerate(new_pos):
                    existing[i] = new_id_bytes[j]
        ids = np.frombuffer(b"".join(existing), dtype=">u8").astype(np.int64)  # type: ignore[arg-type]
        self._write_blocks(txn, ids, np.frombuffer(codes, dtype=np.uint8).reshape(n, nb))
        attrs_db = self.attrs_db
        # A replaced record's old metadata goes unless new metadata overwrites it.
        if n_new < n:
            new_set = set(new_pos)
            for i in range(n):
                if i not in new_set and (metas is None or metas[i] is None):
                    txn.delete(keys[i], db=attrs_db)
        if metas is not None:
            with_meta = [(keys[i], m) for i, m in enumerate(metas) if m is not None]
            if with_meta:
                txn.cursor(db=attrs_db).putmulti(with_meta, append=beyond)
        seq = self._append_log(txn, prev, OP_PUT, ids, codes)
        words = np.frombuffer(codes, dtype="<u8").reshape(n, self.words).astype(np.uint64)
        return prev, seq, LogBatch(ids, words, np.empty(0, np.int64))

    def _take_free_ids(self, txn: lmdb.Transaction, limit: int) -> list[bytes]:
        cursor = txn.cursor(db=self.free_db)
        taken: list[bytes] = []
        if not cursor.first():
            return taken
        while len(taken) < limit:
            key = cursor.key()
            if not key or not cursor.delete():
                break
            taken.append(key)
        return taken

    def delete_many(self, txn: lmdb.Transaction, keys: Sequence[bytes]) -> tuple[int, int, LogBatch]:
        """Delete keys (absent ones ignored). Returns (previous seq, new seq, batch)."""
        prev = self.last_seq(txn)
        gone: list[bytes] = []
        for key in keys:
            raw_id = txn.pop(key, db=self.ids_db)
            if raw_id is None:
                continue
            txn.delete(key, db=self.attrs_db)
            txn.delete(raw_id, db=self.keys_db)
            txn.put(raw_id, b"", db=self.free_db)
            gone.append(raw_id)
        ids = np.frombuffer(b"".join(gone), dtype=">u8").astype(np.int64)
        self._write_blocks(txn, ids, None)
        seq = self._append_log(txn, prev, OP_DELETE, ids, b"") if gone else prev
        return prev, seq, LogBatch(np.empty(0, np.int64), np.empty((0, self.words), np.uint64), ids)

    # ------------------------------------------------------------------------- readers and compaction

    def set_reader(self, txn: lmdb.Transaction, token: int, seq: int | None) -> None:
        """Record (or with None, forget) how far this reader's index has applied the log."""
        key = _READER.pack(os.getpid(), token)
        if seq is None:
            txn.delete(key, db=self.readers_db)
        else:
            txn.put(key, pack_seq(seq), db=self.readers_db)

    @staticmethod
    def _table_bytes(txn: lmdb.Transaction, db: Any) -> int:
        st = txn.stat(db)
        return int(st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]) * int(st["psize"])

    def readers(self, txn: lmdb.Transaction) -> dict[tuple[int, int], int]:
        out = {}
        for key, value in txn.cursor(db=self.readers_db):
            out[_READER.unpack(key)] = unpack_seq(value)
        return out

    def compact_log(self, txn: lmdb.Transaction, honour_readers: bool = True) -> int:
        """Delete log entries every live registered reader has applied; always keep the newest entry.

        Registered readers only delay truncation: a reader whose position was truncated away rebuilds its
        index from the tables, so correctness never depends on this registry. Returns entries deleted.
        """
        last = self.last_seq(txn)
        bound = last - 1
        if honour_readers:
            for (pid, token), seq in self.readers(txn).items():
                if pid_alive(pid):
                    bound = min(bound, seq)
                else:
                    txn.delete(_READER.pack(pid, token), db=self.readers_db)
            if bound < last - 1 and self._table_bytes(txn, self.log_db) > max(
                LOG_PIN_BYTES, self._table_bytes(txn, self.blocks_db)
            ):
                bound = last - 1
        cursor = txn.cursor(db=self.log_db)
        deleted = 0
        if not cursor.first():
            return 0
        while True:
            key = cursor.key()
            if not key or unpack_seq(key) > bound or not cursor.delete():
                return deleted
            deleted += 1


_OPEN: dict[str, Store] = {}
_OPEN_LOCK = threading.Lock()


def open_store(
    path: str | os.PathLike[str],
    bits: int | None = None,
    *,
    readonly: bool = False,
    map_size: int | None = None,
    codec: dict[str, Any] | None = None,
    durable: bool = True,
) -> Store:
    """The process's one Store for ``path``, opened on first use and shared by reference count.

    LMDB allows an environment to be open only once per process, so a second HashDB on the same directory
    shares the first one's Store (with its own index); the first opener's map_size and durable apply.
    Release with release_store().
    """
    if bits is not None:
        bits = check_bits(bits)
    real = os.path.realpath(os.fspath(path))
    with _OPEN_LOCK:
        store = _OPEN.get(real)
        if store is not None and store.identity != file_identity(real):
            store = None  # the directory was replaced: its holders keep the old env, we open the new one
        if store is not None and not store.closed:
            if store.readonly and not readonly:
                raise StorageError(f"{os.fspath(path)!r} is already open read-only in this process")
            if bits is not None and bits != store.bits:
                raise BitsMismatch(f"{os.fspath(path)!r} holds {store.bits}-bit codes, not {bits}")
            with store.read() as txn:
                store._check_meta(txn, bits, codec)
            store.refs += 1
            return store
        store = Store(path, bits, readonly=readonly, map_size=map_size, codec=codec, durable=durable)
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
