"""NumpyIndex: exact radius and k-NN with numpy alone, over a code matrix and (when mapped from the index
file) MIH tables, so a short-lived process answers without importing numba.

Importing numba and loading its cached kernels costs a fresh process about as much as the whole query
(1-2 s of a 2-core machine; numba's import pulls in scipy). A CLI query at 10M codes needs nine table
lookups at r=8, or one pass over the codes at the copy radius: numpy does either in milliseconds. HashDB
starts every handle on a NumpyIndex and moves to the numba MemoryIndex (``MemoryIndex.restore`` of these
very arrays) once the numpy work has cost about what starting numba does, or when a caller forces a
structure; so long-lived processes end up on the kernels and one-shot ones never load them.

Same answers as MemoryIndex (ids and distances, any order), same table layout (arrays.Tables, mih.py).
"""

from __future__ import annotations

import itertools
import math
import time
from typing import Any

import numpy as np

from .arrays import sorted_unique
from .contract import FORCES  # noqa: F401 - re-exported: defined once, in contract.py

SCAN_CHUNK = 1 << 16  # rows per numpy pass: the chunk is checked, then read again while still in cache
# A probe costs numpy about what verifying this many rows of a scan does; past that, the scan answers.
PROBE_ROWS = 40
_MASKS: dict[tuple[int, int], np.ndarray] = {}


def flip_masks(bits: int, radius: int) -> np.ndarray:
    """Every value of ``bits`` bits with at most ``radius`` ones, as int64 (cached)."""
    key = (bits, radius)
    masks = _MASKS.get(key)
    if masks is None:
        out = [0]
        for d in range(1, radius + 1):
            out.extend(sum(1 << b for b in c) for c in itertools.combinations(range(bits), d))
        masks = _MASKS[key] = np.array(out, np.int64)
    return masks


_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], np.uint8)


