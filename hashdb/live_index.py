"""The in-memory index of one HashDB handle, kept in step with LMDB (the source of truth).

``LiveIndex`` owns everything about that index's life: building it from the tables or mapping it from the
index file (checked against the database's stamp and log before use), replaying the log to catch up, moving
from the numpy index to the numba kernels when queries make it pay off, applying the handle's own writes,
deciding when the index file is worth (re)writing and writing it, and recording this reader's log position
in the readers table (a compaction hint). HashDB holds one and calls it under ``lock``, and a second one
over the layer space (store.LayerSpace: the same verbs over the layer tables, its own index file).
"""

from __future__ import annotations

import logging
import random
import threading
import time
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from .errors import InvalidArgument, StorageError

if TYPE_CHECKING:
    from .index.contract import InMemoryIndex
    from .index.memory import MemoryIndex
    from .index.numpy_index import NumpyIndex
    from .store import LayerSpace, LogBatch, Store, Txn

log = logging.getLogger("hashdb.db")

# Below this many codes no index file is written: reading the codes from LMDB and scanning them costs
# about a millisecond, less than mapping and checking a file.
PERSIST_MIN_CODES = 50_000
# A handle answers with numpy (no numba import: about 1-2 s of a fresh process) until its numpy query work
# reaches this many seconds, then moves to the numba kernels; a forced structure moves at once.
NUMPY_SECONDS = 1.0
# A writer rewrites the index file at close once its log replay would exceed this (as MIH's own delta).
PERSIST_REPLAY_MIN = 2048
PERSIST_REPLAY_FRACTION = 64
REGISTRY_INTERVAL_S = 5.0  # how stale this reader's log position in the readers table may get (a hint only)


def _new_index(bits: int) -> Any:
    from .index import MemoryIndex  # numba loads on the first query, not on import hashdb

    return MemoryIndex(bits)


def _index_type() -> Any:
    from .index import MemoryIndex

    return MemoryIndex


def _numpy_index() -> Any:
    from .index.numpy_index import NumpyIndex  # numpy only

    return NumpyIndex


def _persist() -> Any:
    from .index import persist  # numpy only

    return persist


