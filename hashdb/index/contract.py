"""What every in-memory index of HashDB shares, without numba (NumpyIndex must not import it): the structures
a query may force, their one argument check, and the protocol HashDB's index lifecycle relies on."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from ..errors import InvalidArgument, shown
from .arrays import Result

FORCES = (None, "mih", "bktree", "scan")  # what a query may force (None: the planner's choice)


def check_force(force: Any) -> str | None:
    """``force`` if it is one of FORCES, else InvalidArgument (the one check every entry point uses)."""
    if force not in FORCES:
        raise InvalidArgument(f"force must be one of {FORCES}, got {shown(force)}")
    return force  # type: ignore[no-any-return,unused-ignore]


class InMemoryIndex(Protocol):
    """What HashDB's two in-memory indexes offer, so its index lifecycle (hashdb.live_index) treats them
    alike: ``NumpyIndex`` (numpy alone: a fresh process's first queries, no numba import) and ``MemoryIndex``
    (the numba kernels). Ids are LMDB's dense ids; answers are (ids, distances) in any order."""

    engine: str  # "numpy" or "kernels"

    def __len__(self) -> int: ...

    def add(self, ids: np.ndarray, codes: np.ndarray) -> None: ...

    def remove(self, ids: np.ndarray) -> None: ...

    def radius(self, query: np.ndarray, r: int, force: str | None = None) -> Result: ...

    def radius_many(self, queries: np.ndarray, r: int, force: str | None = None) -> list[Result]: ...

    def knn(self, query: np.ndarray, k: int, force: str | None = None) -> Result: ...

    def nbytes(self) -> int: ...

    def stats(self) -> dict[str, Any]: ...
