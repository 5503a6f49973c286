"""LoRA trained with Opacus DP-SGD inside one site (LoRA defense ``dp-sgd``).

The record-level baseline next to SMP-LoRA: each local step Poisson-samples the site's
images at the public q = dpsgd-batch-size / D (D = the declared ``site-dataset-size``), Opacus
computes every sampled image's gradient of the LoRA parameters (hooks on the adapter's
``nn.Linear`` layers only; the rest of the UNet is frozen), clips each to L2 norm
C = dpsgd-max-grad-norm, adds N(0, (zC)^2) to the sum, divides by the public expected batch
size q*D and takes an AdamW step (Abadi et al. 2016). The site's accountant
(:mod:`client.site_accountant`) lives in Flower's ``context.state`` across rounds and is
calibrated for (``rounds`` + retries) x ``local-steps`` steps to reach
``record-target-epsilon`` (default: ``target-epsilon``); it refuses a round that would go
past it. The server computes the same (z, q, steps) from the run config
(:mod:`common.dp.dpsgd`), charges them and stops the run before the record-level budget is
spent; a site holding more than D images refuses every round before training. The resulting delta is then clipped and noised by the server like any other
(site-level DP-FedAvg), so both units get a guarantee.

With FFA-LoRA (``lora-variant = "ffa"``) A is frozen: Opacus computes and clips the per-image
gradients of the B matrices only (C bounds each image's gradient of B), and only B moves.

The record-level guarantee does not need the server's trust (the noise is added on the
site) and does not count amplification by the server's sampling of sites (conservative).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from flwr.app import RecordDict
from opacus import GradSampleModule

from client.site_accountant import NoiseSourceDPOptimizer, begin_round, dpsgd_draws, mean_loss, poisson_step
from client.ti import tokenize
from common import keys
from common.config import RunConfig
from common.data import SiteImages
from common.diffusion import LatentDist, denoising_loss, encode_latents
from common.dp import NoiseSource
from common.dp.dpsgd import DPSGDBudget, DPSGDSchedule, dpsgd_schedule
from common.dp.sampling import SamplingSource, poisson_sample
from common.lora import LoRASpec, training_adapter

log = logging.getLogger("privadapt.client")


def record_schedule(cfg: RunConfig, budget: DPSGDBudget | None = None) -> DPSGDSchedule:
    """The record-level DP-SGD schedule of a LoRA site (defense ``dp-sgd``): the server's too."""
    schedule = dpsgd_schedule(cfg, budget)
    if schedule is None:
        raise ValueError("LoRA DP-SGD needs adapter = 'lora' and defense = 'dp-sgd'")
    return schedule


def captions_or_default(images: SiteImages, default: str) -> list[str]:
    return [c or default for c in images.captions]


def per_sample_unet(pipe) -> GradSampleModule:
    """Opacus hooks on the UNet; only its trainable (LoRA) layers get per-sample gradients
    (FFA-LoRA: B's layers, while :func:`common.lora.training_adapter` freezes A). Call
    ``.cleanup()`` on the result to remove the hooks and attributes."""
    pipe.unet.train()  # Opacus records activations only in training mode
    return GradSampleModule(pipe.unet, batch_first=True, loss_reduction="mean")


@dataclass(frozen=True)
class SiteRoundStart:
    """A DP-SGD round's spend, once recorded, and what its steps draw from: the schedule, z,
    the site's epsilon so far, the three random sources (:func:`client.site_accountant.dpsgd_draws`),
    the images' latent distributions and text states (None for a site without images)."""

    schedule: DPSGDSchedule
    noise_multiplier: float
    epsilon: float
    training: torch.Generator
    sampling: SamplingSource
    noise: NoiseSource
    dist: LatentDist | None
    hidden: torch.Tensor | None


