"""DP-SGD textual inversion on one site: the baseline of Peetathawatchai et al. 2024.

The paper's baseline (arXiv 2411.14639, Sec. 5) trains ONE shared textual-inversion
embedding over the whole private dataset with DP-SGD (Abadi et al., "Deep Learning with
Differential Privacy", CCS 2016) using Opacus. Federated here, one round on a site is:

1. copy the server's global embedding into a single trainable placeholder row;
2. for ``dpsgd-local-steps`` steps: Poisson-sample the site's images at the public rate
   q = dpsgd-batch-size / D (D = the declared ``site-dataset-size``), compute each sampled
   image's denoising loss, let Opacus compute per-sample gradients of the row (hooks on the
   row's own ``nn.Embedding`` only: [B, 1, D], not [B, vocabulary, D]), clip each to L2 norm
   C = dpsgd-max-grad-norm, sum, add N(0, (zC)^2 I), divide by the public expected batch size
   q*D and take an Adam step;
3. return the trained row. The server averages the sites' rows (post-processing).

Non-private mode (``target-epsilon = inf``) uses the same Poisson batches and plain Adam on
the mean loss: no clipping, no noise, z = 0, epsilon = inf.

Privacy unit: one image (record-level DP, add/remove-one adjacency, Poisson sampling), for
the site's images only; sites hold disjoint images, so the run's epsilon is the worst site's
(parallel composition). Each site keeps its own accountant in Flower's ``context.state``
across rounds (Flower's Opacus example resets it every round, which under-reports), and
refuses a round that would take it above ``target-epsilon`` before touching its images.

Notes:
    The noise is drawn by :class:`common.dp.NoiseSource` (the one noise source of
    privadapt), plugged into Opacus' ``DPOptimizer``: read from ``os.urandom`` by default
    (``privacy-randomness = "os"``), as are the Poisson batches; seeded per site and round
    from the run seed only with ``"seeded-insecure"`` (tests and replay; NOT private). Opacus'
    own ``secure_mode`` needs torchcsprng, which is not installed.

    Opacus' convention takes q = B / n_site and divides by the expected batch q*n_site, so the
    q and z a site reports reveal its image count. Here both come from the declared upper
    bound D (:mod:`common.dp.dpsgd`): the server computes the same (z, q, steps) itself, and
    a site holding more than D images refuses every round before training.
"""

from __future__ import annotations

import logging

import torch
from flwr.app import RecordDict
from opacus import GradSampleModule

from client.site_accountant import NoiseSourceDPOptimizer, begin_round, dpsgd_draws, mean_loss, poisson_step
from client.ti import build_prompts, placeholder_rows, tokenize
from common import keys
from common.config import RunConfig
from common.data import SiteImages
from common.diffusion import denoising_loss, encode_latents
from common.dp.dpsgd import DPSGDSchedule, dpsgd_schedule
from common.dp.sampling import poisson_sample
from common.textual_inversion import PlaceholderEmbedding, TISettings, initializer_vector

log = logging.getLogger("privadapt.client")

def ti_schedule(cfg: RunConfig) -> DPSGDSchedule:
    """The baseline's public DP-SGD schedule: ``dpsgd-rounds`` x ``dpsgd-local-steps`` steps
    for ``target-epsilon`` at q = dpsgd-batch-size / declared site size."""
    schedule = dpsgd_schedule(cfg)
    if schedule is None:
        raise ValueError("the DP-SGD textual-inversion baseline needs ti-method = 'dp-sgd'")
    return schedule


# ---- Opacus pieces ----------------------------------------------------------------------

def attach_per_sample_grads(table: PlaceholderEmbedding) -> GradSampleModule:
    """Opacus hooks on the placeholder row table only (the rest of the model is frozen):
    per-sample gradients land in ``table.rows.weight.grad_sample`` as [B, rows, D].
    Call ``.cleanup()`` on the result to remove the hooks and attributes."""
    table.rows.train()  # Opacus records activations only in training mode
    return GradSampleModule(table.rows, batch_first=True, loss_reduction="mean")


def batch_losses(pipe, table: PlaceholderEmbedding, ids: torch.Tensor, latents: torch.Tensor,
                 generator: torch.Generator | None) -> torch.Tensor:
    """Per-sample denoising losses [B] of a batch whose prompts all use the shared row 0."""
    # every batch element reads the one shared row
    table.row_index = torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)
    hidden = pipe.text_encoder(ids)[0]
    return denoising_loss(pipe.unet, pipe.scheduler, latents, hidden, generator)


# ---- one round on one site ------------------------------------------------------------

