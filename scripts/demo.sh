#!/usr/bin/env bash
# The main job on the embedded default: 4 simulated sites, DPAgg-TI at epsilon = 1.
# Extra arguments go to simulations.run, e.g. --run-config "target-epsilon=inf output-dir=outputs/nonprivate".
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_TMPDIR=${RAY_TMPDIR:-/tmp/privadapt-ray-$(id -u)}
mkdir -p "$RAY_TMPDIR"
exec .venv/bin/python -m simulations.run --num-sites 4 --run-config "output-dir=outputs/demo" "$@"
