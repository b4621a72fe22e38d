"""The saved MIH tables checked whole, in one numba pass per table: what validate.SavedTables checks chunk by
chunk with numpy (``_entries``) and as a whole (``complete``), for the moment every table is handed to the
kernels. The numpy checks gather each entry's code in entry order, pass by pass: 0.9 s a table at 10M codes
(a 10M x 512-bit file, 22 tables, took 21 s before its first kernel query); here each entry and each code is
read once, the codes in id order, and the tables are checked in parallel.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .bits import substring_of
from .validate import DUPLICATE_OR_MISSING, MISMATCH, OUT_OF_RANGE, UNSORTED

OK = 0


@njit(cache=True)
def check_table(
    codes: np.ndarray, entries: np.ndarray, row: np.ndarray, start: int, length: int, t: int, id_bits: int,
    live: np.ndarray,
) -> int:  # fmt: skip
    """One table: ``entries`` (n_base,) over the directory ``row`` (2^t + 1 offsets, already checked monotone
    from 0 to n_base); ``live`` (capacity,) marks the ids every table must list (alive and not pending).
    Returns OK or the first problem found (validate.PROBLEMS).

    Two passes, so that no code is read in entry order: the entries, in order, write the substring each one
    stands for (its run's top bits over its own low bits) into a per-id array (8 bytes an id, a tenth of the
    reads of a 64-byte code in entry order), and then the codes, in id order, are compared with what was written
    for them."""
    capacity = codes.shape[0]
    low_bits = length - t
    id_mask = (np.uint64(1) << np.uint64(id_bits)) - np.uint64(1)
    listed = np.full(capacity, np.uint64(1) << np.uint64(32), np.uint64)  # above any substring: not listed
    b = 0  # the directory bucket of position k: row[b] <= k < row[b + 1]
    prev = np.uint64(0)
    for k in range(entries.shape[0]):
        while row[b + 1] <= k:
            b += 1
        e = np.uint64(entries[k])
        i = e & id_mask
        value = e >> np.uint64(id_bits)
        if i >= capacity or (value >> np.uint64(low_bits)) != 0:
            return OUT_OF_RANGE
        if k > 0 and row[b] != k and e <= prev:  # within a run (k starts none) entries ascend
            return UNSORTED
        prev = e
        if listed[i] >> np.uint64(32):
            listed[i] = (np.uint64(b) << np.uint64(low_bits)) | value
        else:
            return DUPLICATE_OR_MISSING
    for c in range(capacity):
        if live[c]:
            got = listed[c]
            if got >> np.uint64(32):
                return DUPLICATE_OR_MISSING
            if got != substring_of(codes[c], start, length):
                return MISMATCH
    return OK


@njit(cache=True, parallel=True)
def check_tables(
    codes: np.ndarray, entries: np.ndarray, offsets: np.ndarray, starts: np.ndarray, lens: np.ndarray, t: int,
    id_bits: int, live: np.ndarray, out: np.ndarray,
) -> None:  # fmt: skip
    """check_table for every table j (``entries[j]``, ``offsets[j]``, ``starts[j]``, ``lens[j]``) into out[j]."""
    for j in prange(entries.shape[0]):
        out[j] = check_table(codes, entries[j], offsets[j], starts[j], lens[j], t, id_bits, live)
