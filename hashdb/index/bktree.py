"""BK-tree (Burkhard-Keller) in flat arrays: node i holds one code; its children are the contiguous
nodes child_start[i] .. child_start[i] + child_count[i], sorted by ``edge`` = distance to node i.

Built in bulk by recursive partitioning with an explicit work stack: pick a segment's first code as its
node, counting-sort the rest by distance to it, and each group of equal distance becomes a child
segment. That is a few sequential passes over the codes per tree level instead of one root-to-leaf walk
per insert. Codes at distance 0 from their node become leaf children (a chain of duplicates would make
the build quadratic). Nodes keep their own copy of their code (in node order, so siblings are adjacent
in memory): routing must use the code a node was inserted with even after the id's code is replaced.

Built lazily (first forced use or when the planner picks it), so it costs no memory otherwise. Inserts
after the build go to a pending delta, removes are tombstones; both trigger a rebuild past a fraction.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import njit

from .arrays import Budget, Delta, Found, Matrix, Tree
from .base import CodeMatrix, Incremental, Pending, Result
from .bits import keep_within, knn_threshold, row_distance, scan_ids
from .planner import BK_NS_FIXED, BK_NS_NODE, bk_node_cost, bktree_prior_cost


@njit(cache=True)
def build_bktree(
    codes: np.ndarray, live: np.ndarray, bits: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Returns (node_ids, child_start, child_count, edge) for the live ids; node 0 is the root."""
    n = live.shape[0]
    perm = live.copy()
    node_ids = np.empty(n, np.int64)
    child_start = np.zeros(n, np.int32)
    child_count = np.zeros(n, np.int32)
    edge = np.zeros(n, np.int32)
    if n == 0:
        return node_ids, child_start, child_count, edge
    seg_lo = np.empty(n, np.int64)
    seg_hi = np.empty(n, np.int64)
    seg_node = np.empty(n, np.int64)
    dist = np.empty(n, np.int32)
    tmp_ids = np.empty(n, np.int64)
    tmp_d = np.empty(n, np.int32)
    cnt = np.zeros(bits + 2, np.int64)
    sp = 0
    seg_lo[0], seg_hi[0], seg_node[0] = 0, n, 0
    sp = 1
    next_node = 1
    while sp > 0:
        sp -= 1
        lo, hi, node = seg_lo[sp], seg_hi[sp], seg_node[sp]
        pivot = perm[lo]
        node_ids[node] = pivot
        if hi - lo == 1:
            continue
        pc = codes[pivot]
        for p in range(lo + 1, hi):
            dist[p] = row_distance(codes, perm[p], pc)
        a = lo + 1
        if hi - a <= 32:  # short segment: insertion sort by distance
            for p in range(a + 1, hi):
                d, i = dist[p], perm[p]
                q = p - 1
                while q >= a and dist[q] > d:
                    dist[q + 1] = dist[q]
                    perm[q + 1] = perm[q]
                    q -= 1
                dist[q + 1] = d
                perm[q + 1] = i
        else:  # counting sort by distance
            cnt[:] = 0
            for p in range(a, hi):
                cnt[dist[p] + 1] += 1
            for d in range(bits + 1):
                cnt[d + 1] += cnt[d]
            for p in range(a, hi):
                dst = cnt[dist[p]]
                tmp_ids[dst] = perm[p]
                tmp_d[dst] = dist[p]
                cnt[dist[p]] += 1
            for p in range(a, hi):
                perm[p] = tmp_ids[p - a]
                dist[p] = tmp_d[p - a]
        # children: every distance-0 code a leaf of its own, then one child per distinct distance
        first = next_node
        p = a
        while p < hi:
            q = p + 1
            if dist[p] != 0:
                while q < hi and dist[q] == dist[p]:
                    q += 1
            child = next_node
            next_node += 1
            edge[child] = dist[p]
            seg_lo[sp], seg_hi[sp], seg_node[sp] = p, q, child
            sp += 1
            p = q
        child_start[node] = first
        child_count[node] = next_node - first
    return node_ids, child_start, child_count, edge


@njit(cache=True)
def _same_code(a: np.ndarray, i: int, b: np.ndarray, j: int) -> bool:
    for w in range(a.shape[1]):
        if a[i, w] != b[j, w]:
            return False
    return True


@njit(cache=True)
def bk_search(
    arrays: tuple, matrix: tuple, gen: int, query: np.ndarray, r: int, k: int, delta: tuple, stack: np.ndarray,
    found: tuple, bound: tuple,
) -> tuple[int, int, int]:
    """Radius search (k = 0) or kNN (k >= 1, the radius shrinking to the k-th distance found so far).
    Arguments: plain tuples of the arrays.py bundles Tree, Matrix, Delta, Found, Budget (step = one node).
    Returns (status, answers in the buffers, work): status 0 ok, -1 budget exceeded, -2 stack too small,
    -3 result buffers too small."""
    tree, mat, dl, out, budget = Tree(*arrays), Matrix(*matrix), Delta(*delta), Found(*found), Budget(*bound)
    node_codes, node_ids, child_start, child_count, edge = tree
    codes, alive, stamps = mat
    out_ids, out_d = out
    w_node = budget.step
    bits = query.shape[0] * 64
    hist = np.zeros(bits + 1, np.int64)
    cap = out_ids.shape[0]
    thr = r
    work = dl.n * w_node
    n = scan_ids(dl, mat, gen, query, thr, out, hist)
    if n > cap:
        return -3, 0, work
    if k > 0:
        t = knn_threshold(hist, k)
        if t >= 0:
            thr = t
    sp = 0
    if node_ids.shape[0] > 0:
        stack[0] = 0
        sp = 1
    while sp > 0:
        sp -= 1
        node = stack[sp]
        d = row_distance(node_codes, node, query)
        work += w_node
        if budget.limit >= 0 and work > budget.limit:
            return -1, 0, work
        if d <= thr:
            i = node_ids[node]
            if alive[i] and stamps[i] != gen and _same_code(node_codes, node, codes, i):
                stamps[i] = gen
                if n == cap:  # compact what fell above a shrunk kNN radius before giving up
                    n = keep_within(out_ids, out_d, n, thr)
                    if n == cap:
                        return -3, 0, work
                out_ids[n] = i
                out_d[n] = d
                n += 1
                hist[d] += 1
                if k > 0 and d < thr:
                    t = knn_threshold(hist, k)
                    if t >= 0:
                        thr = t
        lo = d - thr
        hi = d + thr
        c0 = child_start[node]
        for c in range(c0, c0 + child_count[node]):
            e = edge[c]
            if e < lo:
                continue
            if e > hi:
                break
            if sp == stack.shape[0]:
                return -2, 0, work
            stack[sp] = c
            sp += 1
    return 0, keep_within(out_ids, out_d, n, thr), work


