"""Normal test statistics (NTS) of kernel pools projected on fixed directions, vectorized, float64, numpy only.

Each pool (the multiset of balanced kernels of one kernel shape, select.py) is projected on J fixed
pseudo-random unit directions; the first four moments of every projection follow from the pool's moment
tensors (``pool_moments``: a few BLAS products, so any number of directions is cheap). The z-scores follow
D'Agostino (1970) for skewness, Anscombe & Glynn (1983) for kurtosis, and their sum of squares is
D'Agostino-Pearson's K^2; these are the formulas scipy.stats.skewtest / kurtosistest / normaltest implement
(the tests check agreement). Every statistic is invariant to a positive scale of the projections, and the
z-transforms make pools of different sizes comparable. ``projection_statistics`` contrasts each direction
with its rotated/reflected twin and combines the pools per direction with Stouffer weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .select import Pool

FEATURES = ("skew", "kurt", "k2", "mean")
CONTRASTS = ("dihedral", "none")


def skew_z(n: np.ndarray, m2: np.ndarray, m3: np.ndarray) -> np.ndarray:
    """D'Agostino's skewness test z-score (scipy.stats.skewtest); needs n >= 8."""
    safe = np.where(m2 > 0, m2, 1.0)
    b2 = np.where(m2 > 0, m3 / safe**1.5, 0.0)
    y = b2 * np.sqrt(((n + 1) * (n + 3)) / (6.0 * (n - 2)))
    beta2 = 3.0 * (n * n + 27 * n - 70) * (n + 1) * (n + 3) / ((n - 2.0) * (n + 5) * (n + 7) * (n + 9))
    w2 = -1.0 + np.sqrt(2.0 * (beta2 - 1.0))
    delta = 1.0 / np.sqrt(0.5 * np.log(w2))
    alpha = np.sqrt(2.0 / (w2 - 1.0))
    return delta * np.arcsinh(y / alpha)


def kurt_z(n: np.ndarray, m2: np.ndarray, m4: np.ndarray) -> np.ndarray:
    """Anscombe-Glynn kurtosis test z-score (scipy.stats.kurtosistest); needs n >= 5."""
    safe = np.where(m2 > 0, m2, 1.0)
    b2 = np.where(m2 > 0, m4 / (safe * safe), 3.0)
    e = 3.0 * (n - 1) / (n + 1)
    varb2 = 24.0 * n * (n - 2) * (n - 3) / ((n + 1) * (n + 1.0) * (n + 3) * (n + 5))
    x = (b2 - e) / np.sqrt(varb2)
    sqrtbeta1 = (
        6.0 * (n * n - 5 * n + 2) / ((n + 7) * (n + 9)) * np.sqrt((6.0 * (n + 3) * (n + 5)) / (n * (n - 2) * (n - 3)))
    )
    a = 6.0 + 8.0 / sqrtbeta1 * (2.0 / sqrtbeta1 + np.sqrt(1 + 4.0 / (sqrtbeta1**2)))
    term1 = 1 - 2 / (9.0 * a)
    denom = 1 + x * np.sqrt(2 / (a - 4.0))
    # scipy's sign(denom) * |.|^(1/3) is the real cube root; denom == 0 (measure zero) would divide by zero.
    denom = np.where(denom == 0.0, 1e-300, denom)
    term2 = np.cbrt((1 - 2.0 / a) / denom)
    return (term1 - term2) / np.sqrt(2 / (9.0 * a))


DIRECTION_SEED = 0xC0DEC  # fixed forever: changing it changes every code (bump the codec version)
MIN_SAMPLES = 8  # D'Agostino's skewness test needs n >= 8
_CHUNK = 1 << 16  # rows per block when accumulating moments: bounds memory at a few MB per block


def directions(k: int, n: int, salt: int = 0) -> np.ndarray:
    """``n`` fixed pseudo-random unit directions in R^k (the same on every machine: PCG64, seeded by k)."""
    rng = np.random.Generator(np.random.PCG64([DIRECTION_SEED, k] + ([salt] if salt else [])))
    r = rng.standard_normal((n, k))
    return r / np.linalg.norm(r, axis=1, keepdims=True)


@dataclass(frozen=True)
class PoolMoments:
    """Moments of a pool of n kernels in R^k, enough for the first four moments along any direction.

    ``mean`` (k,), ``c2`` (k, k) = E[c c^T], ``m3`` (p, k) = E[c_a c_b c_d] and ``m4`` (p, p) =
    E[c_a c_b c_d c_e] over the p = k(k+1)/2 pairs a <= b, with c = v - mean. Computing these once (two
    matrix products, BLAS) makes any number of directions free, which is what keeps a 25M-parameter model
    fast: the projections themselves would be n x directions values.
    """

    n: int
    mean: np.ndarray
    c2: np.ndarray
    m3: np.ndarray
    m4: np.ndarray


def pool_moments(blocks: Sequence[np.ndarray]) -> PoolMoments:
    """Moments of the rows of several (n_i, k) blocks taken together (float64 accumulation)."""
    k = blocks[0].shape[1]
    n = sum(len(b) for b in blocks)
    mean = sum(b.sum(axis=0, dtype=np.float64) for b in blocks) / n
    p = k * (k + 1) // 2
    c2 = np.zeros((k, k))
    m3 = np.zeros((p, k))
    m4 = np.zeros((p, p))
    for blk, s in ((b, s) for b in blocks for s in range(0, len(b), _CHUNK)):
        c = blk[s : s + _CHUNK] - mean
        q = np.empty((len(c), p))
        off = 0
        for a in range(
            k
        ):  # q[:, (a, b)] = c_a * c_b for b >= a, in triu_indices order (a fancy-index gather is slower)
            np.multiply(c[:, a : a + 1], c[:, a:], out=q[:, off : off + k - a])
            off += k - a
        c2 += c.T @ c
        m3 += q.T @ c
        m4 += q.T @ q
    return PoolMoments(n, mean, c2 / n, m3 / n, m4 / n)


def directional_moments(mom: PoolMoments, r: np.ndarray) -> tuple[np.ndarray, ...]:
    """Mean and central moments m2, m3, m4 of the pool projected on each row of ``r`` (J, k)."""
    k = r.shape[1]
    ia, ib = np.triu_indices(k)
    w = np.where(ia == ib, 1.0, 2.0)  # sum over all (a, b) = sum over a <= b with off-diagonals twice
    rq = r[:, ia] * r[:, ib] * w
    mean = r @ mom.mean
    m2 = ((r @ mom.c2) * r).sum(axis=1)
    m3 = ((rq @ mom.m3) * r).sum(axis=1)
    m4 = ((rq @ mom.m4) * rq).sum(axis=1)
    return mean, m2, m3, m4


def direction_features(mom: PoolMoments, r: np.ndarray, features: Sequence[str]) -> np.ndarray:
    """Normal test statistics of the pool projected on each row of ``r`` -> (J, len(features))."""
    mean, m2, m3, m4 = directional_moments(mom, r)
    n = np.full(len(r), float(mom.n))
    cache: dict[str, np.ndarray] = {}

    def get(name: str) -> np.ndarray:
        if name not in cache:
            if name == "skew":
                cache[name] = skew_z(n, m2, m3)
            elif name == "kurt":
                cache[name] = kurt_z(n, m2, m4)
            elif name == "k2":
                cache[name] = get("skew") ** 2 + get("kurt") ** 2
            elif name == "mean":
                cache[name] = mean / np.sqrt(np.where(m2 > 0, m2, 1.0) / (n - 1))
            else:
                raise ValueError(f"unknown feature {name!r}; known: {', '.join(FEATURES)}")
        return cache[name]

    return np.stack([get(f) for f in features], axis=1)


def whitened_directions(mom: PoolMoments, r: np.ndarray) -> np.ndarray:
    """Directions r C^{-1/2}: projecting on them is projecting the whitened pool on r."""
    e, u = np.linalg.eigh(mom.c2)
    e = np.maximum(e, 1e-12 * max(e.max(), 1e-300))
    return r @ (u / np.sqrt(e)) @ u.T


def kernel_symmetries(kshape: Sequence[int]) -> list[np.ndarray]:
    """Index maps of the non-identity symmetries of a kernel grid: the 7 rotations/reflections of a square,
    the 3 flips of a rectangle, the reversal of a 1-D kernel (and the axis flips of a 3-D one)."""
    k = int(np.prod(kshape)) if len(kshape) else 1
    idx = np.arange(k).reshape(tuple(kshape) if len(kshape) else (1,))
    if idx.ndim == 2 and idx.shape[0] == idx.shape[1] > 1:
        maps = [np.rot90(idx, t) for t in (1, 2, 3)] + [idx[::-1], idx[:, ::-1], idx.T, np.rot90(idx, 2).T]
    else:
        maps = []
        for mask in range(1, 1 << idx.ndim):
            sl = tuple(slice(None, None, -1) if (mask >> a) & 1 else slice(None) for a in range(idx.ndim))
            if all(idx.shape[a] > 1 for a in range(idx.ndim) if (mask >> a) & 1):
                maps.append(idx[sl])
    return [m.ravel() for m in maps if not np.array_equal(m.ravel(), np.arange(k))]


LIFT_BELOW = 9  # kernels with fewer values (conv1d k=3, 5, 7; 2x2) are lifted, see lift_kernels


def _sorted_pair(a: int, b: int) -> tuple[int, int]:
    return (a, b) if a <= b else (b, a)


def lift_kernels(blocks: Sequence[np.ndarray], maps: list[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Append the pairwise products v_a v_b (a <= b) to each kernel, and extend the symmetry maps to them.

    A 3-value kernel's projections live in R^3, whose third and fourth moment tensors have 10 + 15 degrees
    of freedom: a code of hundreds of bits from them is mostly copies of a few bits, and unrelated conv1d
    models collided (bench/codec_sweep.py). The lifted vector's moments reach the 8th order of the kernel
    (165 monomials for k = 3). The balanced layers have a fixed scale, so mixing degrees is well defined.
    """
    k = blocks[0].shape[1]
    ia, ib = np.triu_indices(k)
    pair_index = {(int(a), int(b)): j for j, (a, b) in enumerate(zip(ia, ib, strict=True))}
    lifted = [np.concatenate([v, v[:, ia] * v[:, ib]], axis=1) for v in blocks]
    new_maps = []
    for m in maps:
        # the symmetry moves value a to position m[a]; the product (a, b) moves to (m[a], m[b]), sorted
        moved = [pair_index[_sorted_pair(int(m[a]), int(m[b]))] for a, b in zip(ia, ib, strict=True)]
        new_maps.append(np.concatenate([m, k + np.array(moved, dtype=np.int64)]))
    return lifted, new_maps


