"""Normal test statistics (NTS) of projected weight multisets, vectorized, float64, numpy only.

The z-scores follow D'Agostino (1970) for skewness, Anscombe & Glynn (1983) for kurtosis, and their sum of
squares is D'Agostino-Pearson's K^2; these are the formulas scipy.stats.skewtest / kurtosistest / normaltest
implement (the tests check agreement). Every statistic here is invariant to a positive scale of the segment,
and the z-transforms make segments of different sizes comparable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

FEATURES = ("skew", "kurt", "k2", "mean")


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


def directions(k: int, n: int) -> np.ndarray:
    """``n`` fixed pseudo-random unit directions in R^k (the same on every machine: PCG64, seeded by k)."""
    rng = np.random.Generator(np.random.PCG64([DIRECTION_SEED, k]))
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


def pool_moments(v: np.ndarray) -> PoolMoments:
    n, k = v.shape
    mean = v.mean(axis=0)
    p = k * (k + 1) // 2
    c2 = np.zeros((k, k))
    m3 = np.zeros((p, k))
    m4 = np.zeros((p, p))
    for s in range(0, n, _CHUNK):
        c = v[s : s + _CHUNK] - mean
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
    m2 = np.einsum("jk,kl,jl->j", r, mom.c2, r)
    m3 = np.einsum("jp,pk,jk->j", rq, mom.m3, r)
    m4 = np.einsum("jp,pq,jq->j", rq, mom.m4, rq)
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


def projection_statistics(
    pools: Sequence[np.ndarray], n_directions: int, features: Sequence[str], whiten: bool = False
) -> np.ndarray:
    """NTS of the kernel pools projected on ``n_directions`` fixed directions -> (n_directions, len(features)).

    Each pool (n kernels x k values) is projected on directions in R^k (after whitening the pool, if asked);
    the z-scores of the pools are combined per direction with Stouffer weights sqrt(n), so the layout of
    the result never depends on how many pools (kernel sizes) a model has. Pools of 1x1 kernels have one
    direction only (every projection is the same up to sign) and are used only when nothing else exists.
    """
    usable = [v for v in pools if v.shape[1] > 1 and v.shape[0] >= MIN_SAMPLES] or [
        v for v in pools if v.shape[0] >= MIN_SAMPLES
    ]
    if not usable:
        raise ValueError(f"fewer than {MIN_SAMPLES} non-zero kernels")
    total = np.zeros((n_directions, len(features)))
    weight = 0.0
    for v in usable:
        mom = pool_moments(v)
        r = directions(v.shape[1], n_directions)
        if whiten:
            r = whitened_directions(mom, r)
        w = np.sqrt(v.shape[0])
        total += w * direction_features(mom, r, features)
        weight += w * w
    return total / np.sqrt(weight)
