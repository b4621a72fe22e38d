"""The shared code matrix every structure verifies against, and the protocol all structures follow."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from .bits import scatter_rows

Result = tuple[np.ndarray, np.ndarray]


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

    def nbytes(self) -> int:
        return int(self.codes.nbytes + self.alive.nbytes + self.stamps.nbytes)


class Structure(Protocol):
    """What MIH, the BK-tree and the scan all offer, so the planner, tests and benchmarks treat them alike.

    A structure holds a reference to the shared CodeMatrix and is told about changes *after* the matrix
    has applied them. ``budget`` is a work bound in the planner's cost units (about nanoseconds); a
    structure that would exceed it returns None so the caller can fall back to the scan. -1 = unbounded.
    """

    name: str

    def rebuild(self) -> None: ...

    def added(self, ids: np.ndarray) -> None: ...

    def removed(self, ids: np.ndarray) -> None: ...

    def radius(self, query: np.ndarray, r: int, budget: int = -1) -> Result | None: ...

    def knn(self, query: np.ndarray, k: int, budget: int = -1) -> Result | None: ...

    def cost(self, r: int) -> float: ...

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