def contrast_directions(
    r: np.ndarray, kshape: Sequence[int], maps: list[np.ndarray] | None = None
) -> np.ndarray | None:
    """Direction j moved by symmetry j mod (number of symmetries): projecting a kernel on it is projecting
    the flipped/rotated kernel on r_j. None when the kernel shape has no symmetry (1x1)."""
    maps = kernel_symmetries(kshape) if maps is None else maps
    if not maps:
        return None
    out = np.empty_like(r)
    for j in range(len(r)):
        out[j, maps[j % len(maps)]] = r[j]
    return out


def pool_direction_features(
    kshape: Sequence[int], blocks: Sequence[np.ndarray], n_directions: int, features: Sequence[str], whiten: bool
) -> tuple[float, np.ndarray, np.ndarray | None]:
    """(Stouffer weight sqrt(n), statistics along r_j, statistics along the symmetry-moved r_j or None)."""
    maps = kernel_symmetries(kshape)
    salt = 0
    if 1 < blocks[0].shape[1] < LIFT_BELOW:
        blocks, maps = lift_kernels(blocks, maps)
        salt = 1
    mom = pool_moments(blocks)
    r = directions(blocks[0].shape[1], n_directions, salt)
    rg = contrast_directions(r, kshape, maps)
    # A lifted pool is whitened: its squared coordinates share a large common mean that would otherwise make
    # every random direction see the same "energy" component (conv1d distinct-pair false positives 163 -> 25).
    if whiten or salt:
        r = whitened_directions(mom, r)
        rg = None if rg is None else whitened_directions(mom, rg)
    base = direction_features(mom, r, features)
    moved = None if rg is None else direction_features(mom, rg, features)
    return float(np.sqrt(mom.n)), base, moved


