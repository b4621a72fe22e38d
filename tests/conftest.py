"""Shared test setup.

The helper modules beside this file (db_helpers.py: the brute-force oracle and child processes;
frontend_helpers.py: servers and CLI runs) are imported by name, ``from db_helpers import brute_radius``,
and ``bench`` (the zoo) from the repository root. pyproject.toml's ``pythonpath = [".", "tests"]`` puts
both folders on sys.path, so these imports work whatever pytest's import mode or starting directory; the
``repo`` fixture gives the checkout's root to tests that start subprocesses.

Markers (pyproject.toml): ``slow`` marks tests that train CNNs. The default run and CI run them; ``pytest
-m "not slow"`` leaves them out for a quick loop.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo() -> Path:
    """The repository root (the checkout under test), for subprocesses' cwd and PYTHONPATH."""
    return REPO
