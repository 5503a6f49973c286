"""End to end through Flower's simulation engine (Ray), two sites, on the tiny model."""

import json
import shutil

import torch
from diffusers import StableDiffusionPipeline

from client.dpagg import site_contribution
from common.config import RunConfig, pyproject_run_config
from common.data import load_site_images
from common.dp import GaussianSumMechanism
from common.dp.sampling import sampling_generator
from common.models import load_pipeline
from common.paths import REPO_ROOT, derive_seed
from common.settings import ti_settings
from common.textual_inversion import initializer_vector, load_embedding
from tests.simulation_process import simulate

FAST = {"ti-steps": 2, "sample-steps": 2, "sample-prompts": "an emoji of a cat", "dataset-size": 24}


def run(tmp_path, tiny_sd_path, sites=2, **extra):
    overrides = {**FAST, "model-path": str(tiny_sd_path), "output-dir": str(tmp_path / "out"), **extra}
    return simulate(sites, overrides), RunConfig.from_run_config({**pyproject_run_config(), **overrides})


def check_outputs(out, tiny_sd_path):
    for name in ("learned_embeds.safetensors", "privacy.json", "metrics.json", "README.md", "ledger.json",
                 "samples/grid.png", "samples/base_00.png", "samples/adapted_00.png"):
        assert (out / name).exists(), name
    token, vector = load_embedding(out / "learned_embeds.safetensors")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path, safety_checker=None, local_files_only=True)
    pipe.load_textual_inversion(str(out / "learned_embeds.safetensors"), token=token)
    tid = pipe.tokenizer.convert_tokens_to_ids(token)
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[tid], vector)
    return json.loads((out / "privacy.json").read_text()), vector


def test_two_sites_dp_and_a_site_of_broken_files_is_an_empty_site(tmp_path, tiny_sd_path):
    """Sites 0 and 1 hold the demo images; site 2 holds only a truncated PNG. Site 2 leaves it
    out as absent and answers with the sum of no image (it refuses nothing, so whether it holds
    a usable image is not published); the release goes on, and nothing names the file."""
    data = tmp_path / "data"
    for index in range(2):
        shutil.copytree(REPO_ROOT / "data/demo" / f"site-{index}", data / f"site-{index}")
    (data / "site-2").mkdir()
    good = sorted((REPO_ROOT / "data/demo/site-0").glob("*.png"))[0].read_bytes()
    (data / "site-2" / "broken.png").write_bytes(good[: len(good) // 2])
    out, cfg = run(tmp_path, tiny_sd_path, sites=3, **{"data-path": str(data)})
    privacy, _ = check_outputs(out, tiny_sd_path)
    assert privacy["unit"] == "record" and privacy["private"]
    assert privacy["num_sites"] == 3 and privacy["sites_per_release"] == [3] and privacy["num_releases"] == 1
    assert privacy["rejected_replies"] == []
    assert not any(b"broken.png" in path.read_bytes() for path in out.rglob("*") if path.is_file())
    assert privacy["epsilon"]["prv"] <= cfg.target_epsilon
    assert privacy["epsilon"]["rdp"] >= privacy["epsilon"]["prv"]
    assert privacy["noise_multiplier"] > 0 and privacy["denominator"] == cfg.sampling_rate * 24
    assert privacy["sampling"] == "poisson" and privacy["adjacency"] == "add/remove one image"
    card = (out / "README.md").read_text()
    assert "differentially private" in card and "one image" in card


def test_two_sites_non_private_is_the_plain_mean(tmp_path, tiny_sd_path):
    out, cfg = run(tmp_path, tiny_sd_path, **{"target-epsilon": "inf"})
    privacy, vector = check_outputs(out, tiny_sd_path)
    assert not privacy["private"] and privacy["epsilon"]["prv"] is None
    assert privacy["noise_multiplier"] == 0 and privacy["sample_rate"] == 1.0
    # Recompute both sites' contributions here with the seeds the sites derive.
    pipe = load_pipeline(tiny_sd_path, device="cpu")
    settings = ti_settings(cfg)
    mech = GaussianSumMechanism(clip_norm=cfg.clip_norm, noise_multiplier=0.0)
    total = 0
    for index in range(2):
        images = load_site_images(REPO_ROOT / "data/demo" / f"site-{index}", site=f"site-{index}", resolution=64)
        training = torch.Generator().manual_seed(derive_seed(cfg.seed, "train", index, 1))
        total = total + site_contribution(pipe, images, settings, mech, sample_rate=1.0, center=True,
                                          sampling=sampling_generator(0), training=training).total
    expected = total / 24 + initializer_vector(pipe, settings).double()
    torch.testing.assert_close(vector.double(), expected, rtol=1e-4, atol=1e-6)


def test_two_sites_dpsgd_baseline(tmp_path, tiny_sd_path):
    out, cfg = run(tmp_path, tiny_sd_path, **{"ti-method": "dp-sgd", "dpsgd-rounds": 2, "dpsgd-local-steps": 2})
    privacy, vector = check_outputs(out, tiny_sd_path)
    assert privacy["method"] == "dp-sgd-ti" and privacy["private"]
    assert privacy["num_sites"] == 2 and privacy["num_releases"] == 2
    assert set(privacy["site_epsilon"]["prv"]) == {"site-0", "site-1"}
    # the site accountants persisted across rounds: each site has one event per round
    assert sorted(e["scope"] for e in privacy["events"]) == ["site-0", "site-0", "site-1", "site-1"]
    assert 0 < privacy["epsilon"]["prv"] <= cfg.target_epsilon
    assert "DP-SGD" in (out / "README.md").read_text()
