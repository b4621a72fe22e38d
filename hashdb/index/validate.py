"""Checks of a saved index (the index file's arrays and scalars) against each other, before anything indexes
with them.

The file's chunk sums and header crc catch corruption, not intent: a file whose sums were recomputed by hand
is otherwise trusted, and an entry id past the code matrix made the numba kernels read out of bounds (the
server died with SIGSEGV), offsets ramped over the entries made them answer wrongly, and the numpy path
raised raw IndexError. So every scalar and the small arrays are checked on load (``check_structure``), and
the two large tables chunk by chunk as the persist.Checker first reads each chunk (``SavedTables.chunk``:
vectorized, once per chunk, so a query that reads nine runs still checks a few chunks, not the file), and as
a whole before the tables are handed to the kernels (``SavedTables.complete``). Any mismatch raises
persist.Rejected and HashDB rebuilds from LMDB. Only numpy is needed here, except for ``SavedTables.whole``:
when every table is about to go to the numba kernels anyway, the tables not yet checked are checked whole in
one numba pass each (validate_kernels.py), the same checks as ``_entries`` and ``complete`` together.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .persist import Rejected

MAX_DIRECTORY_BITS = 30  # mih.choose_directory_bits stays far below this: 2^30 offsets would be 4 GiB a table
MAX_SUBSTRING_BITS = 32  # substring values are uint32 when the tables are built

# What a table can get wrong, by the code validate_kernels.check_table returns, and its words in Rejected.
OUT_OF_RANGE = 1  # an id past the code matrix, or value bits wider than the substring's low bits
UNSORTED = 2  # entries do not ascend within a run of the directory
MISMATCH = 3  # a live code's entry holds another substring, or sits in another substring's run
DUPLICATE_OR_MISSING = 4  # an id listed twice, or a live id not listed
PROBLEMS = {
    OUT_OF_RANGE: "holds ids or values out of range",
    UNSORTED: "is not sorted within its runs",
    MISMATCH: "does not match the codes it indexes",
    DUPLICATE_OR_MISSING: "lists an id twice or misses a live one",
}


def _bad_table(j: int, problem: int) -> Rejected:
    return Rejected(f"MIH table {j} {PROBLEMS[problem]} (corrupt)")


def _int(scalars: dict[str, Any], name: str, low: int, high: int) -> int:
    value = scalars.get(name)
    if type(value) is not int or not low <= value <= high:
        raise Rejected(f"scalar {name} = {str(value)[:40]} is not an int in [{low}, {high}] (corrupt)")
    return value


def _array(arrays: dict[str, np.ndarray], name: str, dtypes: tuple[type, ...], shape: tuple[int, ...]) -> np.ndarray:
    a = arrays.get(name)
    if a is None or a.dtype.type not in dtypes or a.shape != shape:
        got = "missing" if a is None else f"{a.dtype} {a.shape}"
        raise Rejected(f"array {name} is {got}, not {[d.__name__ for d in dtypes]} {shape} (corrupt)")
    return a


def substrings(codes: np.ndarray, ids: np.ndarray, start: int, length: int) -> np.ndarray:
    """Bits [start, start + length) of the codes of ``ids`` (bit b = bit b % 64 of word b // 64), as uint64;
    the vectorized twin of bits.substring_of. Only the one or two words needed are gathered (gathering whole
    rows took 0.37 s a table at 1M codes, this ~0.03 s)."""
    w, off = start >> 6, start & 63
    v = codes[ids, w] >> np.uint64(off)
    if off + length > 64:
        v = v | (codes[ids, w + 1] << np.uint64(64 - off))
    return v & np.uint64((1 << length) - 1)


class SavedTables:
    """A saved index's arrays and scalars, checked against each other (see the module docstring)."""

    def __init__(
        self,
        bits: int,
        arrays: dict[str, np.ndarray],
        scalars: dict[str, Any],
        current: Callable[[], tuple[np.ndarray, np.ndarray]] | None = None,
    ) -> None:
        """``current()`` gives the index's alive mask and pending ids now (log replay changes both after the
        load): a replaced or deleted code no longer matches its old entries, and need not."""
        self.arrays = arrays
        self.current = current or (lambda: (arrays["alive"], arrays["mih_delta"]))
        codes = arrays.get("codes")
        if codes is None or codes.dtype != np.uint64 or codes.ndim != 2 or codes.shape[1] != bits // 64:
            raise Rejected(f"saved code matrix is not uint64 of shape (n, {bits // 64}) (corrupt)")
        self.codes = codes
        self.capacity = cap = codes.shape[0]
        _array(arrays, "alive", (np.uint8,), (cap,))
        self.t = t = _int(scalars, "t", 0, MAX_DIRECTORY_BITS)
        self.id_bits = _int(scalars, "id_bits", 1, 63)
        self.n_base = n_base = _int(scalars, "n_base", 0, cap)
        _int(scalars, "tombstones", 0, 1 << 62)
        starts = arrays.get("mih_starts")
        m = starts.shape[0] if starts is not None and starts.ndim == 1 else -1
        if m < 1:
            raise Rejected("array mih_starts is missing or not a non-empty vector (corrupt)")
        self.starts = _array(arrays, "mih_starts", (np.int64,), (m,)).astype(np.int64)
        self.lens = _array(arrays, "mih_lens", (np.int64,), (m,)).astype(np.int64)
        if (self.starts < 0).any() or (self.lens <= t).any() or (self.lens > MAX_SUBSTRING_BITS).any():
            raise Rejected("MIH substrings have starts or lengths out of range (corrupt)")
        if (self.starts + self.lens > bits).any():
            raise Rejected(f"MIH substrings reach past bit {bits} (corrupt)")
        self.offsets = _array(arrays, "mih_offsets", (np.int32,), (m, (1 << t) + 1))
        self.entries = entries = _array(arrays, "mih_entries", (np.uint32, np.uint64), (m, n_base))
        if self.id_bits + int(self.lens.max()) - t > 8 * entries.itemsize:
            raise Rejected(f"entries of {entries.itemsize} bytes cannot hold {self.id_bits} id bits (corrupt)")
        collisions = _array(arrays, "mih_collisions", (np.float64,), (m,))
        if not np.isfinite(collisions).all() or (collisions < 0).any():
            raise Rejected("MIH collision counts are not finite and non-negative (corrupt)")
        delta = arrays.get("mih_delta")
        if delta is None or delta.dtype != np.int64 or delta.ndim != 1:
            raise Rejected("array mih_delta is missing or not an int64 vector (corrupt)")
        if delta.size and (int(delta.min()) < 0 or int(delta.max()) >= cap):
            raise Rejected("pending ids lie outside the code matrix (corrupt)")
        self._rows_ok = np.zeros(m, bool)
        self._complete_done = False

    def whole(self, name: str) -> bool:
        """Check all of array ``name`` against the rest at once (True), or leave it to ``chunk`` (False): the MIH
        entries are checked whole with the numba kernels, every entry and ``complete``'s checks too."""
        if name != "mih_entries":
            return False
        from .validate_kernels import check_tables

        m = self.entries.shape[0]  # at least 1 (checked on load)
        rows = np.stack([self._row(j) for j in range(m)])
        found = np.zeros(m, np.int64)
        check_tables(self.codes, self.entries, rows, self.starts, self.lens, self.t, self.id_bits,
                     self._must_list().view(np.uint8), found)  # fmt: skip
        bad = np.flatnonzero(found)
        if bad.size:
            raise _bad_table(int(bad[0]), int(found[bad[0]]))
        self._complete_done = True
        return True

    def _must_list(self) -> np.ndarray:
        """The ids every table must list now: alive and not pending (bool, one per row of the code matrix)."""
        alive_now, pending_ids = self.current()
        must = np.asarray(alive_now[: self.capacity]) != 0
        must[pending_ids[pending_ids < self.capacity]] = False
        return must

    def chunk(self, name: str, lo_byte: int, hi_byte: int) -> None:
        """Check bytes [lo_byte, hi_byte) of array ``name`` (whole items) against the rest; Rejected if not."""
        if name == "mih_offsets":
            self._offsets(lo_byte // 4, -(-hi_byte // 4))
        elif name == "mih_entries":
            size = self.entries.itemsize
            self._entries(lo_byte // size, -(-hi_byte // size))

    def _offsets(self, i0: int, i1: int) -> None:
        width = self.offsets.shape[1]
        flat = self.offsets.reshape(-1)
        i1 = min(i1, flat.size)
        if i0 >= i1:
            return
        start = i0 - 1 if i0 % width else i0  # the item before the chunk: runs must not go back across it
        a = flat[start:i1].astype(np.int64)
        col = np.arange(start, i1) % width
        if (a < 0).any() or (a > self.n_base).any():
            raise Rejected(f"MIH offsets outside [0, {self.n_base}] (corrupt)")
        if (a[col == 0] != 0).any() or (a[col == width - 1] != self.n_base).any():
            raise Rejected("an MIH directory does not span its table exactly (corrupt)")
        same_row = col[1:] != 0
        if (np.diff(a)[same_row] < 0).any():
            raise Rejected("MIH offsets go backwards (corrupt)")

    def _row(self, j: int) -> np.ndarray:
        """Directory j, checked whole once (entries are placed by it)."""
        if not self._rows_ok[j]:
            width = self.offsets.shape[1]
            self._offsets(j * width, (j + 1) * width)
            self._rows_ok[j] = True
        return self.offsets[j].astype(np.int64)

    def _entries(self, p0: int, p1: int) -> None:
        n_base = self.n_base
        if n_base == 0:
            return
        flat = self.entries.reshape(-1)
        p1 = min(p1, flat.size)
        t, id_bits = self.t, self.id_bits
        kind = flat.dtype.type
        for j in range(p0 // n_base, (p1 - 1) // n_base + 1 if p1 > p0 else 0):
            lo, hi = max(p0, j * n_base), min(p1, (j + 1) * n_base)
            start = lo - 1 if lo > j * n_base else lo  # one entry before: order across the chunk's edge
            e = flat[start:hi]
            ids = e & kind((1 << id_bits) - 1)
            low_bits = int(self.lens[j]) - t
            if int(ids.max()) >= self.capacity or int((e >> kind(id_bits)).max()) >> low_bits:
                raise _bad_table(j, OUT_OF_RANGE)
            row = self._row(j)
            # runs of the directory start at row[k]; within a run entries ascend (value bits, then id)
            first = np.zeros(hi - start, bool)
            inside = row[(row >= start - j * n_base) & (row < hi - j * n_base)] - (start - j * n_base)
            first[inside] = True
            if ((e[1:] <= e[:-1]) & ~first[1:]).any():
                raise _bad_table(j, UNSORTED)
            # each live code's entry holds its substring's low bits, in the run of its top bits
            alive, pending = self.current()
            live = np.flatnonzero((alive[ids] != 0) & ~np.isin(ids, pending))
            sub = substrings(self.codes, ids[live], int(self.starts[j]), int(self.lens[j]))
            top = (sub >> np.uint64(low_bits)).astype(np.int64)
            col = live + (start - j * n_base)
            low = (e[live] >> kind(id_bits)).astype(np.uint64)
            if (
                (low != (sub & np.uint64((1 << low_bits) - 1))).any()
                or (row[top] > col).any()
                or (row[top + 1] <= col).any()
            ):
                raise _bad_table(j, MISMATCH)

    def complete(self) -> None:
        """Before the kernels take the tables: each table lists every id at most once, and every live id is
        in each table or pending (what the chunk checks alone cannot see)."""
        if self._complete_done:  # ``whole`` checked it, with everything else
            return
        must = self._must_list()
        idmask = np.uint64((1 << self.id_bits) - 1)
        for j in range(self.entries.shape[0]):
            ids = (self.entries[j].astype(np.uint64) & idmask).astype(np.int64)
            if ids.size and int(ids.max()) >= self.capacity:
                raise Rejected(f"MIH table {j} holds ids out of range (corrupt)")
            counts = np.bincount(ids, minlength=self.capacity)
            if (counts > 1).any() or (must & (counts == 0)).any():
                raise _bad_table(j, DUPLICATE_OR_MISSING)
