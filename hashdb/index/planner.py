"""Cost model: estimated nanoseconds per query for each structure; the planner picks the cheapest."""

from __future__ import annotations

# Calibrated on the development machine (2-core Xeon, see docs/index.md), single thread.
SCAN_NS_PER_WORD = 0.9  # scan: per 64-bit word of the code matrix (alive rows and holes alike)
SCAN_NS_FIXED = 2_000.0


def scan_cost(capacity: int, words: int) -> float:
    return SCAN_NS_FIXED + SCAN_NS_PER_WORD * capacity * words
