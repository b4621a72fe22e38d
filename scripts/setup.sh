#!/usr/bin/env bash
# Create .venv and install hashdb with its test extra (torch, the format readers, pytest, ruff, mypy) and any
# extras named in HASHDB_EXTRAS (e.g. bench). Idempotent; safe on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
# Debian's chromium renders the HTML reports in tests/test_report.py (a headless browser test); present is fine.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; fi
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
PY=${PYTHON:-python3}
# No wheel cache: the venv is ~2 GB already, and CI machines have run out of disk with a second copy in ~/.cache.
export PIP_NO_CACHE_DIR=1
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# The CPU build of torch first (the test extra needs torch; a looser spec can pull a multi-GB CUDA build).
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test${HASHDB_EXTRAS:+,$HASHDB_EXTRAS}]"
