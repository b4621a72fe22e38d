"""The benchmark's baseline self-join: the textbook double loop, kept out of the library (only the benchmark
uses it)."""

from __future__ import annotations

import numpy as np
from numba import njit

from hashdb.index.bits import popcount64


@njit(cache=True)
def naive_pairs_count(codes: np.ndarray, r: int, i0: int = 0, i1: int = -1) -> int:
    """The textbook double loop (no tiling, no threads) over rows i in [i0, i1) and all j > i: the benchmark's
    baseline; counts pairs within r."""
    n = codes.shape[0]
    words = codes.shape[1]
    c = 0
    for i in range(i0, n if i1 < 0 else i1):
        for j in range(i + 1, n):
            d = 0
            for w in range(words):
                d += popcount64(codes[i, w] ^ codes[j, w])
            if d <= r:
                c += 1
    return c
