"""Linear popcount scan over the code matrix: the fallback, and the tests' fast twin of the oracle."""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit

from .base import CodeMatrix, Result
from .bits import grow, keep_within, knn_threshold, popcount64, row_distance
from .planner import scan_cost


@njit(cache=True)
def _scan_chunk(
    codes: np.ndarray, alive: np.ndarray, query: np.ndarray, r: int, start: int, out_ids: np.ndarray,
    out_d: np.ndarray, n: int,
) -> tuple[int, int]:
    """Scan from row ``start`` until the buffers are full; returns (row to resume at, rows written)."""
    cap = out_ids.shape[0]
    for i in range(start, alive.shape[0]):
        if alive[i]:
            d = row_distance(codes, i, query)
            if d <= r:
                if n == cap:
                    return i, n
                out_ids[n] = i
                out_d[n] = d
                n += 1
    return alive.shape[0], n


@njit(cache=True)
def scan_radius(codes: np.ndarray, alive: np.ndarray, query: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    # Buffers are only grown between chunks: reassigning arrays inside the hot loop costs numba refcount
    # traffic on every row (measured 10x slower).
    out_ids = np.empty(256, np.int64)
    out_d = np.empty(256, np.int32)
    i, n = _scan_chunk(codes, alive, query, r, 0, out_ids, out_d, 0)
    while i < alive.shape[0]:
        out_ids = grow(out_ids, 2 * n)
        out_d = grow(out_d, 2 * n)
        i, n = _scan_chunk(codes, alive, query, r, i, out_ids, out_d, n)
    return out_ids[:n].copy(), out_d[:n].copy()


@njit(cache=True)
def _knn_chunk(
    codes: np.ndarray, alive: np.ndarray, query: np.ndarray, k: int, start: int, hist: np.ndarray,
    out_ids: np.ndarray, out_d: np.ndarray, n: int, thr: int,
) -> tuple[int, int, int]:
    cap = out_ids.shape[0]
    for i in range(start, alive.shape[0]):
        if alive[i]:
            d = row_distance(codes, i, query)
            if d <= thr:
                if n == cap:
                    return i, n, thr
                hist[d] += 1
                out_ids[n] = i
                out_d[n] = d
                n += 1
                if d < thr:
                    t = knn_threshold(hist, k)
                    if t >= 0:
                        thr = t
    return alive.shape[0], n, thr


@njit(cache=True)
def scan_knn(
    codes: np.ndarray, alive: np.ndarray, query: np.ndarray, k: int, bits: int
) -> tuple[np.ndarray, np.ndarray]:
    """All ids at distance <= the k-th smallest distance, in one pass: keep a running threshold from a
    histogram of the distances seen so far and buffer only rows at or below it."""
    hist = np.zeros(bits + 1, np.int64)
    out_ids = np.empty(4 * k + 256, np.int64)
    out_d = np.empty(4 * k + 256, np.int32)
    thr = bits
    i, n, thr = _knn_chunk(codes, alive, query, k, 0, hist, out_ids, out_d, 0, thr)
    while i < alive.shape[0]:
        n = keep_within(out_ids, out_d, n, thr)
        if 2 * n > out_ids.shape[0]:  # mostly ties at the threshold: make room
            out_ids = grow(out_ids, 2 * n)
            out_d = grow(out_d, 2 * n)
        i, n, thr = _knn_chunk(codes, alive, query, k, i, hist, out_ids, out_d, n, thr)
    n = keep_within(out_ids, out_d, n, thr)
    return out_ids[:n].copy(), out_d[:n].copy()


@njit(cache=True)
def _block_many(
    codes: np.ndarray, alive: np.ndarray, queries: np.ndarray, r: int, start: int, stop: int,
    out_q: np.ndarray, out_i: np.ndarray, out_d: np.ndarray, n: int,
) -> int:
    for i in range(start, stop):
        if alive[i]:
            for qi in range(queries.shape[0]):
                d = 0
                for w in range(queries.shape[1]):
                    d += popcount64(codes[i, w] ^ queries[qi, w])
                if d <= r:
                    out_q[n] = qi
                    out_i[n] = i
                    out_d[n] = d
                    n += 1
    return n


@njit(cache=True)
def scan_radius_many(
    codes: np.ndarray, alive: np.ndarray, queries: np.ndarray, r: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One pass over the matrix for all queries (each block of rows is read once and compared with every
    query while it is in cache). Returns flat (query index, id, distance) triples, grouped by row."""
    block = 256
    room = block * queries.shape[0]
    out_q = np.empty(room + 1024, np.int32)
    out_i = np.empty(room + 1024, np.int64)
    out_d = np.empty(room + 1024, np.int32)
    n = 0
    total = alive.shape[0]
    for start in range(0, total, block):
        if out_i.shape[0] - n < room:  # a whole block's worst case fits, so the row loop never grows arrays
            out_q = grow(out_q, 2 * (n + room))
            out_i = grow(out_i, 2 * (n + room))
            out_d = grow(out_d, 2 * (n + room))
        n = _block_many(codes, alive, queries, r, start, min(total, start + block), out_q, out_i, out_d, n)
    return out_q[:n].copy(), out_i[:n].copy(), out_d[:n].copy()


class Scan:
    """Stateless: every query reads the whole code matrix."""

    name = "scan"

    def __init__(self, matrix: CodeMatrix) -> None:
        self.matrix = matrix

    def rebuild(self) -> None:
        pass

    def drop(self) -> None:
        pass

    def added(self, ids: np.ndarray) -> None:
        pass

    def removed(self, ids: np.ndarray) -> None:
        pass

    def radius(self, query: np.ndarray, r: int, budget: int = -1) -> Result:
        m = self.matrix
        return scan_radius(m.codes, m.alive, query, r)

    def radius_many(self, queries: np.ndarray, r: int, budget: int = -1) -> list[Result]:
        if queries.shape[0] == 1:
            return [self.radius(queries[0], r)]
        m = self.matrix
        qi, ids, d = scan_radius_many(m.codes, m.alive, queries, r)
        order = np.argsort(qi, kind="stable")
        bounds = np.searchsorted(qi[order], np.arange(queries.shape[0] + 1))
        ids, d = ids[order], d[order]
        return [(ids[a:b], d[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def knn(self, query: np.ndarray, k: int, budget: int = -1) -> Result:
        m = self.matrix
        return scan_knn(m.codes, m.alive, query, k, m.bits)

    def cost(self, r: int) -> float:
        return scan_cost(self.matrix.capacity, self.matrix.words)

    def knn_cost(self, k: int) -> float:
        return scan_cost(self.matrix.capacity, self.matrix.words)

    def nbytes(self) -> int:
        return 0

    def stats(self) -> dict[str, Any]:
        return {}
