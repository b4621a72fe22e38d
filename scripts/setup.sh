#!/usr/bin/env bash
# Create .venv and install hashdb with its test extra (torch, the format readers, pytest, ruff, mypy) and any
# extras named in HASHDB_EXTRAS (e.g. bench). Idempotent; safe on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# The CPU build of torch first (the test extra needs torch; a looser spec can pull a multi-GB CUDA build).
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test${HASHDB_EXTRAS:+,$HASHDB_EXTRAS}]"