class LiveIndex:
    """One handle's in-memory index and its bookkeeping. ``store`` returns the handle's store (it raises once
    the handle is closed); ``path`` and ``bits`` name the database. Callers hold ``lock`` around ``answer``,
    ``refresh``, ``write_file`` and reads of ``index``: the index's queries use shared scratch arrays."""

    def __init__(
        self,
        store: Callable[[], Store | LayerSpace],
        path: str,
        bits: int,
        readonly: bool,
        filename: str | None = None,
        stamp: dict[str, Any] | None = None,
    ) -> None:
        self._store = store
        self.path = path
        self.filename = filename or _persist().FILENAME  # the index file, beside the environment
        self.stamp = stamp or {}  # what else ties that file to its space (the layer space names itself)
        self.bits = bits
        self.readonly = readonly
        self.lock = threading.Lock()
        self.index: InMemoryIndex | None = None
        self.applied = 0  # newest log sequence the index reflects
        self.token = random.getrandbits(63)  # this handle's row in the readers table
        self.registered_at: float | None = None  # monotonic time of our last readers-table update
        self.registered_seq = -1
        self.rebuilds = 0
        self.source: str | None = None  # "file" (mapped from the index file) or "tables" (read from LMDB)
        self.wrote = False  # this handle committed a write (close() may then refresh the index file)
        self.file_rejected = False  # the index file failed a lazy check: this handle reads LMDB from now on

    @property
    def _s(self) -> Store | LayerSpace:
        return self._store()

    def after_write(self, prev: int, seq: int, batch: LogBatch) -> None:
        """Apply the handle's own committed write to the index directly when nothing else came in between."""
        if seq != prev:
            self.wrote = True
        with self.lock:
            if self.index is not None and self.applied == prev and seq != prev:
                try:
                    self.apply(batch)
                except Exception:  # the write is committed: never report it as failed
                    log.exception("could not apply a committed write to the index; it will be rebuilt")
                    self.index = None
                    return
                self.applied = seq
                self.registered_seq = seq
                self.registered_at = time.monotonic()

    def answer(self, txn: Txn, last: int, ask: Any, force: str | None) -> Any:
        """Under self.lock: refresh the index to ``last``, move it to the kernels when due, ask it."""
        if self.index is None or self.applied != last:
            self.refresh(txn, last)
        index = self.index
        assert index is not None  # refresh always leaves one
        if index.engine == "numpy" and (force is not None or cast("NumpyIndex", index).spent >= NUMPY_SECONDS):
            self.index = index = self.to_kernels(cast("NumpyIndex", index))
        return ask(index)

    def refresh(self, txn: Txn, last: int) -> None:
        """Under self.lock: make the index reflect exactly sequence ``last`` of ``txn``'s snapshot."""
        if self.index is not None:
            found = self._s.read_log(txn, self.applied)
            # Replaying far more than the index holds costs more than rebuilding from the tables.
            if found is not None and found[1] == last and len(found[0].put_ids) <= len(self.index) + 100_000:
                self.apply(found[0])
                self.applied = last
                return
        index = self.load_file(txn, last)
        if index is not None:
            self.index, self.applied, self.source = index, last, "file"
            return
        ids, codes = self._s.load_all(txn)
        self.index = _numpy_index().from_rows(self.bits, ids, codes)
        self.applied = last
        self.source = "tables"
        self.rebuilds += 1

    def to_kernels(self, index: NumpyIndex) -> MemoryIndex:
        """The numba MemoryIndex holding what a NumpyIndex holds (its mapped tables, when it has them)."""
        saved = index.arrays()
        if saved is not None:
            return _index_type().restore(self.bits, *saved)
        kernels = _new_index(self.bits)
        # Tables are built when queries make them pay off (the planner counts the build), so a process that
        # asks a few questions scans instead of building what it will not reuse.
        kernels.bulk_load(*index.live(), build=False)
        return kernels

    def database_stamp(self) -> dict[str, Any]:
        """What ties an index file to this database: the width and the environment's creation stamp."""
        return {"bits": self.bits, "database": self._s.db_id, **self.stamp}

    def log_crc(self, txn: Txn, seq: int) -> int | None:
        """crc32 of log entry ``seq`` (None when it is not in the log): a file stamped with a sequence whose
        entry now holds something else (a database restored from a backup) must not be used."""
        raw = self._s.log_entry(txn, seq)
        return None if raw is None else zlib.crc32(raw)

    def load_file(self, txn: Txn, last: int) -> Any:
        """The index mapped from the database's index file and caught up from the log to ``last``, or None
        (no file, or one that is torn, corrupt, foreign or stale: the caller rebuilds from LMDB)."""
        persist = _persist()
        if self.file_rejected:
            return None
        try:
            header, arrays, checker = persist.read(self.path, self.database_stamp(), self.filename)
        except FileNotFoundError:
            return None
        except (persist.Rejected, OSError) as e:
            log.info("index file of %r not used: %s", self.path, e)
            return None
        seq = header.get("seq")
        why = None
        if not isinstance(seq, int) or seq > last:
            why = f"it reflects log sequence {seq!r}, the database is at {last}"
        elif header.get("log_crc") != self.log_crc(txn, seq) and self.log_crc(txn, seq) is not None:
            why = f"log entry {seq} differs from the one it was made at"
        found = None if why else self._s.read_log(txn, seq)
        if why is None and found is None:
            why = f"the log was compacted past its sequence {seq}"
        if why is None:
            try:
                index = _numpy_index().restore(self.bits, arrays, header["scalars"], checker)
                self.index = index
                self.apply(found[0]) if found is not None else None  # found is set whenever why is None
            except (InvalidArgument, KeyError, TypeError, ValueError, persist.Rejected) as e:
                why = f"it does not fit ({e})"
            else:
                if len(index) == self._s.count(txn):
                    return index
                why = f"{len(index)} codes after replaying the log, the database holds {self._s.count(txn)}"
        self.index = None
        log.info("index file of %r not used: %s", self.path, why)
        return None

    def write_file(self) -> str | None:
        """Under self.lock: save the current index (tables built) atomically beside the environment."""
        if self.index is not None and self.index.engine == "numpy":
            self.index = self.to_kernels(cast("NumpyIndex", self.index))
        if self.index is None:
            return None
        index = cast("MemoryIndex", self.index)
        index.prepare()
        saved = index.saved()
        if saved is None:
            return None
        arrays, scalars = saved
        persist = _persist()
        try:
            if not self._s.durable:  # the file must never claim a sequence a crash could take back
                self._s.sync()
            with self._s.read() as txn:
                stamp = {**self.database_stamp(), "seq": self.applied, "log_crc": self.log_crc(txn, self.applied)}
            return persist.write(self.path, stamp, arrays, scalars, self.filename)
        except (OSError, StorageError) as e:
            log.info("could not write the index file of %r: %s", self.path, e)
            return None

    def built_here(self) -> bool:
        """Did this handle build MIH tables (rather than map them from the file)?"""
        mih = getattr(self.index, "mih", None)
        return mih is not None and mih.rebuilds > 0

    def file_due(self) -> bool:
        """At close: does the index file need (re)writing? When it is missing, unusable or behind what this
        handle built, or when this handle's writes left it further behind than a reader should replay."""
        persist = _persist()
        with self._s.read() as txn:
            count = self._s.count(txn)
            if count < PERSIST_MIN_CODES:
                return False
            try:
                header = persist.read_header(self.path, self.filename)
            except (FileNotFoundError, persist.Rejected, OSError):
                return self.wrote or self.built_here()
            if any(header.get(field) != value for field, value in self.database_stamp().items()):
                return True
            seq = header.get("seq")
            if not isinstance(seq, int) or seq > self._s.last_seq(txn):
                return True
            if self.built_here() and seq < self.applied:
                return True  # this handle built tables newer than the file's
            if not self.wrote:
                return False
            found = self._s.read_log(txn, seq)
            if found is None:
                return True
            changed = len(found[0].put_ids) + len(found[0].deleted_ids)
            return changed > max(PERSIST_REPLAY_MIN, count // PERSIST_REPLAY_FRACTION)

    def apply(self, batch: LogBatch) -> None:
        """Replay one log batch into the index (deletes first, as the batch was committed)."""
        assert self.index is not None
        if len(batch.deleted_ids):
            self.index.remove(batch.deleted_ids)
        if len(batch.put_ids):
            self.index.add(batch.put_ids, batch.put_codes)

    def register_if_due(self) -> None:
        """Tell other processes how far we got, at most every REGISTRY_INTERVAL_S (it costs a write)."""
        if self.readonly or self.applied == self.registered_seq:
            return
        now = time.monotonic()
        if self.registered_at is not None and now - self.registered_at < REGISTRY_INTERVAL_S:
            return
        self.registered_at = now
        seq = self.applied
        self.registered_seq = seq
        try:
            self._s.write(lambda txn: self._s.set_reader(txn, self.token, seq))
        except StorageError as e:  # a hint for compaction only: a query must not fail on it
            log.warning("could not record this reader's log position: %s", e)
