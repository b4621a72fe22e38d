"""In-memory exact Hamming index: a shared code matrix, MIH, a BK-tree, a linear scan and a planner."""

from __future__ import annotations

from .memory import MemoryIndex

__all__ = ["MemoryIndex"]
