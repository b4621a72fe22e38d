"""The code distance between independently trained models: the one place the evidence takes it from.

For now the null is Binomial(bits, 1/2), the distance of independent uniform codes. The codec's fitted null
(issue 14: hashdb.codec.null) replaces ``distance_null`` when it lands; everything else calls this module.
"""

from __future__ import annotations

import math

import numpy as np


def distance_null(bits: int) -> np.ndarray:
    """P(distance = d) for d = 0..bits between the codes of two independently trained models."""
    d = np.arange(bits + 1)
    log_pmf = np.array([math.lgamma(bits + 1) - math.lgamma(k + 1) - math.lgamma(bits - k + 1) for k in d])
    return np.exp(log_pmf - bits * math.log(2.0))


def false_match_rate(distance: int, bits: int) -> float:
    """P(an independently trained model's code lands within ``distance`` bits): the null's lower tail."""
    if distance < 0:
        return 0.0
    return float(min(1.0, distance_null(bits)[: distance + 1].sum()))
