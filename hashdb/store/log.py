"""The change log, its compaction, and the registry of readers that compaction tries to wait for.

Every write transaction appends its batch (ids, and for upserts the codes) under the next sequence number.
A handle's in-memory index remembers the newest sequence it applied and replays what came after. Replaying
stays exact although ids are reused: each entry holds the codes themselves, and the net effect of a run of
entries is the last operation per id, whichever key the id named at the time.
"""

from __future__ import annotations

import os
import struct
from typing import Any

import numpy as np

from .env import Txn
from .schema import Tables, pack_seq, unpack_seq

LOG_BATCH = 1 << 16  # records per log value; bounds the size of one value without adding many entries
# A live reader that stops querying pins the log at its position. Past this much log (or the size of the
# blocks table, if larger) compaction ignores such readers: they rebuild, which costs less than replaying.
LOG_PIN_BYTES = 64 << 20
OP_PUT = b"P"
OP_DELETE = b"D"

_READER = struct.Struct(">IQ")
_LOG_HEAD = struct.Struct("<cI")


class LogBatch:
    """What one write transaction did, as flat arrays: upserted ids with their codes, and deleted ids."""

    __slots__ = ("put_ids", "put_codes", "deleted_ids")

    def __init__(self, put_ids: np.ndarray, put_codes: np.ndarray, deleted_ids: np.ndarray) -> None:
        self.put_ids = put_ids
        self.put_codes = put_codes
        self.deleted_ids = deleted_ids

    @classmethod
    def empty(cls, words: int) -> LogBatch:
        return cls(np.empty(0, np.int64), np.empty((0, words), np.uint64), np.empty(0, np.int64))


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


def table_bytes(txn: Txn, db: Any) -> int:
    st = txn.stat(db)
    return int(st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]) * int(st["psize"])


class ChangeLog:
    """The log and readers tables of one database with ``bits``-bit codes."""

    def __init__(self, tables: Tables, bits: int) -> None:
        self.tables = tables
        self.nbytes = bits // 8
        self.words = bits // 64

    def last_seq(self, txn: Txn) -> int:
        cursor = txn.cursor(db=self.tables.log)
        return unpack_seq(cursor.key()) if cursor.last() else 0

    def first_seq(self, txn: Txn) -> int:
        cursor = txn.cursor(db=self.tables.log)
        return unpack_seq(cursor.key()) if cursor.first() else 0

    def entries(self, txn: Txn) -> int:
        return int(txn.stat(self.tables.log)["entries"])

    def read(self, txn: Txn, after: int) -> tuple[LogBatch, int] | None:
        """Net effect of every log entry with sequence > ``after``: the last operation per id wins.

        Returns None when entries after ``after`` were compacted away (the caller must rebuild), else
        the batch and the newest sequence in it.
        """
        cursor = txn.cursor(db=self.tables.log)
        if not cursor.set_range(pack_seq(after + 1)):
            return LogBatch.empty(self.words), after
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
            return LogBatch.empty(self.words), last
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

    def append(self, txn: Txn, seq: int, op: bytes, ids: np.ndarray, codes: bytes) -> int:
        """Append one or more entries after ``seq``; returns the newest sequence written."""
        raw_ids = np.ascontiguousarray(ids, dtype="<i8")
        nb = self.nbytes
        cursor = txn.cursor(db=self.tables.log)
        for start in range(0, len(raw_ids), LOG_BATCH):
            part = raw_ids[start : start + LOG_BATCH]
            seq += 1
            value = _LOG_HEAD.pack(op, len(part)) + part.tobytes()
            if op == OP_PUT:
                value += codes[start * nb : (start + len(part)) * nb]
            cursor.put(pack_seq(seq), value, append=True)
        return seq

    # ------------------------------------------------------------------------- readers and compaction

    def set_reader(self, txn: Txn, token: int, seq: int | None) -> None:
        """Record (or with None, forget) how far this reader's index has applied the log."""
        key = _READER.pack(os.getpid(), token)
        if seq is None:
            txn.delete(key, db=self.tables.readers)
        else:
            txn.put(key, pack_seq(seq), db=self.tables.readers)

    def readers(self, txn: Txn) -> dict[tuple[int, int], int]:
        out = {}
        for key, value in txn.cursor(db=self.tables.readers):
            out[_READER.unpack(key)] = unpack_seq(value)
        return out

    def compact(self, txn: Txn, honour_readers: bool = True) -> int:
        """Delete log entries every live registered reader has applied; always keep the newest entry.

        Registered readers only delay truncation: a reader whose position was truncated away rebuilds its
        index from the tables, so correctness never depends on this registry. Returns entries deleted.
        """
        tables = self.tables
        last = self.last_seq(txn)
        bound = last - 1
        if honour_readers:
            for (pid, token), seq in self.readers(txn).items():
                if pid_alive(pid):
                    bound = min(bound, seq)
                else:
                    txn.delete(_READER.pack(pid, token), db=tables.readers)
            if bound < last - 1 and table_bytes(txn, tables.log) > max(LOG_PIN_BYTES, table_bytes(txn, tables.blocks)):
                bound = last - 1
        cursor = txn.cursor(db=tables.log)
        deleted = 0
        if not cursor.first():
            return 0
        while True:
            key = cursor.key()
            if not key or unpack_seq(key) > bound or not cursor.delete():
                return deleted
            deleted += 1
