"""Records: key <-> dense id allocation and the block codec that stores codes by id.

Codes live in ``blocks``, by id, rather than in a key -> code table: reopening then reads a few thousand
page-sized values (one join, then numpy) instead of one value per key. Measured at 10M codes of 256 bits on
2 busy cores: reading a key -> code table and the key -> id table took 6.5 s, the codes table alone 3.75 s;
B is chosen so that one block fills two 4 KiB pages (248 codes at 256 bits), so rewriting the block of a
single insert stays cheap. A block is an alive bitmap of B bits (little-endian bit order), then B canonical
codes (zeros where not alive).

A key gets an id on first insert and keeps it while it exists. Freed ids are reused (smallest first), because
the in-memory index sizes its code matrix by the largest id: without reuse, churn would grow it without
bound.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import StorageError
from .env import Txn
from .schema import Tables, get_meta, pack_meta, pack_seq, unpack_meta, unpack_seq

MAX_KEY_BYTES = 511


def block_size(bits: int) -> int:
    """Codes per block: a multiple of 8 whose block (bitmap + codes + LMDB's 16-byte page header) fits 8 KiB."""
    per_code_bits = bits + 1
    return max(8, ((8192 - 64) * 8 // per_code_bits) // 8 * 8)


def put_reserve(nbytes: int, keys: Sequence[bytes], metas: Sequence[bytes | None] | None) -> int:
    """Estimated bytes an upsert of ``keys`` adds to the environment, to grow the map once up front.

    Each key is written three times (ids, keys, and attrs when it has metadata); each code twice (its block
    and the log) plus the id in three tables and LMDB's per-entry overhead.
    """
    reserve = sum(map(len, keys)) * 3 + len(keys) * (3 * nbytes + 120)
    if metas is not None:
        reserve += sum(len(m) for m in metas if m is not None) + 40 * len(metas)
    return reserve


class Records:
    """The ids, keys, blocks, attrs and free tables of one database with ``bits``-bit codes."""

    def __init__(self, tables: Tables, bits: int, block: int, next_id_key: bytes = b"next_id") -> None:
        self.tables = tables
        self.next_id_key = next_id_key  # meta's id counter of this space (models, or layers)
        self.bits = bits
        self.nbytes = bits // 8
        self.words = bits // 64
        self.block = block
        self.bitmap_bytes = block // 8
        self.block_bytes = self.bitmap_bytes + block * self.nbytes

    # --------------------------------------------------------------------------------------- reading

    def count(self, txn: Txn) -> int:
        return int(txn.stat(self.tables.ids)["entries"])

    def get(self, txn: Txn, key: bytes) -> tuple[bytes, Any] | None:
        raw_id = txn.get(key, db=self.tables.ids)
        if raw_id is None:
            return None
        code = self.code_of(txn, unpack_seq(raw_id))
        raw = txn.get(key, db=self.tables.attrs)
        return code, (None if raw is None else unpack_meta(raw))

    def code_of(self, txn: Txn, id_: int) -> bytes:
        blk, slot = divmod(id_, self.block)
        raw = txn.get(pack_seq(blk), db=self.tables.blocks)
        if raw is None or not raw[slot >> 3] >> (slot & 7) & 1:
            raise StorageError(f"id {id_} has a key but no code: the database is inconsistent")
        start = self.bitmap_bytes + slot * self.nbytes
        return bytes(raw[start : start + self.nbytes])

    def contains(self, txn: Txn, key: bytes) -> bool:
        return txn.get(key, db=self.tables.ids) is not None

    def keys_after(self, txn: Txn, after: bytes | None, limit: int) -> list[bytes]:
        """Up to ``limit`` keys in byte order, strictly after ``after`` (from the start when None)."""
        cursor = txn.cursor(db=self.tables.ids)
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

    def with_prefix(self, txn: Txn, prefix: bytes) -> list[tuple[bytes, bytes]]:
        """(key, packed id) of every key starting with ``prefix``, in key order: one range of the ids table."""
        cursor = txn.cursor(db=self.tables.ids)
        out: list[tuple[bytes, bytes]] = []
        if not cursor.set_range(prefix):
            return out
        for key, raw_id in cursor.iternext():
            if not key.startswith(prefix):
                break
            out.append((key, raw_id))
        return out

    def keys_of(self, txn: Txn, ids: np.ndarray) -> list[bytes]:
        """Keys of ids the caller knows exist in ``txn``'s snapshot."""
        get = txn.get
        db = self.tables.keys
        packed = np.asarray(ids, dtype=">u8").tobytes()
        out = []
        for i in range(0, len(packed), 8):
            key = get(packed[i : i + 8], db=db)
            if key is None:
                raise StorageError(f"id {unpack_seq(packed[i : i + 8])} is in the index but not in the database")
            out.append(key)
        return out

    def load_all(self, txn: Txn) -> tuple[np.ndarray, np.ndarray]:
        """Every (id, code) of the snapshot as int64 ids (n,) and uint64 words (n, bits/64), in no set order.

        Two joins over the blocks table (its keys, its values) and a few numpy passes; no step per record.
        """
        blocks_db = self.tables.blocks
        raw_keys = b"".join(txn.cursor(db=blocks_db).iternext(keys=True, values=False))
        raw_vals = b"".join(txn.cursor(db=blocks_db).iternext(keys=False, values=True))
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

    # ---------------------------------------------------------------------------------------- writing

    def write_blocks(self, txn: Txn, ids: np.ndarray, rows: np.ndarray | None) -> None:
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
        db = self.tables.blocks
        cursor = txn.cursor(db=db)
        last = unpack_seq(cursor.key()) if cursor.last() else -1
        get = txn.get
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

    def put(
        self, txn: Txn, keys: Sequence[bytes], codes: bytes, metas: Sequence[bytes | None] | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Upsert validated records (distinct keys, ascending; ``codes`` their joined canonical bytes).

        Returns the records' ids (int64, in the order of ``keys``) and the ids of those that existed before.
        """
        tables = self.tables
        n = len(keys)
        cursor = txn.cursor(db=tables.ids)
        # Keys beyond the table's last key (always so for a bulk load into an empty database) can be
        # appended: LMDB then fills pages without searching or splitting.
        beyond = not cursor.last() or cursor.key() < keys[0]
        if not beyond:
            get = txn.get
            ids_db = tables.ids
            existing: list[bytes | None] = [get(k, db=ids_db) for k in keys]
            new_pos = [i for i, e in enumerate(existing) if e is None]
        else:
            existing = [None] * n
            new_pos = list(range(n))
        n_new = len(new_pos)
        if n_new:
            new_id_bytes = self.take_free_ids(txn, n_new)
            reused = len(new_id_bytes)
            if reused < n_new:
                next_id = get_meta(txn, tables, self.next_id_key) or 0
                fresh = np.arange(next_id, next_id + n_new - reused, dtype=">u8").tobytes()
                new_id_bytes += [fresh[j : j + 8] for j in range(0, len(fresh), 8)]
                txn.put(self.next_id_key, pack_meta(next_id + n_new - reused), db=tables.meta)
            new_keys = keys if n_new == n else [keys[i] for i in new_pos]
            cursor.putmulti(zip(new_keys, new_id_bytes, strict=True), append=beyond)
            # Ids come out ascending; when all are fresh they extend the keys table at its end.
            txn.cursor(db=tables.keys).putmulti(zip(new_id_bytes, new_keys, strict=True), append=not reused)
            if n_new == n:
                existing = new_id_bytes  # type: ignore[assignment]
            else:
                for j, i in enumerate(new_pos):
                    existing[i] = new_id_bytes[j]
        ids = np.frombuffer(b"".join(existing), dtype=">u8").astype(np.int64)  # type: ignore[arg-type]
        if n_new == n:
            replaced = ids[:0]
        else:
            is_new = np.zeros(n, bool)
            is_new[new_pos] = True
            replaced = ids[~is_new]
        self.write_blocks(txn, ids, np.frombuffer(codes, dtype=np.uint8).reshape(n, self.nbytes))
        attrs_db = tables.attrs
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
        return ids, replaced

    def take_free_ids(self, txn: Txn, limit: int) -> list[bytes]:
        """Up to ``limit`` freed ids (packed), smallest first, removed from the free table."""
        cursor = txn.cursor(db=self.tables.free)
        taken: list[bytes] = []
        if not cursor.first():
            return taken
        while len(taken) < limit:
            key = cursor.key()
            if not key or not cursor.delete():
                break
            taken.append(key)
        return taken

    def delete(self, txn: Txn, keys: Sequence[bytes]) -> np.ndarray:
        """Delete keys (absent ones ignored); returns the ids that were freed."""
        tables = self.tables
        gone: list[bytes] = []
        for key in keys:
            raw_id = txn.pop(key, db=tables.ids)
            if raw_id is None:
                continue
            txn.delete(key, db=tables.attrs)
            txn.delete(raw_id, db=tables.keys)
            txn.put(raw_id, b"", db=tables.free)
            gone.append(raw_id)
        ids = np.frombuffer(b"".join(gone), dtype=">u8").astype(np.int64)
        self.write_blocks(txn, ids, None)
        return ids
