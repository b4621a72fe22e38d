"""Segment features -> bits.

Three binarizations, all deterministic and free of any per-architecture reference data:

- 'median': feature > its median over the model's segments (balanced bits, as in the paper family).
- 'sign': feature > 0; only meaningful for odd statistics (skewness, mean, sign balance), whose expectation
  is zero under any sign-symmetric weight distribution, so the bit is a fair coin for an unrelated model.
- 'pairs': feature of segment s > the same feature of segment t for fixed pseudo-random pairs (s, t) of
  nearby segments. Structure that every model of an architecture shares (the kurtosis trend along the
  norm ranking) cancels in the difference, so two seeds of one architecture decorrelate.
"""

from __future__ import annotations

import numpy as np

ENCODINGS = ("median", "sign", "pairs")
PAIR_SEED = 0x5EED_C0DE  # fixed forever: changing it changes every code (bump the codec version)


def pair_indices(n_segments: int, n_pairs: int, span: int) -> tuple[np.ndarray, np.ndarray]:
    """``n_pairs`` fixed pairs (s, t), s != t, |s - t| <= span, from a seeded generator (same on every machine)."""
    rng = np.random.Generator(np.random.PCG64(PAIR_SEED + 7919 * n_segments + span))
    s = rng.integers(0, n_segments, size=n_pairs)
    off = rng.integers(1, span + 1, size=n_pairs) * np.where(rng.random(n_pairs) < 0.5, -1, 1)
    t = s + off
    t = np.where((t < 0) | (t >= n_segments), s - off, t)  # reflect at the ends
    return s, np.clip(t, 0, n_segments - 1)


def encode(features: np.ndarray, bits: int, encoding: str, pair_span: int = 4) -> np.ndarray:
    """Binarize (n_segments, n_features) statistics into a bool vector of length ``bits``.

    For 'median' and 'sign' the code is the features in segment-major order (segment 0's features first);
    it needs n_segments * n_features >= bits. For 'pairs' each feature contributes bits/n_features
    comparisons (rounded up, then truncated to ``bits``).
    """
    n_seg, n_feat = features.shape
    if encoding == "median":
        out = features > np.median(features, axis=0)[None, :]
        flat = out.reshape(-1)
    elif encoding == "sign":
        flat = (features > 0).reshape(-1)
    elif encoding == "pairs":
        per = -(-bits // n_feat)
        s, t = pair_indices(n_seg, per, max(1, min(pair_span, n_seg - 1)))
        flat = (features[s] > features[t]).reshape(-1)
    else:
        raise ValueError(f"unknown encoding {encoding!r}; known: {', '.join(ENCODINGS)}")
    if flat.size < bits:
        raise ValueError(f"{flat.size} feature bits for a {bits}-bit code")
    return flat[:bits]
