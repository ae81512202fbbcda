#!/usr/bin/env bash
# Install aefrl with its dev tools, then lint and run the whole test suite (CPU only).
# This is the README's test command and what CI runs (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
# Small ops spin-wait on idle cores by default; with 2 cores that makes torch ~100x slower.
export OMP_WAIT_POLICY=PASSIVE
python -m pip install -q -e ".[dev]"
python -m ruff check .
python -m ruff format --check .
python -m pytest -q "$@"
