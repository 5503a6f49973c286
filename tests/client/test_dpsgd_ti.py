"""Tests of client/dpsgd_ti.py: DP-SGD textual inversion on one site (the paper's baseline)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from flwr.app import RecordDict

import client.dpsgd_ti
import common.diffusion
from client.dpsgd_ti import attach_per_sample_grads, batch_losses, dpsgd_site_round
from client.site_accountant import STATE_KEY, load_history, site_epsilon
from client.ti import build_prompts, placeholder_rows, tokenize
from common import keys
from common.config import RunConfig
from common.data import SiteImages
from common.dp import PrivacyEvent, epsilon
from common.dp.dpsgd import DeclaredSizeExceeded
from common.models import load_pipeline
from common.settings import ti_settings
from common.textual_inversion import initializer_vector
from tests.client.helpers import FixedDraws, opacus_leftovers

DELTA = 1e-5


@pytest.fixture(scope="module")
def pipe(tiny_sd_path):
    return load_pipeline(tiny_sd_path, device="cpu")


def site_images(n: int = 5, seed: int = 3) -> SiteImages:
    pixels = torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    captions = tuple("a cat" if i % 2 else None for i in range(n))
    return SiteImages(names=tuple(f"{i}.png" for i in range(n)), pixels=pixels, captions=captions, site="s")


def config(**overrides) -> RunConfig:
    base = dict(ti_method="dp-sgd", target_epsilon=50.0, target_delta=DELTA, noise_multiplier=1.0,
                dpsgd_rounds=2, dpsgd_local_steps=2, dpsgd_batch_size=3, dpsgd_max_grad_norm=0.1,
                learning_rate=5e-2, seed=0, site_dataset_size=5)  # q = 3/5 whatever the site holds
    return RunConfig(**{**base, **overrides})


# ---- per-sample gradients ---------------------------------------------------------------

@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-6), (torch.float32, 1e-4)])
def test_opacus_per_sample_gradients_match_a_loop_over_single_examples(pipe, tiny_sd_path, monkeypatch, dtype,
                                                                      tolerance):
    """float64 checks the math to 1e-6 (the loss itself is float32: ~5e-8 seen); float32, what
    runs, differs by rounding only (batched and single matrix products: ~5e-6 seen)."""
    if dtype != pipe.unet.dtype:
        pipe = load_pipeline(tiny_sd_path, device="cpu")
        pipe.text_encoder.to(dtype)
        pipe.unet.to(dtype)
    cfg = config()
    settings = ti_settings(cfg)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(3, 4, 8, 8, generator=gen, dtype=dtype)
    noise = torch.randn(3, 4, 8, 8, generator=gen, dtype=dtype)
    timesteps = torch.tensor([10, 500, 990])
    captions = [None, "a cat", "a dog on a hill"]  # placeholder at different token positions
    with placeholder_rows(pipe, settings, num_rows=1) as table:
        table.rows.to(dtype)
        with torch.no_grad():
            table.rows.weight.add_(0.05 * torch.randn(table.rows.weight.shape, generator=gen, dtype=dtype))
        ids = tokenize(pipe, build_prompts(captions, settings))

        # one example at a time, plain autograd
        loop = []
        for i in range(3):
            monkeypatch.setattr(common.diffusion, "torch", FixedDraws(noise[i:i + 1], timesteps[i:i + 1]))
            table.rows.weight.grad = None
            batch_losses(pipe, table, ids[i:i + 1], latents[i:i + 1], None).sum().backward()
            loop.append(table.rows.weight.grad.detach().clone())
        loop = torch.stack(loop)  # [3, 1, D]

        # the batch, through Opacus with the mean loss used in training
        monkeypatch.setattr(common.diffusion, "torch", FixedDraws(noise, timesteps))
        table.rows.weight.grad = None
        hooks = attach_per_sample_grads(table)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                batch_losses(pipe, table, ids, latents, None).mean().backward()
            per_sample = table.rows.weight.grad_sample.detach().clone()
        finally:
            hooks.cleanup()

    assert per_sample.shape == loop.shape == (3, 1, table.rows.embedding_dim)
    assert per_sample.dtype == dtype
    for i in range(3):
        assert loop[i].norm() > 0
        rel = ((per_sample[i] - loop[i]).norm() / loop[i].norm()).item()
        assert rel < tolerance, f"example {i}: relative error {rel}"
    assert not hasattr(table.rows.weight, "grad_sample")
    # the examples' gradients differ: a per-batch gradient would not pass the test above
    assert (loop[0] - loop[1]).norm() > 1e-3 * loop[0].norm()


# ---- a site's rounds --------------------------------------------------------------------

def test_dp_round_trains_and_the_site_accountant_persists_across_rounds(pipe, monkeypatch):
    calls = []
    real_batch_losses = client.dpsgd_ti.batch_losses
    monkeypatch.setattr(client.dpsgd_ti, "batch_losses", lambda *a, **k: calls.append(1) or real_batch_losses(*a, **k))
    cfg = config()
    settings = ti_settings(cfg)
    images = site_images()
    init = initializer_vector(pipe, settings)
    state = RecordDict()

    v1, m1 = dpsgd_site_round(pipe, images, settings, cfg, init, state=state, site_index=2, round_index=1)
    assert v1.shape == init.shape and v1.dtype == torch.float32 and v1.device.type == "cpu"
    assert not torch.equal(v1, init)
    assert m1[keys.SITE_NOISE_MULTIPLIER] == 1.0
    assert m1[keys.SITE_SAMPLE_RATE] == pytest.approx(3 / 5)
    assert len(calls) >= 1  # gradient steps ran (not only noise on empty batches)
    assert m1[keys.SITE_STEPS] == 2 and m1[keys.SITE_INDEX] == 2

    v2, m2 = dpsgd_site_round(pipe, images, settings, cfg, v1, state=state, site_index=2, round_index=2)
    assert not torch.equal(v2, v1)
    assert m2[keys.SITE_EPSILON] > m1[keys.SITE_EPSILON] > 0

    # the epsilon is that of both rounds composed, as the server's ledger will compute it
    events = [PrivacyEvent(noise_multiplier=1.0, sample_rate=0.6, steps=2, unit="record", scope="site-2")] * 2
    assert m2[keys.SITE_EPSILON] == pytest.approx(epsilon(events, DELTA, "prv"), rel=1e-6)
    assert m1[keys.SITE_EPSILON] == pytest.approx(epsilon(events[:1], DELTA, "prv"), rel=1e-6)
    history = load_history(state)
    assert [(h.round, h.noise_multiplier, h.sample_rate, h.steps) for h in history] == [(1, 1.0, 0.6, 2), (2, 1.0, 0.6, 2)]
    assert site_epsilon(history, 2, DELTA, "rdp") == pytest.approx(epsilon(events, DELTA, "rdp"), rel=1e-9)

    assert opacus_leftovers(pipe) == []


def test_seeded_insecure_round_replays_exactly(pipe):
    cfg = config(privacy_randomness="seeded-insecure", dpsgd_local_steps=1)
    settings = ti_settings(cfg)
    init = initializer_vector(pipe, settings)
    a, _ = dpsgd_site_round(pipe, site_images(), settings, cfg, init, state=RecordDict(), site_index=2, round_index=1)
    b, _ = dpsgd_site_round(pipe, site_images(), settings, cfg, init, state=RecordDict(), site_index=2, round_index=1)
    assert torch.equal(a, b)  # the noise and the batches are functions of the run seed: replayable, NOT private


def test_round_that_would_exceed_the_target_is_refused_before_training(pipe):
    # one round of z=1, q=0.6, 2 steps costs ~5.31 at delta 1e-5; two cost ~7.49
    cfg = config(target_epsilon=6.0)
    settings = ti_settings(cfg)
    images = site_images()
    init = initializer_vector(pipe, settings)
    state = RecordDict()
    dpsgd_site_round(pipe, images, settings, cfg, init, state=state, site_index=3, round_index=1)
    with pytest.raises(ValueError, match=r"site 3: .*round 2.*above its target 6"):
        dpsgd_site_round(pipe, images, settings, cfg, init, state=state, site_index=3, round_index=2)
    assert len(load_history(state)) == 1  # the refused round spent nothing

    # a private run with no noise is refused at once
    with pytest.raises(ValueError, match="site 0"):
        dpsgd_site_round(pipe, images, settings, config(noise_multiplier=0.0), init, state=RecordDict(),
                         site_index=0, round_index=1)


def test_calibrated_noise_meets_the_target_over_the_planned_rounds(pipe):
    cfg = config(target_epsilon=8.0, noise_multiplier=-1.0, dpsgd_local_steps=1)
    settings = ti_settings(cfg)
    images, init, state = site_images(), initializer_vector(pipe, settings), RecordDict()
    vector, metrics = init, {}
    for r in (1, 2):  # the planned dpsgd-rounds
        vector, metrics = dpsgd_site_round(pipe, images, settings, cfg, vector, state=state, site_index=0, round_index=r)
    z = metrics[keys.SITE_NOISE_MULTIPLIER]
    assert 0 < z < 10
    assert 0.95 * 8.0 < metrics[keys.SITE_EPSILON] <= 8.0
    assert STATE_KEY in state and "noise_multiplier" in str(state[STATE_KEY]["calibration"])
    with pytest.raises(ValueError, match="above its target"):  # a round beyond the plan
        dpsgd_site_round(pipe, images, settings, cfg, vector, state=state, site_index=0, round_index=3)


def test_non_private_round_has_no_noise_and_infinite_epsilon(pipe):
    cfg = config(target_epsilon=math.inf, noise_multiplier=-1.0)
    settings = ti_settings(cfg)
    init = initializer_vector(pipe, settings)
    vector, metrics = dpsgd_site_round(pipe, site_images(), settings, cfg, init, state=RecordDict(),
                                       site_index=1, round_index=1)
    assert metrics[keys.SITE_NOISE_MULTIPLIER] == 0.0
    assert math.isinf(metrics[keys.SITE_EPSILON])
    assert not torch.equal(vector, init)


def test_os_randomness_round_is_not_replayable(pipe):
    cfg = config(dpsgd_local_steps=1)  # privacy-randomness = "os", the default
    assert cfg.secret_randomness
    settings = ti_settings(cfg)
    init = initializer_vector(pipe, settings)
    a, _ = dpsgd_site_round(pipe, site_images(), settings, cfg, init, state=RecordDict(), site_index=0, round_index=1)
    b, _ = dpsgd_site_round(pipe, site_images(), settings, cfg, init, state=RecordDict(), site_index=0, round_index=1)
    assert not torch.equal(a, b)


def test_text_encoder_is_restored_and_no_opacus_hooks_remain(pipe, monkeypatch):
    cfg = config(dpsgd_local_steps=1)
    settings = ti_settings(cfg)
    original = pipe.text_encoder.get_input_embeddings()
    init = initializer_vector(pipe, settings)
    dpsgd_site_round(pipe, site_images(), settings, cfg, init, state=RecordDict(), site_index=0, round_index=1)
    assert pipe.text_encoder.get_input_embeddings() is original
    assert opacus_leftovers(pipe) == []
    # also when training fails half-way, with the hooks attached
    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(client.dpsgd_ti, "denoising_loss", boom)
    with pytest.raises(RuntimeError, match="boom"):
        dpsgd_site_round(pipe, site_images(), settings, cfg, init, state=RecordDict(), site_index=0, round_index=1)
    assert pipe.text_encoder.get_input_embeddings() is original
    assert opacus_leftovers(pipe) == []


def test_a_site_above_the_declared_size_refuses_every_round_before_spending(pipe):
    cfg = config(site_dataset_size=4)
    settings = ti_settings(cfg)
    init, state = initializer_vector(pipe, settings), RecordDict()
    for round_index in (1, 2):
        with pytest.raises(DeclaredSizeExceeded, match="site 5: holds more images than the declared") as err:
            dpsgd_site_round(pipe, site_images(5), settings, cfg, init, state=state, site_index=5,
                             round_index=round_index)
        assert "5" not in str(err.value).replace("site 5", "")  # no count in the message
    assert load_history(state) == []


def test_a_site_without_usable_images_takes_noise_only_steps_instead_of_refusing(pipe):
    """Whether a site answers must not depend on whether it holds an image: with none, every
    Poisson batch is empty and each step adds noise only, spending the same (z, q, steps)."""
    cfg = config()
    settings = ti_settings(cfg)
    init, state = initializer_vector(pipe, settings), RecordDict()
    empty = SiteImages(names=(), pixels=torch.zeros(0, 3, 64, 64), captions=(), site="s")
    vector, metrics = dpsgd_site_round(pipe, empty, settings, cfg, init, state=state, site_index=0, round_index=1)
    _, full = dpsgd_site_round(pipe, site_images(5), settings, cfg, init, state=RecordDict(), site_index=0,
                               round_index=1)
    for key in (keys.SITE_NOISE_MULTIPLIER, keys.SITE_SAMPLE_RATE, keys.SITE_STEPS, keys.SITE_EPSILON):
        assert metrics[key] == full[key]  # the same public spend as a site with images
    assert torch.isfinite(vector).all() and not torch.equal(vector, init.float())  # the noise moved it
    assert len(load_history(state)) == 1


def test_malformed_server_embedding_is_refused_before_spending(pipe):
    cfg = config()
    settings = ti_settings(cfg)
    dim = initializer_vector(pipe, settings).numel()
    for bad in (torch.zeros(dim + 1), torch.full((dim,), math.nan)):
        state = RecordDict()
        with pytest.raises(ValueError, match="site 4: the server's embedding"):
            dpsgd_site_round(pipe, site_images(), settings, cfg, bad, state=state, site_index=4, round_index=1)
        assert load_history(state) == []
