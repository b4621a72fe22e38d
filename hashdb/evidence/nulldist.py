"""The code distance between independently trained models: the one place the evidence takes it from.

It is the codec's fitted null (hashdb.codec.null: a binomial with the null library's mean fraction p and
effective degrees of freedom N, per code length), for the codec configuration a code was made with (the
default codec at ``bits`` when none is given).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _fit(bits: int, config: dict[str, Any] | None) -> Any:
    from ..codec.null import null_fit

    if config is None:
        from ..codec import ModelHasher

        config = ModelHasher(bits).config
    return null_fit(config)


def false_match_rate(distance: int, bits: int, config: dict[str, Any] | None = None) -> float:
    """P(an independently trained model's code lands within ``distance`` bits): the null's lower tail."""
    from ..codec.null import false_match_rate as rate

    return rate(distance, bits, _fit(bits, config))


def distance_null(bits: int, config: dict[str, Any] | None = None) -> np.ndarray:
    """P(distance = d) for d = 0..bits between the codes of two independently trained models (the
    differences of the fitted null's cumulative rates)."""
    fit = _fit(bits, config)
    from ..codec.null import false_match_rate as rate

    cdf = np.array([rate(d, bits, fit) for d in range(bits + 1)])
    return np.diff(np.concatenate([[0.0], cdf]))