BK_COST_SAMPLES = 4


class BKTree(Incremental):
    """BK-tree over the shared code matrix, built on first use."""

    name = "bktree"

    def __init__(self, matrix: CodeMatrix) -> None:
        super().__init__(matrix)
        self._stack = np.empty(1024, np.int64)
        self._clear()

    def _clear(self) -> None:
        words = self.matrix.words
        self.node_codes = np.zeros((0, words), np.uint64)
        self.node_ids = np.zeros(0, np.int64)
        self.child_start = np.zeros(0, np.int32)
        self.child_count = np.zeros(0, np.int32)
        self.edge = np.zeros(0, np.int32)
        self.branching = 2.0
        self.pending = Pending()
        self._costs: dict[int, float] = {}

    def rebuild(self) -> None:
        """Called on bulk_load: only rebuilds a tree that exists; an unbuilt one stays lazy."""
        if self.built:
            self.build()

    def build(self) -> None:
        mat = self.matrix
        self._clear()
        live = mat.live_ids()
        self.node_ids, self.child_start, self.child_count, self.edge = build_bktree(mat.codes, live, mat.bits)
        self.node_codes = mat.codes[self.node_ids]
        internal = np.count_nonzero(self.child_count)
        self.branching = float(self.child_count.sum() / internal) if internal else 2.0
        self.built = True
        self.rebuilds += 1

    def base_size(self) -> int:
        return int(self.node_ids.size)

    def tree(self) -> tuple[np.ndarray, ...]:
        return (self.node_codes, self.node_ids, self.child_start, self.child_count, self.edge)

    def _search(self, query: np.ndarray, r: int, k: int, budget: int) -> Result | None:
        self.ready()
        mat = self.matrix
        while True:
            status, n, _ = bk_search(
                self.tree(), mat.arrays(), mat.next_generation(), query, r, k, self.delta(), self._stack,
                self._found_args, (budget, int(BK_NS_NODE), 0),
            )
            if status == 0:
                return self.found(n)
            if status == -1:
                return None
            if status == -2:
                self._stack = np.empty(2 * self._stack.size, np.int64)
            else:
                self.grow_found(self._found.ids.size)

    def radius(self, query: np.ndarray, r: int, budget: int = -1) -> Result | None:
        return self._search(query, r, 0, budget)

    def knn(self, query: np.ndarray, k: int, budget: int = -1) -> Result | None:
        return self._search(query, self.matrix.bits, k, budget)

    def cost(self, r: int) -> float:
        """Sampled once per radius and build: the mean work of a few queries drawn from the tree's own
        codes (BK-tree visits depend on the data too much for a formula to be of use)."""
        n = self.matrix.n_alive
        if self.due() or self.node_ids.size == 0:
            return bktree_prior_cost(n, self.matrix.words)
        cached = self._costs.get(r)
        if cached is None:
            mat = self.matrix
            rng = np.random.default_rng(r)
            budget = int(BK_NS_NODE * (self.node_ids.size + self.pending.n))
            work = []
            for node in rng.integers(0, self.node_ids.size, BK_COST_SAMPLES):
                query = self.node_codes[node].copy()
                _, _, w = bk_search(
                    self.tree(), mat.arrays(), mat.next_generation(), query, r, 0, (self.pending.ids, 0),
                    self._stack, self._found_args, (budget, int(BK_NS_NODE), 0),
                )
                work.append(w)
            # the search counts BK_NS_NODE per node visited; a node of more words costs more (bk_node_cost)
            scale = bk_node_cost(self.matrix.words) / BK_NS_NODE
            cached = self._costs[r] = BK_NS_FIXED + float(np.mean(work)) * scale
        return cached + bk_node_cost(self.matrix.words) * self.pending.n

    def knn_cost(self, k: int) -> float:
        """A kNN starts at the full radius and shrinks, so a full-radius search bounds it; an unbuilt tree
        is never planned for kNN (the prior of cost() is only a guess, and building costs a whole pass)."""
        if self.due():
            return math.inf
        return self.cost(self.matrix.bits)

    def nbytes(self) -> int:
        arrays = (self.node_codes, self.node_ids, self.child_start, self.child_count, self.edge, self._stack)
        return int(sum(a.nbytes for a in arrays) + self.pending.nbytes())

    def stats(self) -> dict[str, Any]:
        return {
            "built": self.built,
            "nodes": int(self.node_ids.size),
            "branching": round(self.branching, 2),
            "delta": self.pending.n,
            "tombstones": self.pending.removed,
            "rebuilds": self.rebuilds,
            "nbytes": self.nbytes(),
        }
