#!/usr/bin/env bash
# `flwr run .` on a local simulation SuperLink, with its own FLWR_HOME and ports, and every
# Flower process it started stopped afterwards (also on failure or Ctrl-C).
#   bash scripts/flwr_local.sh [NUM_SITES] [extra --run-config overrides]
# The model, the data and the outputs are passed as absolute paths: the FAB carries code only.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
sites=${1:-4}
extra=${2:-}
export FLWR_HOME=${FLWR_HOME:-$PWD/.cache/flwr-home}
export RAY_TMPDIR=${RAY_TMPDIR:-/tmp/privadapt-ray-$(id -u)}
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=${FLWR_LOCAL_SUPERLINK_HTTP_API_PORT:-39291}
export FLWR_LOCAL_CONTROL_API_PORT=${FLWR_LOCAL_CONTROL_API_PORT:-39293}
mkdir -p "$FLWR_HOME" "$RAY_TMPDIR"
cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "local"

[superlink.local]
address = ":local:"
TOML
model=$(.venv/bin/python -c "from common.tiny_sd import tiny_sd_dir; print(tiny_sd_dir())")
stop_flower() {
  pkill -f "flower-superlink.*--control-api-address 127.0.0.1:$FLWR_LOCAL_CONTROL_API_PORT" 2>/dev/null || true
  pkill -f "flower-superexec.*--runtime-api-address 127.0.0.1:$FLWR_LOCAL_SUPERLINK_HTTP_API_PORT" 2>/dev/null || true
}
trap stop_flower EXIT
.venv/bin/flwr run . local --stream \
  --federation-config "num-supernodes=$sites client-resources-num-cpus=1" \
  --run-config "model-path='$model' data-path='$PWD/data/demo' output-dir='$PWD/outputs/flwr' $extra"
