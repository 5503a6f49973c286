#!/usr/bin/env bash
# Set up (if needed) and run the test suite. Extra arguments go to pytest (e.g. -m slow).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_TMPDIR=${RAY_TMPDIR:-/tmp/privadapt-ray-$(id -u)}
export HF_HUB_OFFLINE=1
mkdir -p "$RAY_TMPDIR"
exec .venv/bin/python -m pytest "$@"
