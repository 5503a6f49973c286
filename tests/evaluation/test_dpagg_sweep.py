"""The DPAgg-TI sweep's releases: the same mechanism as a run, with the spread the plan says."""

from __future__ import annotations

import math

import pytest
import torch

from common.config import RunConfig
from common.dp.plan import plan_dpagg
from common.dp.sampling import sampling_generator
from evaluation.dpagg_sweep import first_images, release, release_errors


def deltas(n=40, d=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen, dtype=torch.float64) + 0.5


def test_the_nonprivate_release_is_the_mean_of_the_clipped_records():
    x = deltas()
    cfg = RunConfig(clip_norm=0.5, dataset_size=len(x))
    clipped = x * torch.clamp(0.5 / torch.linalg.vector_norm(x, dim=1, keepdim=True), max=1.0)
    out = release(x, cfg, None, generator=sampling_generator(0), seed=0)
    assert torch.allclose(out, clipped.mean(0), rtol=0, atol=1e-12)


def test_the_private_release_has_the_planned_noise_spread():
    x = torch.zeros(40, 64, dtype=torch.float64)  # no signal: the release is the noise alone
    cfg = RunConfig(clip_norm=0.5, sampling_rate=1.0, dataset_size=len(x))
    plan = plan_dpagg(cfg)
    draws = torch.stack([release(x, cfg, plan, generator=sampling_generator(t), seed=t) for t in range(200)])
    expected = plan.noise_multiplier * 0.5 / (plan.sample_rate * len(x))
    # 12,800 draws: the sample std is within 3 % of the planned one (its own sd is ~0.6 %)
    assert float(draws.std()) == pytest.approx(expected, rel=0.03)
    assert abs(float(draws.mean())) < 4 * expected / math.sqrt(draws.numel())


def test_errors_fall_as_the_number_of_images_grows():
    small, large = deltas(40), deltas(400, seed=1)
    errs = [release_errors(x, RunConfig(clip_norm=0.5, sampling_rate=0.5, dataset_size=len(x)), trials=10, seed=0)
            for x in (small, large)]
    assert errs[1]["relative_error"] < errs[0]["relative_error"] / 2
    assert errs[1]["cosine"] > errs[0]["cosine"]
    assert errs[0]["expected_noise_norm"] == pytest.approx(10 * errs[1]["expected_noise_norm"])


def test_first_images_takes_the_same_number_from_every_site():
    assert first_images([3, 5, 4], 2).tolist() == [0, 1, 3, 4, 8, 9]
    assert first_images([1, 5], 2).tolist() == [0, 1, 2]


def test_per_image_embeddings_are_learnt_once_and_relearnt_when_the_data_changes(tmp_path, monkeypatch):
    import shutil

    import client.ti
    from common.paths import REPO_ROOT
    from evaluation.dpagg_sweep import per_image_embeddings

    data = tmp_path / "data"
    for k in (0, 1):
        site = data / f"site-{k}"
        site.mkdir(parents=True)
        for png in sorted((REPO_ROOT / "data" / "demo" / f"site-{k}").glob("*.png"))[:2]:
            shutil.copyfile(png, site / png.name)
    cfg = RunConfig(model_path=str(REPO_ROOT / "assets" / "emoji-sd"), resolution=32, ti_steps=1, batch_size=2,
                    initializer_token="flat")
    cache = tmp_path / "embeddings.pt"
    embeddings, init, counts = per_image_embeddings(cfg, data, cache)
    assert embeddings.shape == (4, init.numel()) and counts == [2, 2] and cache.is_file()

    def no_training(*args, **kwargs):
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(client.ti, "train_per_image_embeddings", no_training)
    again, _, _ = per_image_embeddings(cfg, data, cache)
    assert torch.equal(again, embeddings)
    (data / "site-1" / sorted(p.name for p in (data / "site-1").iterdir())[0]).unlink()
    with pytest.raises(AssertionError, match="cache was not used"):
        per_image_embeddings(cfg, data, cache)


def test_a_formed_release_never_claims_privacy(tmp_path):
    import json

    from evaluation.dpagg_sweep import write_release
    from evaluation.utility import read_run

    folder = write_release(tmp_path / "dp", RunConfig(), torch.zeros(64), noised=True, epsilon=1.0)
    statement = json.loads((folder / "privacy.json").read_text())
    assert statement["private"] is False and statement["noised"] is True and statement["planned_epsilon"] == 1.0
    assert "NOT private" in statement["note"]
    assert read_run(folder).adapter == "textual-inversion"
