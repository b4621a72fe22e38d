"""Self-join kernels: every pair of rows of a (n, words) uint64 code matrix within Hamming distance r.

Two exact methods, one answer (tests/test_pairs.py checks both against brute force):

- ``"mih"``: multi-index hashing turned on itself. Cut the codes into m = r + 1 substrings; by pigeonhole a
  pair within r agrees exactly on at least one of them, so only rows sharing a substring bucket are
  compared, and a pair is reported by the first table where its substrings agree (no dedupe set). Candidates
  number about m n^2 / 2^(bits/m): far below n^2 / 2 for small r (r = 16 at 256 bits: 17 tables of 15 bits).
- ``"blocked"``: all pairs, tile by tile. The codes are transposed once to (words, n); four rows at a time
  sum their distances to a tile of contiguous columns word by word, without a branch (a loop LLVM vectorizes,
  popcount included, at any code length: 512-bit codes cost twice 256-bit ones per pair), and are walked
  again only when they have hits. At the codec's copy radius (about 0.3 x bits) no pigeonhole split prunes
  anything, so this is the method there.

Both cut the work into tasks run by ``prange`` in waves; each task writes its first ``cap`` pairs into its
own row of a wave buffer and counts them all, and the rare task that overflows is rerun alone with a buffer
of exactly its count. The Python drivers (``self_join``, ``rectangle_join``) only plan and concatenate.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .bits import popcount64, substring_of

BLOCK = 256  # tasks are squares of 4 x BLOCK rows
BLOCK_COLUMNS = 512  # columns per tile: 512 x 8 B per word read, and four rows' distances (16 KB), in L1
WAVE_TASKS = 256  # tasks per prange wave: enough to balance two to a few dozen threads
TASK_CAP = 1024  # pairs a task may write before it is rerun alone (random codes at the copy radius: ~0)
MIH_VERIFY_NS = 8.0  # measured cost ratio: one random-row candidate check vs one tiled pair (about 0.5 ns)
METHODS = (None, "mih", "blocked")

Pairs = tuple[np.ndarray, np.ndarray, np.ndarray]


# ---- blocked all pairs -----------------------------------------------------------------------------------


@njit(cache=True)
def tile_pairs(
    ct: np.ndarray, i0: int, i1: int, j0: int, j1: int, r: int,
    out_a: np.ndarray, out_b: np.ndarray, out_d: np.ndarray,
) -> int:  # fmt: skip
    """Pairs (i, j) with i in [i0, i1), j in [j0, j1), i < j and distance <= r, of the transposed codes ``ct`` =
    codes.T (words, n) contiguous. Writes the first len(out_a) of them, returns how many there are.

    Rows four at a time against a tile of BLOCK_COLUMNS columns: each row's distances are summed word by word
    into a buffer (the loop over columns reads them contiguously, branch-free, so LLVM vectorizes it, popcount
    included, at any code length), then counted; only a group of rows with hits (rare outside copy clusters)
    is walked again to write them."""
    cap = out_a.shape[0]
    words = ct.shape[0]
    dist = np.empty((4, BLOCK_COLUMNS), np.int64)
    n = 0
    for jb in range(j0, j1, BLOCK_COLUMNS):
        je = min(jb + BLOCK_COLUMNS, j1)
        ie = min(i1, je - 1)
        i = i0
        while i < ie:
            k = min(4, ie - i)
            js = max(jb, i + 1)
            m = je - js
            dist[:k, :m] = 0
            for w in range(words):
                row = ct[w, js:je]
                for x in range(k):
                    a = ct[w, i + x]
                    dx = dist[x]
                    for j in range(m):
                        dx[j] += popcount64(a ^ row[j])
            hits = 0
            for x in range(k):  # row i + x pairs only with columns above it
                for j in range(m):
                    hits += (dist[x, j] <= r) & (js + j > i + x)
            if hits > 0:
                for x in range(k):
                    for j in range(m):
                        if dist[x, j] <= r and js + j > i + x:
                            if n < cap:
                                out_a[n] = i + x
                                out_b[n] = js + j
                                out_d[n] = dist[x, j]
                            n += 1
            i += k
    return n


@njit(cache=True, parallel=True)
def _tile_wave(
    ct: np.ndarray, tasks: np.ndarray, r: int,
    out_a: np.ndarray, out_b: np.ndarray, out_d: np.ndarray, counts: np.ndarray,
) -> None:  # fmt: skip
    for t in prange(tasks.shape[0]):
        i0, i1, j0, j1 = tasks[t, 0], tasks[t, 1], tasks[t, 2], tasks[t, 3]
        counts[t] = tile_pairs(ct, i0, i1, j0, j1, r, out_a[t], out_b[t], out_d[t])


def _run_tile_tasks(codes: np.ndarray, tasks: np.ndarray, r: int) -> Pairs:
    data = np.ascontiguousarray(codes.T)
    parts_a, parts_b, parts_d = [], [], []
    cap = TASK_CAP
    for w0 in range(0, len(tasks), WAVE_TASKS):
        wave = np.ascontiguousarray(tasks[w0 : w0 + WAVE_TASKS])
        k = len(wave)
        out_a = np.empty((k, cap), np.int64)
        out_b = np.empty((k, cap), np.int64)
        out_d = np.empty((k, cap), np.int32)
        counts = np.zeros(k, np.int64)
        _tile_wave(data, wave, r, out_a, out_b, out_d, counts)
        for t in range(k):
            c = int(counts[t])
            if c == 0:
                continue
            if c <= cap:
                parts_a.append(out_a[t, :c].copy())
                parts_b.append(out_b[t, :c].copy())
                parts_d.append(out_d[t, :c].copy())
            else:  # overflowed: rerun alone into a buffer of exactly its size
                a, b, d = np.empty(c, np.int64), np.empty(c, np.int64), np.empty(c, np.int32)
                tile_pairs(data, wave[t, 0], wave[t, 1], wave[t, 2], wave[t, 3], r, a, b, d)
                parts_a.append(a)
                parts_b.append(b)
                parts_d.append(d)
        if counts.max(initial=0) > cap:  # dense output (many copies): give later waves room
            cap = min(4 * cap, 1 << 20)
    return _concat(parts_a, parts_b, parts_d)


def tile_tasks(i0: int, i1: int, j0: int, j1: int, task_rows: int = 4 * BLOCK) -> np.ndarray:
    """(i0, i1, j0, j1) rectangles of at most task_rows x task_rows covering the pairs i < j of the rectangle."""
    out = []
    for a in range(i0, i1, task_rows):
        ae = min(a + task_rows, i1)
        for b in range(j0, j1, task_rows):
            be = min(b + task_rows, j1)
            if a < be - 1:  # some i < j is possible (i >= a, j <= be - 1)
                out.append((a, ae, b, be))
    return np.asarray(out, np.int64).reshape(-1, 4)


def blocked_pairs(codes: np.ndarray, r: int) -> Pairs:
    n = codes.shape[0]
    return _run_tile_tasks(codes, tile_tasks(0, n, 0, n), r)


def rectangle_join(codes: np.ndarray, r: int, i0: int, i1: int, j0: int, j1: int) -> Pairs:
    """The pairs i < j with i in [i0, i1) and j in [j0, j1): one block of a distributed self-join."""
    return _run_tile_tasks(np.ascontiguousarray(codes), tile_tasks(i0, i1, j0, j1), r)


# ---- multi-index hashing self-join -----------------------------------------------------------------------


def substring_bounds(bits: int, m: int) -> np.ndarray:
    """Start bit of each of m near-equal substrings, plus ``bits`` at the end."""
    return np.asarray([bits * t // m for t in range(m + 1)], np.int64)


@njit(cache=True)
def _substring_keys(codes: np.ndarray, start: int, length: int) -> np.ndarray:
    keys = np.empty(codes.shape[0], np.int64)
    for i in range(codes.shape[0]):
        keys[i] = np.int64(substring_of(codes[i], start, length))
    return keys


@njit(cache=True)
def _same_substring_before(x: np.ndarray, y: np.ndarray, bounds: np.ndarray, t: int) -> bool:
    for s in range(t):
        length = bounds[s + 1] - bounds[s]
        if substring_of(x, bounds[s], length) == substring_of(y, bounds[s], length):
            return True
    return False


@njit(cache=True)
def bucket_pairs(
    codes: np.ndarray, rows: np.ndarray, starts: np.ndarray, b0: int, b1: int, bounds: np.ndarray, t: int,
    r: int, out_a: np.ndarray, out_b: np.ndarray, out_d: np.ndarray,
) -> int:  # fmt: skip
    """Pairs within r among the members of each bucket b0..b1-1 of table t (bucket b holds the rows
    rows[starts[b]:starts[b+1]]), kept only where table t is the first whose substrings agree. Writes the
    first len(out_a), returns the count. (Gathering each table's rows into bucket order first measured no
    faster: the gather pays the same random reads.)"""
    cap = out_a.shape[0]
    words = codes.shape[1]
    n = 0
    for b in range(b0, b1):
        s, e = starts[b], starts[b + 1]
        for p in range(s, e - 1):
            i = rows[p]
            for q in range(p + 1, e):
                j = rows[q]
                d = 0
                for w in range(words):
                    d += popcount64(codes[i, w] ^ codes[j, w])
                if d <= r and not _same_substring_before(codes[i], codes[j], bounds, t):
                    if n < cap:
                        out_a[n] = min(i, j)
                        out_b[n] = max(i, j)
                        out_d[n] = d
                    n += 1
    return n


@njit(cache=True, parallel=True)
def _bucket_wave(
    codes: np.ndarray, rows: np.ndarray, starts: np.ndarray, tasks: np.ndarray, bounds: np.ndarray, t: int,
    r: int, out_a: np.ndarray, out_b: np.ndarray, out_d: np.ndarray, counts: np.ndarray,
) -> None:  # fmt: skip
    for k in prange(tasks.shape[0]):
        b0, b1 = tasks[k, 0], tasks[k, 1]
        counts[k] = bucket_pairs(codes, rows, starts, b0, b1, bounds, t, r, out_a[k], out_b[k], out_d[k])


@njit(cache=True)
def _buckets(keys: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows grouped by key, groups of one dropped: (rows, group starts into rows + end, pairs per group).
    A counting sort over the 2^length keys (length <= 24: at most 64 MB of counts)."""
    n = keys.shape[0]
    counts = np.zeros((1 << length) + 1, np.int64)
    for i in range(n):
        counts[keys[i] + 1] += 1
    g = 0
    total = 0
    for k in range(1, counts.shape[0]):
        if counts[k] >= 2:
            g += 1
            total += counts[k]
    # Offsets only for keys shared by two or more rows; -1 marks the rest.
    offset = np.full(1 << length, -1, np.int64)
    starts = np.empty(g + 1, np.int64)
    work = np.empty(g, np.int64)
    pos = 0
    x = 0
    for k in range(1 << length):
        c = counts[k + 1]
        if c >= 2:
            offset[k] = pos
            starts[x] = pos
            work[x] = c * (c - 1) // 2
            pos += c
            x += 1
    starts[g] = pos
    rows = np.empty(total, np.int64)
    for i in range(n):
        o = offset[keys[i]]
        if o >= 0:
            rows[o] = i
            offset[keys[i]] = o + 1
    return rows, starts, work


