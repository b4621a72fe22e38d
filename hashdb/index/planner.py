"""Cost model: estimated nanoseconds per query for each structure; the planner picks the cheapest.

The constants are single-thread timings from bench/index_bench.py runs on the 2-core development machine
(uniform 256-bit codes at 1M and 10M). Only their ratios matter for the choice; docs/index.md's planner
section lists the crossovers they give.
"""

from __future__ import annotations

import math

import numpy as np

# Scan of 10M x 256 bits measured 55-70 ms (0.4 ns per row + 1.6 ns per word); MIH at r=24 (1023 probes,
# ~1200 candidates) 0.34 ms and at r=32 (3047 probes, ~3600 candidates) 0.93 ms, i.e. ~120-150 ns per
# probe or candidate, each being two or three cache misses.
SCAN_NS_PER_ROW = 0.4  # scan: per row of the code matrix (alive rows and holes alike; 1M x 64 bits: 0.7 ms)
SCAN_NS_PER_WORD = 1.6  # ... plus per 64-bit word
# ... but a matrix that fits the last-level cache streams 4x faster (1M x 256 bits = 32 MB: 1.43 ms).
SCAN_NS_PER_WORD_CACHED = 0.3
SCAN_CACHED_BYTES = 48 << 20
SCAN_NS_FIXED = 2_000.0
MIH_NS_FIXED = 5_000.0
MIH_NS_PROBE = 120.0  # one directory lookup + one short run of packed entries
MIH_NS_CAND = 150.0  # one new id: stamp, alive flag and code row, each a likely cache miss
# Building the tables: per code per table (10M x 256 bits, 11 tables: about 0.33 s of CPU per table).
MIH_NS_BUILD = 35.0
BK_NS_NODE = 15.0  # one BK-tree node: distance + child range walk (100k x 64 bits, r=4: 83 us for ~5.5k nodes)
BK_NS_FIXED = 5_000.0
# kNN-MIH may spend a tenth to a half of a scan's estimate before the scan takes over; below this many
# codes it is not tried at all (a scan of 64 rows costs less than MIH's fixed overhead).
KNN_BUDGET_MIN = 0.1
KNN_BUDGET_MAX = 0.5
KNN_MIN_CODES = 64


def scan_cost(capacity: int, words: int) -> float:
    per_word = SCAN_NS_PER_WORD_CACHED if capacity * words * 8 <= SCAN_CACHED_BYTES else SCAN_NS_PER_WORD
    return SCAN_NS_FIXED + capacity * (SCAN_NS_PER_ROW + per_word * words)


def probe_radii(m: int, r: int) -> np.ndarray:
    """Refined pigeonhole, r = a*m + b: substrings 0..b at radius a, the rest at a-1 (-1 = not probed)."""
    a, b = divmod(r, m)
    return np.where(np.arange(m) <= b, a, a - 1)


def probe_counts(lens: np.ndarray, r: int) -> np.ndarray:
    """Values probed per substring table for radius r."""
    if lens.size == 0:
        return np.zeros(0)
    radii = probe_radii(lens.size, r)
    counts = [
        sum(math.comb(int(s), d) for d in range(min(int(a), int(s)) + 1)) for s, a in zip(lens, radii, strict=True)
    ]
    return np.array(counts, dtype=np.float64)


def mih_cost(
    probes: np.ndarray, lens: np.ndarray, collisions: np.ndarray | None, n_base: int, n_delta: int, words: int
) -> float:
    """Probes x probe cost + expected candidates x verify cost. The exact-match bucket is sized from the
    table's collisions (sum of squared bucket sizes / n: what a query drawn like the data meets); the
    other probed buckets are assumed uniform, n / 2^s."""
    if lens.size == 0:
        return MIH_NS_FIXED + MIH_NS_CAND * n_delta
    n = max(n_base, 1)
    uniform = n_base / np.exp2(lens.astype(np.float64))
    exact = uniform if collisions is None else np.maximum(collisions / n, uniform)
    probed = probes > 0
    cands = np.where(probed, exact + np.maximum(probes - 1, 0) * uniform, 0.0)
    return float(MIH_NS_FIXED + MIH_NS_PROBE * probes.sum() + MIH_NS_CAND * (cands.sum() + n_delta))


def mih_build_cost(n: int, m: int) -> float:
    return MIH_NS_BUILD * n * m


def bk_node_cost(words: int) -> float:
    """One BK-tree node of ``words`` 64-bit words: BK_NS_NODE was measured at one word; each more is a distance
    word more, as in the scan (a node of 768 bits costs twice one of 64)."""
    return BK_NS_NODE + SCAN_NS_PER_WORD * max(words - 1, 0)


def bktree_prior_cost(n: int, words: int = 1) -> float:
    """Before a BK-tree exists the planner assumes it visits every node: it never builds one on its own.
    Measured, it never beat MIH (uniform codes; 100k x 256 bits r=2: 10 us vs MIH 5 us, r=8: 147 vs 8 us;
    1M x 64 bits r=4: 0.53 ms vs 0.015 ms), so the prior only keeps it out of the way. Every node's distance
    reads all ``words`` of its code: priced per node alone, an unbuilt tree undercut the scan of 768-bit
    codes (10M codes at the decision radius: the planner built a tree and answered in 339 ms, the scan in 90
    ms). Once a tree was forced into existence its cost is sampled (BKTree.cost)."""
    return BK_NS_FIXED + bk_node_cost(words) * n


def knn_budget(scan: float, reach: float) -> float:
    """What kNN-MIH may spend: twice the cost of a radius search out to bits/8 (``reach``, where near copies
    live: 32 of 256 bits), within a tenth to a half of a scan. Measured at 1M x 256 bits with 10 planted
    copies at distances 1..32 and k=10, a tenth of a scan was too little (6.3 ms vs scan 5.0); this budget
    answers in 0.45 ms, and random queries (k-th neighbour ~90 bits away) still cost about a scan."""
    return min(KNN_BUDGET_MAX * scan, max(KNN_BUDGET_MIN * scan, 2 * reach))


def choose(costs: dict[str, float]) -> str:
    """The cheapest structure; the scan wins ties so tiny indexes never pay for a structure."""
    return min(costs, key=lambda name: (costs[name], name != "scan"))
