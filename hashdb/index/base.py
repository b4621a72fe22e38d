"""The shared code matrix every structure verifies against, and the protocol all structures follow."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from .arrays import Found, Result
from .bits import scatter_rows


class CodeMatrix:
    """Codes indexed by dense id: a capacity-doubling (capacity, words) uint64 matrix plus an alive mask.

    Also owns the generation-stamped ``stamps`` array the structures use to dedupe candidates without a set.
    """

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.words = bits // 64
        self.codes = np.zeros((0, self.words), np.uint64)
        self.alive = np.zeros(0, np.uint8)
        self.stamps = np.zeros(0, np.uint16)
        self.generation = 0
        self.n_alive = 0

    @property
    def capacity(self) -> int:
        return self.alive.shape[0]

    def reserve(self, capacity: int, exact: bool = False) -> None:
        old = self.capacity
        if capacity <= old:
            return
        new = capacity if exact else max(capacity, 2 * old, 16)
        codes = np.zeros((new, self.words), np.uint64)
        codes[:old] = self.codes
        alive = np.zeros(new, np.uint8)
        alive[:old] = self.alive
        self.codes, self.alive = codes, alive
        self.stamps = np.zeros(new, np.uint16)
        self.generation = 0

    def load(self, ids: np.ndarray, codes: np.ndarray) -> None:
        """Replace everything with exactly these (distinct) ids; capacity is max id + 1, not doubled."""
        cap = int(ids.max()) + 1 if ids.size else 0
        self.codes = np.zeros((cap, self.words), np.uint64)
        self.alive = np.zeros(cap, np.uint8)
        self.stamps = np.zeros(cap, np.uint16)
        self.generation = 0
        scatter_rows(self.codes, ids, codes)
        self.alive[ids] = 1
        self.n_alive = int(ids.size)

    def put(self, ids: np.ndarray, codes: np.ndarray) -> None:
        """Insert or replace; ``ids`` distinct."""
        if ids.size == 0:
            return
        self.reserve(int(ids.max()) + 1)
        self.n_alive += int(ids.size - np.count_nonzero(self.alive[ids]))
        self.codes[ids] = codes
        self.alive[ids] = 1

    def kill(self, ids: np.ndarray) -> np.ndarray:
        """Mark ids dead; returns those that were alive (absent ids are ignored)."""
        ids = ids[(ids >= 0) & (ids < self.capacity)]
        ids = ids[self.alive[ids] != 0]
        self.alive[ids] = 0
        self.n_alive -= int(ids.size)
        return ids

    def live_ids(self) -> np.ndarray:
        return np.flatnonzero(self.alive).astype(np.int64)

    def next_generation(self) -> int:
        """A fresh stamp value; stamps equal to it mark ids already seen by the current query."""
        self.generation += 1
        if self.generation > 0xFFFF:
            self.stamps[:] = 0
            self.generation = 1
        return self.generation

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The kernels' Matrix bundle, as the plain tuple they take."""
        return (self.codes, self.alive, self.stamps)

    def nbytes(self) -> int:
        return int(self.codes.nbytes + self.alive.nbytes + self.stamps.nbytes)


class Structure(Protocol):
    """What MIH, the BK-tree and the scan all offer, so the planner, tests and benchmarks treat them alike.

    A structure holds a reference to the shared CodeMatrix and is told about changes *after* the matrix
    has applied them. Queries come in batches (``radius_many``; ``radius`` is the batch of one) and kNN is
    planned like radius: ``cost(r)`` and ``knn_cost(k)`` estimate nanoseconds per query (inf = would not
    try). ``budget`` is a work bound in the same units; a structure that would exceed it returns None for
    that query so the caller can fall back to the scan. -1 = unbounded.
    """

    name: str

    def rebuild(self) -> None: ...

    def drop(self) -> None: ...

    def added(self, ids: np.ndarray) -> None: ...

    def removed(self, ids: np.ndarray) -> None: ...

    def radius(self, query: np.ndarray, r: int, budget: int = -1) -> Result | None: ...

    def radius_many(self, queries: np.ndarray, r: int, budget: int = -1) -> Sequence[Result | None]: ...

    def knn(self, query: np.ndarray, k: int, budget: int = -1) -> Result | None: ...

    def cost(self, r: int) -> float: ...

    def knn_cost(self, k: int) -> float: ...

    def nbytes(self) -> int: ...

    def stats(self) -> dict[str, Any]: ...