def _balanced_ranges(work: np.ndarray, parts: int) -> np.ndarray:
    """(b0, b1) ranges of consecutive groups with about equal summed work."""
    g = len(work)
    if g == 0:
        return np.zeros((0, 2), np.int64)
    cum = np.cumsum(work)
    cuts = np.searchsorted(cum, np.linspace(0, cum[-1], parts + 1)[1:-1], side="right")
    edges = np.unique(np.concatenate(([0], cuts, [g])))
    return np.stack([edges[:-1], edges[1:]], axis=1).astype(np.int64)


def _sorted_buckets(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """_buckets for keys too long to count-sort: numpy's sort, then the runs of equal keys."""
    order = np.argsort(keys)
    k = keys[order]
    edges = np.flatnonzero(np.diff(k)) + 1
    lo = np.concatenate(([0], edges))
    hi = np.concatenate((edges, [len(k)]))
    big = hi - lo >= 2
    lo, hi = lo[big], hi[big]
    runs = [order[a:b] for a, b in zip(lo.tolist(), hi.tolist(), strict=True)]
    rows = np.concatenate(runs) if runs else np.zeros(0, np.int64)
    sizes = hi - lo
    starts = np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)
    return rows.astype(np.int64), starts, (sizes * (sizes - 1) // 2).astype(np.int64)


def mih_tables(bits: int, r: int) -> int:
    """Tables of the MIH self-join at radius r: more than r, so that one substring must agree exactly, and
    enough that no substring is longer than 32 bits."""
    return max(r + 1, -(-bits // 32))


def mih_candidates(codes: np.ndarray, r: int) -> float:
    """Estimated candidate pairs of the MIH self-join: the first table's collisions times the tables."""
    bits = 64 * codes.shape[1]
    m = mih_tables(bits, r)
    bounds = substring_bounds(bits, m)
    length = int(bounds[1] - bounds[0])
    if length > 24:  # keys too long to count-sort; so many tables are needed only for tiny r, where MIH wins
        return 0.0
    _, _, work = _buckets(_substring_keys(codes, int(bounds[0]), length), length)
    return float(work.sum()) * m


def mih_pairs(codes: np.ndarray, r: int) -> Pairs:
    bits = 64 * codes.shape[1]
    m = mih_tables(bits, r)
    bounds = substring_bounds(bits, m)
    if m > bits:
        raise ValueError(f"the MIH self-join needs r < bits, got r={r} at {bits} bits")
    parts_a, parts_b, parts_d = [], [], []
    for t in range(m):
        length = int(bounds[t + 1] - bounds[t])
        keys = _substring_keys(codes, int(bounds[t]), length)
        if length <= 24:
            rows, starts, work = _buckets(keys, length)
        else:
            rows, starts, work = _sorted_buckets(keys)
        tasks = _balanced_ranges(work, WAVE_TASKS)
        if len(tasks) == 0:
            continue
        cap = TASK_CAP
        k = len(tasks)
        out_a = np.empty((k, cap), np.int64)
        out_b = np.empty((k, cap), np.int64)
        out_d = np.empty((k, cap), np.int32)
        counts = np.zeros(k, np.int64)
        _bucket_wave(codes, rows, starts, tasks, bounds, t, r, out_a, out_b, out_d, counts)
        for x in range(k):
            c = int(counts[x])
            if c == 0:
                continue
            if c <= cap:
                parts_a.append(out_a[x, :c].copy())
                parts_b.append(out_b[x, :c].copy())
                parts_d.append(out_d[x, :c].copy())
            else:
                a, b, d = np.empty(c, np.int64), np.empty(c, np.int64), np.empty(c, np.int32)
                bucket_pairs(codes, rows, starts, tasks[x, 0], tasks[x, 1], bounds, t, r, a, b, d)
                parts_a.append(a)
                parts_b.append(b)
                parts_d.append(d)
    return _concat(parts_a, parts_b, parts_d)


# ---- planning and the oracle -----------------------------------------------------------------------------


def choose_method(codes: np.ndarray, r: int) -> str:
    """'mih' where its measured candidate count, priced per random-row check, beats tiling all pairs."""
    n = codes.shape[0]
    bits = 64 * codes.shape[1]
    if n < 2 * BLOCK or r + 1 > bits // 4:  # tiny inputs, or substrings too short to bucket anything
        return "blocked"
    return "mih" if MIH_VERIFY_NS * mih_candidates(codes, r) < n * (n - 1) / 2 else "blocked"


def self_join(codes: np.ndarray, r: int, method: str | None = None) -> Pairs:
    """Row pairs (a, b, d) with a < b and Hamming distance d <= r, in no particular order."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    codes = np.ascontiguousarray(codes, dtype=np.uint64)
    r = int(min(r, 64 * codes.shape[1]))
    if codes.shape[0] < 2:
        return _concat([], [], [])
    if method is None:
        method = choose_method(codes, r)
    return mih_pairs(codes, r) if method == "mih" else blocked_pairs(codes, r)


@njit(cache=True)
def components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected-component label of each of n nodes given edges (a[k], b[k]): the smallest node of its component."""
    parent = np.arange(n)
    for k in range(a.shape[0]):
        x, y = a[k], b[k]
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        while parent[y] != y:
            parent[y] = parent[parent[y]]
            y = parent[y]
        if x != y:
            if x < y:
                parent[y] = x
            else:
                parent[x] = y
    for i in range(n):
        root = i
        while parent[root] != root:
            root = parent[root]
        parent[i] = root
    return parent


def _concat(parts_a: list, parts_b: list, parts_d: list) -> Pairs:
    if not parts_a:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int32)
    return np.concatenate(parts_a), np.concatenate(parts_b), np.concatenate(parts_d)
