"""In-memory exact Hamming index: a shared code matrix, MIH, a BK-tree, a linear scan and a planner.

``MemoryIndex`` (numba kernels) loads numba on first access; ``persist`` (the index file) and
``numpy_index`` (numpy-only answers for short-lived processes) do not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .memory import MemoryIndex


def __getattr__(name: str) -> Any:
    if name == "MemoryIndex":
        from .memory import MemoryIndex

        return MemoryIndex
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["MemoryIndex"]
