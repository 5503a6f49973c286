#!/usr/bin/env bash
# The main job on the embedded base model (assets/emoji-sd, pretrained on Twemoji and OpenMoji): 4 simulated
# sites holding 100 Noto emoji each (data/noto/site-k). Runs DPAgg-TI at epsilon = 1 (outputs/demo), the same
# job without privacy (outputs/demo-nonprivate), scores base, DP and non-private on the 216 held-out Noto
# emoji of data/noto/held-out and prints how much of the non-private improvement the DP release keeps, then
# composes base | DP | non-private samples for the same prompts and seeds, with those fractions below. The
# comparison goes to outputs/demo-comparison/ (kept.json, comparison.png), not into the DP run's folder: it
# holds figures of the non-private run, which carry no guarantee.
# Extra arguments are run-config overrides for both runs, e.g. bash scripts/demo.sh "ti-steps=100".
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_TMPDIR=${RAY_TMPDIR:-/tmp/privadapt-ray-$(id -u)}
mkdir -p "$RAY_TMPDIR"
# the demo starts afresh each time (a run resumes from its output folder's checkpoint.pt otherwise)
rm -f outputs/demo/checkpoint.pt outputs/demo-nonprivate/checkpoint.pt outputs/demo/comparison.png outputs/demo/comparison.json
# The placeholder goes in the paper's slot, "an emoji of a cat in the style of <S*>", initialised from "flat"
# (the word this base draws Twemoji with; it draws OpenMoji for "outline"): see README "What the demo does".
# N = 400 declared images, q = 1 and C = 0.5 come from the sweep in README "Sizing the main job"
# (python -m evaluation.dpagg_sweep): the noise on the mean is z*C*sqrt(d)/(q*N), and at epsilon = 1 the
# q = 1 release is the closest to the non-private one for a given N; with every per-image move > 0.5, C only
# scales signal and noise together, and C = 0.5 draws well without privacy (C = 1 broke the pictures).
demo="model-path=assets/emoji-sd resolution=32 data-path=data/noto dataset-size=400 sampling-rate=1.0"
demo="$demo clip-norm=0.5 initializer-token=flat ti-steps=50 learning-rate=0.01"
demo="$demo sample-prompts='an emoji of a cat|an emoji of a dog|an emoji of a red heart|an emoji of a sun|an emoji of a car|an emoji of a deciduous tree|an emoji of a pizza|an emoji of a rocket'"
.venv/bin/python -m simulations.run --num-sites 4 --run-config "$demo output-dir=outputs/demo ${1:-}"
.venv/bin/python -m simulations.run --num-sites 4 --run-config "$demo target-epsilon=inf output-dir=outputs/demo-nonprivate ${1:-}"
OMP_NUM_THREADS=2 .venv/bin/python -m evaluation.kept outputs/demo outputs/demo-nonprivate --held-out data/noto/held-out \
    --out outputs/demo-comparison/kept.json
.venv/bin/python -m evaluation.grid outputs/demo outputs/demo-nonprivate --out outputs/demo-comparison/comparison.png \
    --kept outputs/demo-comparison/kept.json
