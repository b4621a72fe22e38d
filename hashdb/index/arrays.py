"""The named bundles of arrays the kernels take, so no kernel has a dozen positional arrays to keep in order.

Kernels receive these as *plain* tuples at the call from Python and name them with ``Bundle(*args)`` inside:
numba types a plain tuple of arrays in C but a NamedTuple in Python, which measured about 2 us more per call
(as much as a whole r=4 MIH query at 1M); inside compiled code the names cost nothing. Shells build them
with ``tuple(bundle)`` or the ``*_args`` helpers. Also ``sorted_unique``, which the numpy query path and the
index file's checks share. This module imports only numpy.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Matrix(NamedTuple):
    """The shared code matrix as kernels see it (CodeMatrix in base.py owns it)."""

    codes: np.ndarray  # (capacity, words) uint64, by dense id
    alive: np.ndarray  # (capacity,) uint8
    stamps: np.ndarray  # (capacity,) uint16: an id stamped with this query's generation was seen already


class Delta(NamedTuple):
    """A built structure's pending inserts: ids[:n] are verified directly by every query."""

    ids: np.ndarray  # int64
    n: int


class Found(NamedTuple):
    """Result buffers: kernels write while there is room and count past the end (the shell reruns bigger)."""

    ids: np.ndarray  # int64
    d: np.ndarray  # int32


class Budget(NamedTuple):
    """A work bound in the planner's cost units (about nanoseconds): -1 = unbounded. ``step`` is the cost of
    one MIH probe or one BK-tree node, ``cand`` of one new MIH candidate."""

    limit: int
    step: int
    cand: int


class Tables(NamedTuple):
    """MIH's substring tables (mih.py): substring j covers bits [starts[j], starts[j] + lens[j]); a
    directory of offsets over its top ``t`` bits; entries pack the value's low bits above an ``id_bits`` id."""

    starts: np.ndarray  # (m,) int64
    lens: np.ndarray  # (m,) int64
    t: int
    offsets: np.ndarray  # (m, 2^t + 1) int32
    entries: np.ndarray  # (m, n_base) uint32 or uint64
    id_bits: int


class Tree(NamedTuple):
    """A BK-tree in flat arrays (bktree.py): children of node i are nodes child_start[i] ..
    child_start[i] + child_count[i] - 1, sorted by ``edge`` (their distance to node i)."""

    node_codes: np.ndarray  # (nodes, words) uint64: the code each node was inserted with
    node_ids: np.ndarray  # int64
    child_start: np.ndarray  # int32
    child_count: np.ndarray  # int32
    edge: np.ndarray  # int32


Result = tuple[np.ndarray, np.ndarray]

__all__ = ["Budget", "Delta", "Found", "Matrix", "Result", "Tables", "Tree", "sorted_unique"]


def sorted_unique(a: np.ndarray) -> np.ndarray:
    """np.unique of a 1-D array, without it: np.unique imports numpy.ma on its first call (10-15 ms of a fresh
    process's first query, measured by bench/startup_bench.py's `hashdb query`)."""
    s = np.sort(a.ravel())
    if s.size < 2:
        return s
    keep = np.empty(s.size, dtype=bool)
    keep[0] = True
    np.not_equal(s[1:], s[:-1], out=keep[1:])
    return s[keep]
