#!/usr/bin/env bash
# Install (or reuse) .venv and run the test suite. CI runs exactly this (.ci/run).
# The tests run on one pytest-xdist worker per CPU core this process may use (at most 4; MCAD_TEST_WORKERS=N
# overrides, 1 = serial). Tests of one xdist_group (e.g. the torchrun ones) stay on one worker (--dist loadgroup).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Tiny test models gain nothing from several threads; subprocesses the tests start inherit this.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
workers="${MCAD_TEST_WORKERS:-$(.venv/bin/python -c 'import os; print(min(4, len(os.sched_getaffinity(0))))')}"
if [ "$workers" -gt 1 ]; then
  exec .venv/bin/python -m pytest -q -n "$workers" --dist loadgroup --no-loadscope-reorder "$@"
fi
exec .venv/bin/python -m pytest -q "$@"
