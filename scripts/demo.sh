#!/usr/bin/env bash
# The main job end to end on real data (Open Clip Art Library from Debian packages), no network beyond the
# package registries. Everything it writes goes under .work/ (ignored by git). A second run reuses finished steps.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/mcad-cache demo run "$@"