def distances(codes: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Hamming distance of each row of (n, words) uint64 ``codes`` to ``query``."""
    x = codes ^ query
    if not hasattr(np, "bitwise_count"):  # numpy < 2.0
        return _POPCOUNT8[x.view(np.uint8)].sum(axis=1, dtype=np.int32)
    counts = np.bitwise_count(x)  # (n, words) uint8
    if counts.shape[1] % 4 == 0:
        # Four word counts (each <= 64) per uint32, added in two SWAR steps: measured 2.5x faster than
        # counts.sum(axis=1), which reduces along a 4-element axis one row at a time.
        v = counts.view(np.uint32)
        v = (v & 0x00FF00FF) + ((v >> 8) & 0x00FF00FF)
        counts = (v & 0xFFFF) + (v >> 16)
    d = counts[:, 0].astype(np.int32)
    for w in range(1, counts.shape[1]):
        d += counts[:, w]
    return d


class NumpyIndex:
    """The numpy twin of MemoryIndex for HashDB's first queries: contents change by ``add``/``remove``
    (log replay), answers by ``radius``/``radius_many``/``knn``; ``tables`` are the MIH arrays of the index
    file or None (then every query is a scan)."""

    engine = "numpy"

    def __init__(
        self,
        bits: int,
        codes: np.ndarray,
        alive: np.ndarray,
        tables: dict[str, np.ndarray] | None = None,
        scalars: dict[str, Any] | None = None,
        checker: Any = None,
    ) -> None:
        self.bits = bits
        # persist.Checker over mapped arrays: every chunk is checked before its first use (None: in memory)
        self.checker = checker
        if checker is not None:
            for name, a in (("alive", alive), *(tables or {}).items()):
                if name not in ("mih_entries", "mih_offsets"):
                    checker.span(name, 0, a.nbytes)
        self.words = bits // 64
        self.codes = codes
        self.alive = alive
        self.n_alive = int(np.count_nonzero(alive))
        self.tables = tables
        self.scalars = dict(scalars or {})
        delta = np.zeros(0, np.int64) if tables is None else np.asarray(tables["mih_delta"], np.int64)
        self._delta = [delta]
        self.tombstones = int(self.scalars.get("tombstones", 0))
        self.spent = 0.0  # seconds of numpy query work so far (HashDB moves to numba past a threshold)

    @classmethod
    def from_rows(cls, bits: int, ids: np.ndarray, codes: np.ndarray) -> NumpyIndex:
        """A scan-only index over LMDB's (ids, codes)."""
        cap = int(ids.max()) + 1 if ids.size else 0
        matrix = np.zeros((cap, bits // 64), np.uint64)
        matrix[ids] = codes
        alive = np.zeros(cap, np.uint8)
        alive[ids] = 1
        return cls(bits, matrix, alive)

    @classmethod
    def restore(
        cls, bits: int, arrays: dict[str, np.ndarray], scalars: dict[str, Any], checker: Any = None
    ) -> NumpyIndex:
        """Over the index file's arrays (persist.read and its checker), as MemoryIndex.restore; arrays and
        scalars are checked against each other (validate.py: the small ones now, the tables chunk by chunk
        as they are first read), persist.Rejected if they do not fit."""
        from .validate import SavedTables

        saved = SavedTables(bits, arrays, scalars)
        codes, alive = arrays["codes"], arrays["alive"]
        if checker is not None:
            checker.span("alive", 0, alive.nbytes)
        if codes.dtype != np.uint64 or codes.ndim != 2 or codes.shape[1] != bits // 64:
            raise ValueError(f"saved code matrix has shape {codes.shape}, not (n, {bits // 64})")
        if alive.shape != codes.shape[:1] or int(np.count_nonzero(alive)) != int(scalars["n_alive"]):
            raise ValueError("saved alive mask does not match the code matrix")
        if arrays["mih_entries"].shape != (arrays["mih_starts"].size, int(scalars["n_base"])):
            raise ValueError("saved MIH tables do not match their header")
        tables = {k: v for k, v in arrays.items() if k.startswith("mih_")}
        index = cls(bits, codes, alive, tables, scalars, checker)
        if checker is not None:
            saved.current = lambda: (index.alive, index.delta())
            checker.validate, checker.complete, checker.whole = saved.chunk, saved.complete, saved.whole
        return index

    def _check(self, name: str, index: np.ndarray, item_bytes: int) -> None:
        if self.checker is not None:
            self.checker.items(name, index, item_bytes)

    def _check_rows(self, lo: int, hi: int) -> None:
        if self.checker is not None:
            row = 8 * self.words
            self.checker.span("codes", lo * row, hi * row)

    # ---- contents ---------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.n_alive

    def _reserve(self, capacity: int) -> None:
        old = self.alive.shape[0]
        if capacity <= old:
            return
        if self.checker is not None:  # the copy leaves the mapping: check what it copies first
            self._check_rows(0, old)
            self.checker.forget("codes")
            self.checker.forget("alive")
        new = max(capacity, 2 * old, 16)
        codes = np.zeros((new, self.words), np.uint64)
        codes[:old] = self.codes
        alive = np.zeros(new, np.uint8)
        alive[:old] = self.alive
        self.codes, self.alive = codes, alive

    def add(self, ids: np.ndarray, codes: np.ndarray) -> None:
        """Insert or replace (ids distinct, as a LogBatch's are)."""
        ids = np.asarray(ids, np.int64)
        if ids.size == 0:
            return
        self._reserve(int(ids.max()) + 1)
        self._check("codes", ids, 8 * self.words)  # a chunk is checked before this write changes it
        self.n_alive += int(ids.size - np.count_nonzero(self.alive[ids]))
        self.codes[ids] = codes
        self.alive[ids] = 1
        if self.tables is not None:
            self._delta.append(ids)  # a replaced code sits in the tables under its old substrings

    def remove(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids, np.int64)
        ids = ids[(ids >= 0) & (ids < self.alive.shape[0])]
        ids = np.unique(ids[self.alive[ids] != 0])
        self.alive[ids] = 0
        self.n_alive -= int(ids.size)
        self.tombstones += int(ids.size)

    def delta(self) -> np.ndarray:
        if len(self._delta) > 1:
            self._delta = [np.concatenate(self._delta)]
        return self._delta[0]

    # ---- queries ----------------------------------------------------------------------------------------
    def _scan(self, query: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
        ids, ds = [], []
        for start in range(0, self.alive.shape[0], SCAN_CHUNK):
            self._check_rows(start, start + SCAN_CHUNK)
            d = distances(self.codes[start : start + SCAN_CHUNK], query)
            hit = np.flatnonzero((d <= r) & (self.alive[start : start + SCAN_CHUNK] != 0))
            ids.append(hit + start)
            ds.append(d[hit])
        if not ids:
            return np.zeros(0, np.int64), np.zeros(0, np.int32)
        return np.concatenate(ids).astype(np.int64), np.concatenate(ds).astype(np.int32)

    def _probes(self, r: int) -> int:
        """Table lookups an MIH radius-r query makes (inf-like when a table would be enumerated whole)."""
        lens = self.tables["mih_lens"] if self.tables is not None else np.zeros(0)
        m = lens.size
        if m == 0:
            return 1 << 62
        a, b = divmod(r, m)
        total = 0
        for j, s in enumerate(lens.tolist()):
            rad = min(a if j <= b else a - 1, s)
            total += sum(math.comb(s, d) for d in range(rad + 1)) if rad >= 0 else 0
        return total

    def _mih(self, query: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
        tab = self.tables
        assert tab is not None
        starts, lens, offsets, entries = tab["mih_starts"], tab["mih_lens"], tab["mih_offsets"], tab["mih_entries"]
        t, id_bits = int(self.scalars["t"]), int(self.scalars["id_bits"])
        qint = int.from_bytes(np.ascontiguousarray(query, "<u8").tobytes(), "little")
        m = starts.size
        a, b = divmod(r, m)
        found = [self.delta()]
        idmask = np.int64((1 << id_bits) - 1)
        for j in range(m):
            rad = min(a if j <= b else a - 1, int(lens[j]))
            if rad < 0:
                continue
            s = int(lens[j])
            low_bits = s - t
            qv = (qint >> int(starts[j])) & ((1 << s) - 1)
            values = np.int64(qv) ^ flip_masks(s, rad)
            top = values >> low_bits
            low = values & ((1 << low_bits) - 1)
            self._check("mih_offsets", j * offsets.shape[1] + np.concatenate([top, top + 1]), 4)
            lo = offsets[j, top].astype(np.int64)
            n_run = offsets[j, top + 1].astype(np.int64) - lo
            total = int(n_run.sum())
            if total == 0:
                continue
            first = np.cumsum(n_run) - n_run
            pos = np.repeat(lo - first, n_run) + np.arange(total)
            self._check("mih_entries", j * entries.shape[1] + pos, entries.itemsize)
            e = entries[j, pos].astype(np.int64)
            hit = (e >> id_bits) == np.repeat(low, n_run)
            found.append(e[hit] & idmask)
        ids = sorted_unique(np.concatenate(found))
        ids = ids[self.alive[ids] != 0]
        self._check("codes", ids, 8 * self.words)
        d = distances(self.codes[ids], query)
        keep = d <= r
        return ids[keep], d[keep]

    def _use_mih(self, r: int) -> bool:
        return self.tables is not None and self._probes(r) * PROBE_ROWS < self.alive.shape[0]

    def radius(self, query: np.ndarray, r: int, force: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        started = time.perf_counter()
        q = np.ascontiguousarray(query, np.uint64)
        out = self._mih(q, r) if (force == "mih" and self.tables is not None) or (
            force is None and self._use_mih(r)
        ) else self._scan(q, r)
        self.spent += time.perf_counter() - started
        return out

    def radius_many(self, queries: np.ndarray, r: int, force: str | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        return [self.radius(q, r, force) for q in queries]

    def knn(self, query: np.ndarray, k: int, force: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Every id at distance <= the k-th smallest (all ties), from one pass of distances."""
        started = time.perf_counter()
        q = np.ascontiguousarray(query, np.uint64)
        live = np.flatnonzero(self.alive)
        self._check_rows(0, self.alive.shape[0])
        parts = [distances(self.codes[live[s : s + SCAN_CHUNK]], q) for s in range(0, live.size, SCAN_CHUNK)]
        d = np.concatenate(parts) if parts else np.zeros(0, np.int32)
        if d.size == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int32)
        kth = np.partition(d, min(k, d.size) - 1)[min(k, d.size) - 1]
        keep = np.flatnonzero(d <= kth)
        self.spent += time.perf_counter() - started
        return live[keep].astype(np.int64), d[keep].astype(np.int32)

    # ---- what HashDB also asks of an index -------------------------------------------------------------
    def arrays(self) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        """The arrays and scalars MemoryIndex.restore takes, with the changes applied since (None when there
        are no tables: the move to MemoryIndex then goes through bulk_load)."""
        if self.tables is None:
            return None
        if self.checker is not None:
            self.checker.everything()
        arrays = {"codes": self.codes, "alive": self.alive, **self.tables, "mih_delta": self.delta()}
        return arrays, {**self.scalars, "n_alive": self.n_alive, "tombstones": self.tombstones}

    def live(self) -> tuple[np.ndarray, np.ndarray]:
        if self.checker is not None:
            self.checker.everything()
        ids = np.flatnonzero(self.alive).astype(np.int64)
        return ids, self.codes[ids]

    def nbytes(self) -> int:
        tables = 0 if self.tables is None else sum(int(a.nbytes) for a in self.tables.values())
        return int(self.codes.nbytes + self.alive.nbytes + tables)

    def stats(self) -> dict[str, Any]:
        mih = {"built": self.tables is not None, "delta": int(self.delta().size), "tombstones": self.tombstones}
        return {
            "engine": self.engine,
            "bits": self.bits,
            "live": len(self),
            "capacity": int(self.alive.shape[0]),
            "code_bytes": int(self.codes.nbytes),
            "nbytes": self.nbytes(),
            "structures": {"mih": mih},
        }


__all__ = ["NumpyIndex", "flip_masks"]
