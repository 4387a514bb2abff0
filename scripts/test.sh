#!/usr/bin/env bash
# Install (or reuse) .venv and run the test suite. CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Tiny test models gain nothing from several threads; subprocesses the tests start inherit this.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec .venv/bin/python -m pytest -q "$@"
