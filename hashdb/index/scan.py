"""Linear popcount scan over the code matrix: the fallback, and the tests' fast twin of the oracle."""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit

from .base import CodeMatrix, Result
from .bits import grow_i32, grow_i64, knn_threshold, row_distance
from .planner import scan_cost


@njit(cache=True)
def scan_radius(codes: np.ndarray, alive: np.ndarray, query: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    out_ids = np.empty(64, np.int64)
    out_d = np.empty(64, np.int32)
    n = 0
    for i in range(alive.shape[0]):
        if alive[i]:
            d = row_distance(codes, i, query)
            if d <= r:
                out_ids = grow_i64(out_ids, n + 1)
                out_d = grow_i32(out_d, n + 1)
                out_ids[n] = i
                out_d[n] = d
                n += 1
    return out_ids[:n].copy(), out_d[:n].copy()


@njit(cache=True)
def scan_knn(
    codes: np.ndarray, alive: np.ndarray, query: np.ndarray, k: int, bits: int
) -> tuple[np.ndarray, np.ndarray]:
    """All ids at distance <= the k-th smallest distance, in one pass: keep a running threshold from a
    histogram of the distances seen so far and buffer only rows at or below it."""
    hist = np.zeros(bits + 1, np.int64)
    out_ids = np.empty(64, np.int64)
    out_d = np.empty(64, np.int32)
    n = 0
    seen = 0
    thr = bits
    for i in range(alive.shape[0]):
        if alive[i]:
            d = row_distance(codes, i, query)
            if d <= thr:
                hist[d] += 1
                seen += 1
                out_ids = grow_i64(out_ids, n + 1)
                out_d = grow_i32(out_d, n + 1)
                out_ids[n] = i
                out_d[n] = d
                n += 1
                if seen >= k and d < thr:
                    thr = knn_threshold(hist, k)
                    if n > 4 * k + 64:  # drop what fell above the threshold so the buffer stays small
                        j = 0
                        for p in range(n):
                            if out_d[p] <= thr:
                                out_ids[j] = out_ids[p]
                                out_d[j] = out_d[p]
                                j += 1
                        n = j
    j = 0
    for p in range(n):
        if out_d[p] <= thr:
            out_ids[j] = out_ids[p]
            out_d[j] = out_d[p]
            j += 1
    return out_ids[:j].copy(), out_d[:j].copy()


class Scan:
    """Stateless: every query reads the whole code matrix."""

    name = "scan"

    def __init__(self, matrix: CodeMatrix) -> None:
        self.matrix = matrix

    def rebuild(self) -> None:
        pass

    def added(self, ids: np.ndarray) -> None:
        pass

    def removed(self, ids: np.ndarray) -> None:
        pass

    def radius(self, query: np.ndarray, r: int, budget: int = -1) -> Result:
        m = self.matrix
        return scan_radius(m.codes, m.alive, query, r)

    def knn(self, query: np.ndarray, k: int, budget: int = -1) -> Result:
        m = self.matrix
        return scan_knn(m.codes, m.alive, query, k, m.bits)

    def cost(self, r: int) -> float:
        return scan_cost(self.matrix.capacity, self.matrix.words)

    def nbytes(self) -> int:
        return 0

    def stats(self) -> dict[str, Any]:
        return {}