# A delta of n/64 costs a query about what n/64 random rows cost: a few percent over MIH's own work at
# r <= 16 on 10M codes. Tombstones only cost probes, so they may pile up to a quarter. (Module attributes so
# tests can shrink them to exercise compaction on small sets.)
PENDING_MIN = 2048
PENDING_FRACTION = 64
TOMBSTONE_FRACTION = 4


class Pending:
    """Changes a built structure has not absorbed yet: ids inserted since its build (scanned by every
    query, verified against the matrix) and a count of removals (tombstones: the alive mask hides them).
    ``due`` says when a rebuild pays off; structures check it lazily before a query, so a long run of
    inserts with no query in between costs one rebuild, not many."""

    def __init__(self) -> None:
        self.ids = np.zeros(256, np.int64)
        self.n = 0
        self.removed = 0

    def add(self, ids: np.ndarray) -> None:
        need = self.n + ids.size
        if need > self.ids.size:
            grown = np.empty(max(need, 2 * self.ids.size), np.int64)
            grown[: self.n] = self.ids[: self.n]
            self.ids = grown
        self.ids[self.n : need] = ids
        self.n = need

    def due(self, n_base: int) -> bool:
        return self.n > max(PENDING_MIN, n_base // PENDING_FRACTION) or self.removed > max(
            PENDING_MIN, n_base // TOMBSTONE_FRACTION
        )

    def nbytes(self) -> int:
        return int(self.ids.nbytes)


class Incremental:
    """The bookkeeping MIH and the BK-tree share: built in bulk (``build``), then absorbing changes as a
    Pending delta and tombstones until ``due`` says a rebuild pays off, checked lazily by ``ready`` before
    a query; reusable result buffers that kernels count past and the shell grows."""

    name = ""

    def __init__(self, matrix: CodeMatrix) -> None:
        self.matrix = matrix
        self.built = False
        self.rebuilds = 0
        self.pending = Pending()
        self.grow_found(2048)

    def build(self) -> None:
        raise NotImplementedError

    def base_size(self) -> int:
        """Codes the last build holds (what the pending fractions are taken of)."""
        raise NotImplementedError

    def added(self, ids: np.ndarray) -> None:
        if self.built:
            self.pending.add(ids)

    def removed(self, ids: np.ndarray) -> None:
        if self.built:
            self.pending.removed += ids.size

    def due(self) -> bool:
        return (not self.built) or self.pending.due(self.base_size())

    def ready(self) -> None:
        if self.due():
            self.build()

    def _clear(self) -> None:
        """Release the built arrays (and the pending changes, which only make sense against them)."""
        self.pending = Pending()

    def drop(self) -> None:
        """Forget the built state (after a bulk load): the next query that wants the structure builds it."""
        self.built = False
        self._clear()

    def delta(self) -> tuple[np.ndarray, int]:
        return (self.pending.ids, self.pending.n)

    def grow_found(self, n: int) -> None:
        """Result buffers for at least ``n`` answers (a power of two, at least twice n)."""
        size = 1 << max(12, (2 * n - 1).bit_length())
        self._found = Found(np.empty(size, np.int64), np.empty(size, np.int32))
        self._found_args = tuple(self._found)  # what kernels take (arrays.py: plain tuples dispatch faster)

    def found(self, n: int) -> Result:
        return self._found.ids[:n].copy(), self._found.d[:n].copy()

    def radius(self, query: np.ndarray, r: int, budget: int = -1) -> Result | None:
        raise NotImplementedError

    def radius_many(self, queries: np.ndarray, r: int, budget: int = -1) -> list[Result | None]:
        # Each query's probes are independent; a batch saves nothing inside the kernel, so loop here.
        return [self.radius(q, r, budget) for q in queries]
