"""The copy radius a database's stored codec configuration names (one rule for the CLI, the server and the
library: query verdicts, clusters)."""

from __future__ import annotations

from typing import Any


def copy_radius_of(config: dict[str, Any] | None) -> int | None:
    """The ``copy_radius`` of a stored codec configuration; None for a database of bare codes (no config) or
    a config without a usable radius (a non-negative int)."""
    radius = config.get("copy_radius") if isinstance(config, dict) else None
    return radius if isinstance(radius, int) and not isinstance(radius, bool) and radius >= 0 else None
