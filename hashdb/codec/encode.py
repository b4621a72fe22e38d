"""Projection features -> bits, deterministic and free of any per-architecture reference data.

- 'sign' (ModelHasher's default): every feature against 0. With the dihedral contrast (nts.py) every
  feature is a difference stat(r) - stat(g r) whose expectation is zero for an unrelated model, so each
  bit is a fair coin.
- 'odd_sign': odd statistics (skewness, mean) against 0, even ones (kurtosis, K^2), which have no natural
  zero without the contrast, against their median over the model's directions (balanced bits).
- 'median': every feature against its median over directions.

Bits are feature-major: all directions' first feature, then all directions' second feature, ...
"""

from __future__ import annotations

import numpy as np

ENCODINGS = ("odd_sign", "median", "sign")
ODD_FEATURES = ("skew", "mean")


def encode(features: np.ndarray, bits: int, encoding: str, names: tuple[str, ...]) -> np.ndarray:
    """Binarize (n_directions, n_features) statistics named ``names`` into a bool vector of length ``bits``."""
    if encoding == "odd_sign":
        ref = np.array([0.0 if f in ODD_FEATURES else float(np.median(features[:, j])) for j, f in enumerate(names)])
    elif encoding == "median":
        ref = np.median(features, axis=0)
    elif encoding == "sign":
        ref = np.zeros(features.shape[1])
    else:
        raise ValueError(f"unknown encoding {encoding!r}; known: {', '.join(ENCODINGS)}")
    flat = (features > ref[None, :]).T.reshape(-1)
    if flat.size < bits:
        raise ValueError(f"{flat.size} feature bits for a {bits}-bit code")
    return flat[:bits]
