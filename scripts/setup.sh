#!/usr/bin/env bash
# Create or reuse .venv at the repository root and install mcad-cache with its test and demo extras.
# Reuses the venv when pyproject.toml has not changed since the last install (stamp file).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.mcad-install-stamp
want=$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # torch first, pinned to the build that has an importable torchvision beside it on these machines
  # (docs/install.md); then the project, so pip does not pick another torch for us.
  .venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1"
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test,demo]"
  echo "$want" > "$stamp"
fi