def begin_site_round(pipe, spec: LoRASpec, images: SiteImages, cfg: RunConfig, *, state: RecordDict, site_index: int,
                     round_index: int, budget: DPSGDBudget | None, label: str) -> SiteRoundStart:
    """Check, spend and prepare one DP-SGD round of a LoRA site (defense dp-sgd or smp-dp-sgd):
    refuse a text-encoder LoRA, a site over its declared size or a round over its target,
    BEFORE anything is spent; then record the spend and encode the images once."""
    if spec.text_encoder:
        raise ValueError(f"defense {cfg.defense} trains the UNet's LoRA only: set lora-text-encoder = false")
    schedule = record_schedule(cfg, budget)
    n = len(images)
    schedule.check_site_size(n, f"site {site_index}")  # before anything is spent
    z, eps = begin_round(state, schedule.budget, sample_rate=schedule.sample_rate, steps=schedule.steps_per_round,
                         site_index=site_index, round_index=round_index)
    device = pipe.unet.device
    training, sampling, noise = dpsgd_draws(cfg.seed, label, device, site_index, round_index,
                                            secret=cfg.secret_randomness)
    # a site without usable images takes the same noise-only steps (every Poisson batch is empty)
    # rather than refusing: whether it holds an image must not decide whether it answers
    dist = encode_latents(pipe.vae, images.pixels) if n else None
    with torch.no_grad():
        hidden = (pipe.text_encoder(tokenize(pipe, captions_or_default(images, cfg.default_caption)).to(device))[0]
                  if n else None)
    return SiteRoundStart(schedule, z, eps, training, sampling, noise, dist, hidden)


def dpsgd_lora_round(
    pipe,
    spec: LoRASpec,
    images: SiteImages,
    cfg: RunConfig,
    *,
    state: RecordDict,
    site_index: int,
    round_index: int,
    budget: DPSGDBudget | None = None,
) -> dict[str, float | int]:
    """Train the pipeline's attached adapter in place for ``local-steps`` DP-SGD steps.

    Returns the public parameters the server records (z, q, steps, site index, the site's
    record-level epsilon over all its rounds) and the mean adaptation loss (a diagnostic).
    Raises ValueError, spending and training nothing, if the round would exceed the site's
    record-level target or the site holds more images than declared. ``budget`` overrides the
    record-level plan read from ``cfg`` (benchmarks use it to fix z).
    """
    start = begin_site_round(pipe, spec, images, cfg, state=state, site_index=site_index, round_index=round_index,
                             budget=budget, label="lora-dpsgd")
    schedule, z, eps, q = start.schedule, start.noise_multiplier, start.epsilon, start.schedule.sample_rate
    training, sampling, noise, dist, hidden_all = start.training, start.sampling, start.noise, start.dist, start.hidden
    n, device = len(images), pipe.unet.device
    private = schedule.budget.private
    losses: list[float] = []
    with training_adapter(pipe, spec) as params:  # set before Opacus hooks the trained layers (FFA-LoRA: B only)
        adamw = torch.optim.AdamW(params, lr=cfg.lora_learning_rate)
        unet = per_sample_unet(pipe) if private else pipe.unet
        optimizer = (NoiseSourceDPOptimizer(adamw, noise=noise, noise_multiplier=z,
                                            max_grad_norm=cfg.dpsgd_max_grad_norm,
                                            expected_batch_size=schedule.expected_batch_size) if private else adamw)
        try:
            for _ in range(cfg.local_steps):
                batch = poisson_sample(n, q, sampling).to(device)
                loss = poisson_step(optimizer, batch, private=private, loss_fn=lambda keep: denoising_loss(
                    unet, pipe.scheduler, dist.sample(training, keep), hidden_all[keep], training).mean())
                if loss is not None:
                    losses.append(loss)
        finally:
            optimizer.zero_grad(set_to_none=True)
            if private:
                unet.cleanup()  # removes Opacus' hooks and its attributes
            pipe.unet.eval()
    if not all(torch.isfinite(p).all() for p in params):
        raise ValueError(f"site {site_index}: DP-SGD produced NaN or infinite LoRA weights in round {round_index}")
    log.info("site %d round %d: LoRA DP-SGD z=%.4g q=%.4g C=%g, %d step(s), site record epsilon %.4g", site_index,
             round_index, z, q, cfg.dpsgd_max_grad_norm, cfg.local_steps, eps)
    return {
        keys.SITE_EPSILON: float(eps),
        keys.SITE_NOISE_MULTIPLIER: float(z),
        keys.SITE_SAMPLE_RATE: float(q),
        keys.SITE_STEPS: int(cfg.local_steps),
        keys.SITE_INDEX: int(site_index),
        keys.DIAG_LOSS: mean_loss(losses),
    }
