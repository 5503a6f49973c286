#!/usr/bin/env bash
# The main job on the embedded base model (assets/emoji-sd, pretrained on Twemoji and OpenMoji): 4 simulated
# sites holding Noto emoji (data/demo). Runs DPAgg-TI at epsilon = 1 (outputs/demo), the same
# job without privacy (outputs/demo-nonprivate), and composes base | DP | non-private samples
# for the same prompts and seeds into outputs/demo/comparison.png.
# Extra arguments are run-config overrides for both runs, e.g. bash scripts/demo.sh "ti-steps=50".
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_TMPDIR=${RAY_TMPDIR:-/tmp/privadapt-ray-$(id -u)}
mkdir -p "$RAY_TMPDIR"
# the demo starts afresh each time (a run resumes from its output folder's checkpoint.pt otherwise)
rm -f outputs/demo/checkpoint.pt outputs/demo-nonprivate/checkpoint.pt
# The placeholder goes in the paper's slot, "an emoji of a cat in the style of <S*>", initialised from "flat"
# (the word this base draws Twemoji with; it draws OpenMoji for "outline"): see README "What the demo does".
# C = 0.5: per-image embeddings move by about 1 from "flat" (norm 0.58), so C = 0.1 clipped away nearly all of the
# signal; C = 1 let the non-private release break the pictures (README "What the demo does").
demo="model-path=assets/emoji-sd resolution=32 clip-norm=0.5 initializer-token=flat"
demo="$demo sample-prompts='an emoji of a cat|an emoji of a dog|an emoji of a red heart|an emoji of a sun|an emoji of a car|an emoji of a deciduous tree|an emoji of a pizza|an emoji of a rocket'"
.venv/bin/python -m simulations.run --num-sites 4 --run-config "$demo output-dir=outputs/demo ${1:-}"
.venv/bin/python -m simulations.run --num-sites 4 --run-config "$demo target-epsilon=inf output-dir=outputs/demo-nonprivate ${1:-}"
.venv/bin/python -m evaluation.grid outputs/demo outputs/demo-nonprivate --out outputs/demo/comparison.png
