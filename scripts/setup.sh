#!/usr/bin/env bash
# Create .venv and install the pinned dependencies (idempotent: a second run only checks).
# Every pip call passes constraints.txt: an unpinned resolve pulls a multi-GB CUDA torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
stamp=.venv/.privadapt-installed
want=$(cat requirements.txt requirements-dev.txt constraints.txt | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip -c constraints.txt 2>&1 | grep -v "is ignored" || true
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -r requirements.txt -r requirements-dev.txt 2>&1 \
  | grep -v "is ignored: it is neither a file nor a directory" || true
.venv/bin/python -c "import torch, flwr, diffusers, transformers, peft, opacus; print('privadapt setup: torch', torch.__version__, '| flwr', flwr.__version__, '| diffusers', diffusers.__version__)"
echo "$want" > "$stamp"
