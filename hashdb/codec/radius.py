"""The copy radius a database's stored codec configuration names (one rule for the CLI, the server and the
library: query verdicts, clusters)."""

from __future__ import annotations

from typing import Any


def copy_radius_of(config: dict[str, Any] | None) -> int | None:
    """The ``copy_radius`` of a stored codec configuration; None for a database of bare codes (no config) or
    a config without a usable radius (a non-negative int)."""
    radius = config.get("copy_radius") if isinstance(config, dict) else None
    return radius if isinstance(radius, int) and not isinstance(radius, bool) and radius >= 0 else None


def decision_radius(config: dict[str, Any] | None, n_codes: int, family: str | None = None) -> int | None:
    """The largest distance that is still a ``copy`` in a database of ``n_codes`` codes made with ``config``:
    expected false matches ``fmr(d) * n_codes <= 0.01`` where the codec's null is fitted (codec v3), else the
    stored copy radius (an uncalibrated codec keeps its fixed radius); None without a config. ``family``: the
    suspect's kernel family (codec.null.null_fit), None for the fit that holds for every model."""
    radius = copy_radius_of(config)
    if config is None:
        return None
    from .null import COPY_EXPECTED_FALSE, largest_distance, null_fit

    fit = null_fit(config, family)
    bits = config.get("bits")
    if not fit.calibrated or not isinstance(bits, int):
        return radius
    return max(largest_distance(bits, fit, COPY_EXPECTED_FALSE / max(int(n_codes), 1)), 0)