def usable_pools(pools: Sequence[Pool]) -> list[Pool]:
    """The pools that get directions: those of at least MIN_SAMPLES kernels with more than one value, or,
    when a model has none, its 1x1 pools (one direction's worth of information). ValueError if nothing is left."""
    sizes = [(sum(len(b) for b in blocks), blocks[0].shape[1]) for _, blocks in pools]
    usable = [p for p, (n, k) in zip(pools, sizes, strict=True) if k > 1 and n >= MIN_SAMPLES] or [
        p for p, (n, _) in zip(pools, sizes, strict=True) if n >= MIN_SAMPLES
    ]
    if not usable:
        raise ValueError(f"fewer than {MIN_SAMPLES} non-zero kernels")
    return usable


def projection_statistics(
    pools: Sequence[Pool],
    n_directions: int,
    features: Sequence[str],
    whiten: bool = False,
    contrast: str = "dihedral",
) -> np.ndarray:
    """NTS of the kernel pools projected on ``n_directions`` fixed directions -> (n_directions, len(features)).

    Each pool (blocks of kernels, n kernels x k values in all) is projected on directions in R^k (after
    whitening the pool, if asked); the z-scores of the pools are combined per direction with Stouffer
    weights sqrt(n), so the layout of the result never depends on how many pools (kernel sizes) a model
    has. Pools of 1x1 kernels have one direction only (every projection is the same up to sign) and are
    used only when nothing else exists.

    ``contrast='dihedral'``: each statistic is the difference between direction r_j and r_j moved by a
    symmetry of the kernel grid (rotation/reflection). Structure that every model of an architecture shares
    (centre-heavy kernels, smoothness) is symmetric and cancels, so the sign of the difference is a fair coin
    for an unrelated model; what is left is the model's own asymmetry.
    """
    if contrast not in CONTRASTS:
        raise ValueError(f"unknown contrast {contrast!r}")
    usable = usable_pools(pools)
    total = np.zeros((n_directions, len(features)))
    weight = 0.0
    for kshape, blocks in usable:
        w, f, moved = pool_direction_features(kshape, blocks, n_directions, features, whiten)
        if contrast == "dihedral" and moved is not None:
            f = f - moved
        total += w * f
        weight += w * w
    return total / np.sqrt(weight)