def dpsgd_site_round(
    pipe,
    images: SiteImages,
    settings: TISettings,
    cfg: RunConfig,
    global_embedding: torch.Tensor,
    *,
    state: RecordDict,
    site_index: int,
    round_index: int,
) -> tuple[torch.Tensor, dict[str, float | int]]:
    """Train the shared embedding on this site's images for one round of DP-SGD.

    Args:
        pipe: a frozen StableDiffusionPipeline (cached across rounds; left as found).
        images: the site's private images.
        settings: textual-inversion settings (placeholder, initializer, prompt, learning rate).
        cfg: the run config (``dpsgd-*`` keys, ``site-dataset-size``, ``target-epsilon``/``-delta``,
            ``noise-multiplier``, ``privacy-randomness``, ``seed``).
        global_embedding: the server's current embedding, float [D].
        state: the site's persistent Flower ``context.state``; holds its accountant.
        site_index: the site's index (its privacy scope is ``site-<index>``).
        round_index: the server's round number (labels and seeds only).

    Returns:
        The trained embedding (float32 [D], CPU) and metrics: the public ones (the site's
        record-level epsilon over all its rounds so far (PRV; inf when non-private), z, q,
        this round's steps and the site index) and the mean training loss, a diagnostic that
        leaves the site only if it opts in (``client.app.site_report``).

    Raises:
        ValueError: the round would take the site above ``target-epsilon`` (nothing is
            trained, nothing is spent), the site holds more images than the declared
            ``site-dataset-size`` (:class:`~common.dp.dpsgd.DeclaredSizeExceeded`, every round,
            before anything is spent), or the inputs are malformed.
    """
    dim = initializer_vector(pipe, settings).numel()
    start = global_embedding.detach().reshape(-1)
    if start.numel() != dim or not torch.isfinite(start).all():
        raise ValueError(f"site {site_index}: the server's embedding must be {dim} finite numbers, "
                         f"got shape {tuple(global_embedding.shape)} (finite: {bool(torch.isfinite(start).all())})")
    schedule = ti_schedule(cfg)
    schedule.check_site_size(len(images), f"site {site_index}")  # before anything is spent
    q = schedule.sample_rate
    z, eps = begin_round(state, schedule.budget, sample_rate=q, steps=schedule.steps_per_round,
                         site_index=site_index, round_index=round_index)

    vector, losses = _train_round(pipe, images, settings, cfg, start, z=z, schedule=schedule, private=cfg.private,
                                  site_index=site_index, round_index=round_index)
    metrics: dict[str, float | int] = {
        keys.SITE_EPSILON: float(eps),
        keys.SITE_NOISE_MULTIPLIER: float(z),
        keys.SITE_SAMPLE_RATE: float(q),
        keys.SITE_STEPS: int(cfg.dpsgd_local_steps),
        keys.SITE_INDEX: int(site_index),
        # a diagnostic (not private): sent only if the site opts in (client.app.site_report)
        keys.DIAG_LOSS: mean_loss(losses),
    }
    log.info("site %d round %d: DP-SGD z=%.4g q=%.4g C=%g, %d step(s), site epsilon %.4g, noise %s",
             site_index, round_index, z, q, cfg.dpsgd_max_grad_norm, cfg.dpsgd_local_steps, eps,
             "os.urandom" if cfg.secret_randomness else "seeded-insecure (NOT private)")
    return vector, metrics


def _train_round(pipe, images: SiteImages, settings: TISettings, cfg: RunConfig, global_embedding: torch.Tensor,
                 *, z: float, schedule: DPSGDSchedule, private: bool, site_index: int,
                 round_index: int) -> tuple[torch.Tensor, list[float]]:
    """``dpsgd-local-steps`` DP-SGD steps on Poisson batches at the schedule's public q over
    the site's actual images; the clipped sum is divided by the public q*D (Abadi et al. 2016).
    Returns the trained embedding and the mean loss of every non-empty Poisson batch."""
    n, q = len(images), schedule.sample_rate
    device = pipe.unet.device
    start = global_embedding.detach().reshape(-1)
    # random draws: latents/diffusion noise (training), batches and DP noise (both secret)
    training, sampling, noise = dpsgd_draws(cfg.seed, "dpsgd", device, site_index, round_index,
                                            secret=cfg.secret_randomness)

    # a site without usable images takes the same noise-only steps (every Poisson batch is empty)
    # rather than refusing: whether it holds an image must not decide whether it answers
    dist = encode_latents(pipe.vae, images.pixels, batch_size=settings.batch_size) if n else None
    with placeholder_rows(pipe, settings, num_rows=1) as table:
        with torch.no_grad():
            table.rows.weight.copy_(start.reshape(1, -1).to(table.rows.weight))
        # tokenize only now: the placeholder token exists from here on
        ids = tokenize(pipe, build_prompts(images.captions, settings)).to(device) if n else None
        adam = torch.optim.Adam([table.rows.weight], lr=settings.learning_rate)
        hooks = attach_per_sample_grads(table) if private else None
        optimizer = (NoiseSourceDPOptimizer(adam, noise=noise, noise_multiplier=z, max_grad_norm=cfg.dpsgd_max_grad_norm,
                                            expected_batch_size=schedule.expected_batch_size)
                     if private else adam)
        losses: list[float] = []
        try:
            for _ in range(cfg.dpsgd_local_steps):
                # Poisson batch: each image independently with probability q
                loss = poisson_step(optimizer, poisson_sample(n, q, sampling).to(device), private=private,
                                    loss_fn=lambda keep: batch_losses(pipe, table, ids[keep], dist.sample(training, keep),
                                                                      training).mean())
                if loss is not None:
                    losses.append(loss)
        finally:
            optimizer.zero_grad(set_to_none=True)
            if hooks is not None:
                hooks.cleanup()  # removes Opacus' hooks and its attributes on the row
        vector = table.rows.weight.detach().float().cpu().reshape(-1).clone()
    if not torch.isfinite(vector).all():
        raise ValueError(f"site {site_index}: DP-SGD produced NaN or infinite entries in round {round_index}")
    return vector, losses
