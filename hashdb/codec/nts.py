"""Normal test statistics (NTS) of weight segments, vectorized over segments, float64, numpy only.

The z-scores follow D'Agostino (1970) for skewness, Anscombe & Glynn (1983) for kurtosis, and their sum of
squares is D'Agostino-Pearson's K^2; these are the formulas scipy.stats.skewtest / kurtosistest / normaltest
implement (the tests check agreement). Every statistic here is invariant to a positive scale of the segment,
and the z-transforms make segments of different sizes comparable.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

FEATURES = ("skew", "kurt", "k2", "mean", "sign")


def segment_bounds(n_values: int, n_segments: int) -> np.ndarray:
    """Start offsets of ``n_segments`` contiguous, nearly equal segments of ``n_values`` values (plus the end)."""
    return np.floor(np.arange(n_segments + 1, dtype=np.float64) * n_values / n_segments + 1e-9).astype(np.int64)


def _moments(values: np.ndarray, bounds: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per-segment n, mean, and central moments m2, m3, m4 (biased, as in the normality tests)."""
    n = np.diff(bounds).astype(np.float64)
    starts = bounds[:-1]
    mean = np.add.reduceat(values, starts) / n
    d = values - np.repeat(mean, np.diff(bounds))
    d2 = d * d
    m2 = np.add.reduceat(d2, starts) / n
    m3 = np.add.reduceat(d2 * d, starts) / n
    m4 = np.add.reduceat(d2 * d2, starts) / n
    return n, mean, m2, m3, m4


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


def segment_statistics(values: np.ndarray, n_segments: int, features: Sequence[str]) -> np.ndarray:
    """Cut ``values`` (canonical order) into ``n_segments`` and return (n_segments, len(features)) statistics.

    Features: 'skew' (skewtest z), 'kurt' (kurtosistest z), 'k2' (normaltest K^2), 'mean' (one-sample t of
    the mean), 'sign' ((#positive - #negative) / sqrt(n)).
    """
    bounds = segment_bounds(len(values), n_segments)
    if np.diff(bounds).min() < 8:
        raise ValueError(f"{len(values)} values are too few for {n_segments} segments of at least 8")
    n, mean, m2, m3, m4 = _moments(values, bounds)
    cols: list[np.ndarray] = []
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
            elif name == "sign":
                s = np.add.reduceat(np.sign(values), bounds[:-1])
                cache[name] = s / np.sqrt(n)
            else:
                raise ValueError(f"unknown feature {name!r}; known: {', '.join(FEATURES)}")
        return cache[name]

    for f in features:
        cols.append(get(f))
    return np.stack(cols, axis=1)
