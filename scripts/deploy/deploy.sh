#!/usr/bin/env bash
# privadapt across real Flower processes (walkthrough: docs/DEPLOYMENT.md). Relative paths are
# taken from the current folder.
#   bash scripts/deploy/deploy.sh certs DIR --host superlink.example.org [--sites site-0 site-1]
#   bash scripts/deploy/deploy.sh node-key DIR SITE
#   bash scripts/deploy/deploy.sh superlink DIR [--port 9092] [--public-name superlink.example.org]
#   bash scripts/deploy/deploy.sh site --name SITE --data DIR --superlink HOST:PORT --ca ca.crt --key KEY \
#        --partition-id K --num-partitions N
#   bash scripts/deploy/deploy.sh local DIR [--sites 2] [--run-config "adapter='lora' rounds=2"]
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
bash "$root/scripts/setup.sh" >&2
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$root/.venv/bin/python" -m deploy "$@"
