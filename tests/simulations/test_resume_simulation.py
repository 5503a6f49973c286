"""Resume through Flower's simulation engine: a LoRA run stopped after 2 of 3 rounds and
started again on the same output-dir ends with the adapter and ledger of an uninterrupted run."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from server.checkpoint import CHECKPOINT_FILE
from tests.simulation_process import simulate

FAST = {"adapter": "lora", "local-steps": 2, "lora-batch-size": 2, "lora-rank": 2, "lora-alpha": 2.0,
        "sample-steps": 1, "sample-prompts": "an emoji of a cat", "site-sampling-rate": 0.9, "seed": 3,
        # explicit: a noise multiplier calibrated to the target changes with the number of rounds,
        # and a checkpoint made under another noise is refused (tests/server/test_checkpoint.py)
        "noise-multiplier": 6.0,
        # bit-identical resumes need replayable noise and site sampling: seeded from the run seed, NOT private
        # (tests/server/test_checkpoint.py covers resume with the OS CSPRNG); K declared, as private LoRA requires
        "privacy-randomness": "seeded-insecure", "num-sites": 2,
        # mechanics, not utility: site-level DP over 2 sites carries no signal (common.dp.plan.signal_to_noise)
        "max-noise-to-signal": "inf"}


def events(out):
    return json.loads((out / "ledger.json").read_text())["events"]


@pytest.mark.slow  # three simulations: ~4 min on 2 busy cores
def test_a_run_resumed_after_two_rounds_equals_an_uninterrupted_three_round_run(tmp_path, tiny_sd_path):
    common = {**FAST, "model-path": str(tiny_sd_path)}
    whole = simulate(2, {**common, "rounds": 3, "output-dir": str(tmp_path / "whole")})
    split = simulate(2, {**common, "rounds": 2, "output-dir": str(tmp_path / "split")})
    assert len(events(split)) == 2 and (split / CHECKPOINT_FILE).exists()
    simulate(2, {**common, "rounds": 3, "output-dir": str(split)})
    assert events(split) == events(whole) and len(events(whole)) == 3
    a = load_file(whole / "pytorch_lora_weights.safetensors")
    b = load_file(split / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    privacy_whole = json.loads((whole / "privacy.json").read_text())
    privacy_split = json.loads((split / "privacy.json").read_text())
    assert privacy_split["resumed_after_round"] == 2 and privacy_whole["resumed_after_round"] is None
    assert privacy_split["epsilon"] == privacy_whole["epsilon"]
    rounds_whole = json.loads((whole / "round_metrics.json").read_text())
    rounds_split = json.loads((split / "round_metrics.json").read_text())
    assert rounds_split == rounds_whole
