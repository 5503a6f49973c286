"""LoRA end to end through Flower's simulation engine (Ray): 2 sites, 2 rounds, each defense."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline

from common.config import DEFENSES, PROXY_ATTACKER_DEFENSES, RECORD_DP_DEFENSES, RunConfig
from simulations.run import declared_config
from tests.simulation_process import simulate

FAST = {"adapter": "lora", "rounds": 2, "local-steps": 2, "lora-batch-size": 2, "dpsgd-batch-size": 3,
        "lora-rank": 2, "lora-alpha": 2.0, "sample-steps": 2, "sample-prompts": "an emoji of a cat", "num-sites": 2,
        # mechanics, not utility: site-level DP over 2 sites carries no signal (common.dp.plan.signal_to_noise)
        "max-noise-to-signal": "inf"}
DIAGNOSTICS = {"adaptation_loss", "attacker_accuracy", "fraction_clipped", "delta_norm_before_clipping"}


def unet_output(pipe) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    ids = pipe.tokenizer(["an emoji of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([500]), pipe.text_encoder(ids)[0]).sample


@pytest.mark.parametrize("defense", DEFENSES)
def test_two_sites_two_rounds(tmp_path, tiny_sd_path, defense):
    # the proxy attacker's accuracy reaches the server only if the sites opt in to diagnostics
    opt_in = defense in PROXY_ATTACKER_DEFENSES
    overrides = {**FAST, "defense": defense, "model-path": str(tiny_sd_path), "output-dir": str(tmp_path / "out"),
                 "site-diagnostics": opt_in}
    out = simulate(2, overrides)
    cfg = RunConfig.from_run_config(declared_config(2, overrides))
    for name in ("pytorch_lora_weights.safetensors", "privacy.json", "metrics.json", "round_metrics.json",
                 "README.md", "ledger.json", "samples/grid.png"):
        assert (out / name).exists(), name
    privacy = json.loads((out / "privacy.json").read_text())
    assert privacy["defense"] == defense and privacy["num_rounds"] == 2 and privacy["num_sites_declared"] == 2
    site = privacy["epsilon"]["site"]
    assert 0 < site["prv"] <= cfg.target_epsilon and site["rdp"] >= site["prv"]
    assert privacy["denominator"] == pytest.approx(cfg.site_sampling_rate * 2)
    if defense in RECORD_DP_DEFENSES:
        record = privacy["epsilon"]["record"]
        assert 0 < record["prv"] <= cfg.target_epsilon
        assert set(privacy["site_record_epsilon_reported"]) == {"site-0", "site-1"}
        assert privacy["unit"] == "site and record" and "every image" in privacy["record_covers"]
        if defense == "smp-dp-sgd":  # the attacker's steps count too, and the card says whom the epsilon covers
            assert privacy["record_plan"]["steps_per_round"] == 2 * cfg.local_steps
            assert "non-members" in privacy["statement"] and "non-members" in (out / "README.md").read_text()
    else:
        assert "record" not in privacy["epsilon"]
    rounds = json.loads((out / "round_metrics.json").read_text())
    assert [r["sites_used"] for r in rounds] == [2, 2] and all(r["expected_noise_norm_of_mean"] > 0 for r in rounds)
    assert privacy["site_diagnostics"] is opt_in
    if opt_in:
        assert all(0 <= r["attacker_accuracy"] <= 1 for r in rounds) and "NOT covered" in privacy["not_covered"]
    else:
        assert not any(DIAGNOSTICS & set(r) for r in rounds)
    # the exported adapter loads into a stock pipeline and changes the UNet
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path, safety_checker=None, local_files_only=True)
    base = unet_output(pipe)
    pipe.load_lora_weights(str(out))
    adapted = unet_output(pipe)
    assert torch.isfinite(adapted).all() and not torch.allclose(adapted, base)
    card = (out / "README.md").read_text()
    assert "one site" in card and "load_lora_weights" in card


def test_ffa_two_sites_release_b_only_and_the_export_holds_the_public_a(tmp_path, tiny_sd_path):
    from safetensors.torch import load_file

    from common.lora import LORA_FILE
    from tests.server.test_lora_run import public_a

    overrides = {**FAST, "lora-variant": "ffa", "model-path": str(tiny_sd_path), "output-dir": str(tmp_path / "out")}
    out = simulate(2, overrides)
    cfg = RunConfig.from_run_config(declared_config(2, overrides))
    a = public_a(cfg)
    privacy = json.loads((out / "privacy.json").read_text())
    assert privacy["num_rounds"] == 2 and privacy["adapter"]["variant"] == "ffa"
    saved = load_file(str(out / LORA_FILE))
    down = {k.replace(".lora.down.", ".lora_A."): v for k, v in saved.items() if ".lora.down." in k}
    assert down.keys() == a.keys() and all(torch.equal(down[k], a[k]) for k in a)  # bit for bit
    released = sum(v.numel() for k, v in saved.items() if ".lora.up." in k)
    assert privacy["adapter"]["parameters"] == released and privacy["adapter"]["frozen_parameters"] == sum(
        v.numel() for v in a.values())
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path, safety_checker=None, local_files_only=True)
    base = unet_output(pipe)
    pipe.load_lora_weights(str(out))
    adapted = unet_output(pipe)
    assert torch.isfinite(adapted).all() and not torch.allclose(adapted, base)
    assert "FFA-LoRA" in (out / "README.md").read_text()
