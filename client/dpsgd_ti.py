"""DP-SGD textual inversion on one site: the baseline of Peetathawatchai et al. 2024.

The paper's baseline (arXiv 2411.14639, Sec. 5) trains ONE shared textual-inversion
embedding over the whole private dataset with DP-SGD (Abadi et al., "Deep Learning with
Differential Privacy", CCS 2016) using Opacus. Federated here, one round on a site is:

1. copy the server's global embedding into a single trainable placeholder row;
2. for ``dpsgd-local-steps`` steps: Poisson-sample the site's images at rate
   q = dpsgd-batch-size / n_site, compute each sampled image's denoising loss, let Opacus
   compute per-sample gradients of the row (hooks on the row's own ``nn.Embedding`` only:
   [B, 1, D], not [B, vocabulary, D]), clip each to L2 norm C = dpsgd-max-grad-norm, sum,
   add N(0, (zC)^2 I), divide by the expected batch size and take an Adam step;
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
    privadapt), plugged into Opacus' ``DPOptimizer``: seeded per site and round for tests
    and replay, read from ``os.urandom`` when ``secure-noise`` is set. Opacus' own
    ``secure_mode`` needs torchcsprng, which is not installed.

    The sample rate q = B / n_site follows Opacus' convention of treating the site's image
    count as public; the site reports q to the server (it needs it for the ledger), which
    therefore learns n_site.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ConfigRecord, RecordDict
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

from client.dpagg import poisson_sample, sampling_generator
from client.ti import TISettings, build_prompts, initializer_vector, placeholder_rows, tokenize
from common import keys
from common.config import RunConfig
from common.data import SiteImages
from common.diffusion import denoising_loss, encode_latents
from common.dp import NoiseSource, PrivacyEvent, calibrate_noise_multiplier, epsilon
from common.paths import derive_seed
from common.textual_inversion import PlaceholderEmbedding

log = logging.getLogger("privadapt.client")

STATE_KEY = "privadapt-dpsgd"  # ConfigRecord in context.state holding the site's accountant


# ---- the site's accountant, persisted across rounds ------------------------------------

@dataclass(frozen=True)
class SiteRound:
    """One round of DP-SGD on a site, as its accountant sees it."""

    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int

    def event(self, site_index: int) -> PrivacyEvent:
        return PrivacyEvent(
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
            steps=self.steps,
            unit="record",
            scope=f"site-{site_index}",
            label=f"dp-sgd site {site_index} round {self.round}",
        )


def load_history(state: RecordDict) -> list[SiteRound]:
    """The rounds this site has already spent (empty on the first round)."""
    record = state.get(STATE_KEY)
    if record is None:
        return []
    return [SiteRound(**entry) for entry in json.loads(str(record["history"]))]


def save_history(state: RecordDict, history: list[SiteRound], calibration: dict[str, Any] | None) -> None:
    record = ConfigRecord({
        "history": json.dumps([vars(h) for h in history]),
        "calibration": json.dumps(calibration),
    })
    state[STATE_KEY] = record


def site_epsilon(history: list[SiteRound], site_index: int, delta: float, accountant: str = "prv") -> float:
    """Record-level epsilon of all of this site's rounds composed (inf if any had no noise).

    Rounds with the same (z, q) are merged into one event of their total steps first: the
    same composition (it is commutative), and the PRV accountant is faster on it."""
    steps: dict[tuple[float, float], int] = {}
    for h in history:
        steps[(h.noise_multiplier, h.sample_rate)] = steps.get((h.noise_multiplier, h.sample_rate), 0) + h.steps
    merged = [SiteRound(round=-1, noise_multiplier=z, sample_rate=q, steps=k).event(site_index)
              for (z, q), k in steps.items()]
    return epsilon(merged, delta, accountant)  # type: ignore[arg-type]


def site_sample_rate(batch_size: int, num_images: int) -> float:
    """Poisson rate q giving an expected batch of ``batch_size`` (1 if the site has fewer)."""
    if num_images < 1:
        raise ValueError("a site needs at least one image")
    return min(1.0, batch_size / num_images)


def site_noise_multiplier(cfg: RunConfig, sample_rate: float, state: RecordDict) -> float:
    """z for every round of this site: 0 when non-private, the run config's explicit
    ``noise-multiplier`` if >= 0, else calibrated (PRV) so that ``dpsgd-rounds`` x
    ``dpsgd-local-steps`` steps at rate q reach ``target-epsilon``. The calibration is
    cached in ``state`` (it is deterministic in public settings and costs seconds)."""
    if not cfg.private:
        return 0.0
    if cfg.noise_multiplier >= 0:
        return float(cfg.noise_multiplier)
    key = _calibration_key(cfg, sample_rate)
    record = state.get(STATE_KEY)
    cached = json.loads(str(record["calibration"])) if record is not None else None
    if cached and cached.get("key") == key:
        return float(cached["noise_multiplier"])
    return calibrate_noise_multiplier(cfg.target_epsilon, cfg.target_delta, sample_rate,
                                      steps=key["steps"], unit="record", accountant="prv")


def _calibration_key(cfg: RunConfig, sample_rate: float) -> dict[str, float | int]:
    return {"target_epsilon": cfg.target_epsilon, "delta": cfg.target_delta, "sample_rate": sample_rate,
            "steps": cfg.dpsgd_rounds * cfg.dpsgd_local_steps}


# ---- Opacus pieces ----------------------------------------------------------------------

class NoiseSourceDPOptimizer(DPOptimizer):
    """Opacus' DPOptimizer (per-sample clipping, sum, noise, scaling by the expected batch
    size) with the Gaussian noise drawn from a :class:`~common.dp.NoiseSource`.

    Only ``add_noise`` differs from Opacus 1.6: it adds N(0, (z*C)^2) per coordinate of the
    clipped sum, as Opacus does, but from privadapt's explicit noise source.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, noise: NoiseSource, noise_multiplier: float,
                 max_grad_norm: float, expected_batch_size: int) -> None:
        super().__init__(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                         expected_batch_size=expected_batch_size, loss_reduction="mean")
        self.noise = noise

    def add_noise(self) -> None:
        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            noise = self.noise.normal(p.summed_grad.shape, std).to(device=p.summed_grad.device, dtype=p.summed_grad.dtype)
            p.grad = (p.summed_grad + noise).view_as(p)
            _mark_as_processed(p.summed_grad)

    def empty_batch_step(self) -> None:
        """A step on an empty Poisson batch: the clipped sum is zero, the noise is not.

        Skipping the step would reveal that the batch was empty; Opacus' DPDataLoader
        yields empty batches for the same reason."""
        for p in self.params:
            p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
        self.step()


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
        cfg: the run config (``dpsgd-*`` keys, ``target-epsilon``/``-delta``,
            ``noise-multiplier``, ``secure-noise``, ``seed``).
        global_embedding: the server's current embedding, float [D].
        state: the site's persistent Flower ``context.state``; holds its accountant.
        site_index: the site's index (its privacy scope is ``site-<index>``).
        round_index: the server's round number (labels and seeds only).

    Returns:
        The trained embedding (float32 [D], CPU) and public metrics: the site's record-level
        epsilon over all its rounds so far (PRV; inf when non-private), z, q, this round's
        steps and the site index.

    Raises:
        ValueError: the round would take the site above ``target-epsilon`` (nothing is
            trained, nothing is spent), or the inputs are malformed.
    """
    dim = initializer_vector(pipe, settings).numel()
    start = global_embedding.detach().reshape(-1)
    if start.numel() != dim or not torch.isfinite(start).all():
        raise ValueError(f"site {site_index}: the server's embedding must be {dim} finite numbers, "
                         f"got shape {tuple(global_embedding.shape)} (finite: {bool(torch.isfinite(start).all())})")
    n = len(images)
    q = site_sample_rate(cfg.dpsgd_batch_size, n)
    z = site_noise_multiplier(cfg, q, state)
    private = cfg.private
    calibration = {"key": _calibration_key(cfg, q), "noise_multiplier": z} if private and cfg.noise_multiplier < 0 else None

    # the accountant: refuse before training if this round would exceed the target
    history = load_history(state) + [SiteRound(round=int(round_index), noise_multiplier=z, sample_rate=q,
                                               steps=cfg.dpsgd_local_steps)]
    eps = site_epsilon(history, site_index, cfg.target_delta) if private else math.inf
    if private and eps > cfg.target_epsilon:
        raise ValueError(
            f"site {site_index}: DP-SGD round {round_index} would bring this site's record-level epsilon to "
            f"{eps:.4f} (PRV, delta {cfg.target_delta:g}; {len(history)} round(s) at z={z:.4g}, q={q:.4g}, "
            f"{cfg.dpsgd_local_steps} step(s) each), above target-epsilon {cfg.target_epsilon}: refusing to train"
        )
    # spent from here on, even if training fails midway (conservative)
    save_history(state, history, calibration)

    vector = _train_round(pipe, images, settings, cfg, start, z=z, q=q, private=private,
                          site_index=site_index, round_index=round_index)
    metrics: dict[str, float | int] = {
        keys.SITE_EPSILON: float(eps),
        keys.SITE_NOISE_MULTIPLIER: float(z),
        keys.SITE_SAMPLE_RATE: float(q),
        keys.SITE_STEPS: int(cfg.dpsgd_local_steps),
        keys.SITE_INDEX: int(site_index),
    }
    log.info("site %d round %d: DP-SGD z=%.4g q=%.4g C=%g, %d step(s), site epsilon %.4g, noise %s",
             site_index, round_index, z, q, cfg.dpsgd_max_grad_norm, cfg.dpsgd_local_steps, eps,
             "os.urandom (secure)" if cfg.secure_noise else "seeded (not secure)")
    return vector, metrics


def _train_round(pipe, images: SiteImages, settings: TISettings, cfg: RunConfig, global_embedding: torch.Tensor,
                 *, z: float, q: float, private: bool, site_index: int, round_index: int) -> torch.Tensor:
    n = len(images)
    device = pipe.unet.device
    start = global_embedding.detach().reshape(-1)
    # random draws: latents/diffusion noise (training), batches and DP noise (both secret)
    training = torch.Generator(device=device)
    training.manual_seed(derive_seed(cfg.seed, "dpsgd-train", site_index, round_index))
    if cfg.secure_noise:
        sampling, noise = sampling_generator(None), NoiseSource.secure()
    else:
        sampling = sampling_generator(derive_seed(cfg.seed, "dpsgd-sample", site_index, round_index))
        noise = NoiseSource.seeded(derive_seed(cfg.seed, "dpsgd", site_index, round_index))

    dist = encode_latents(pipe.vae, images.pixels, batch_size=settings.batch_size)
    with placeholder_rows(pipe, settings, num_rows=1) as table:
        with torch.no_grad():
            table.rows.weight.copy_(start.reshape(1, -1).to(table.rows.weight))
        # tokenize only now: the placeholder token exists from here on
        ids = tokenize(pipe, build_prompts(images.captions, settings)).to(device)
        adam = torch.optim.Adam([table.rows.weight], lr=settings.learning_rate)
        hooks = attach_per_sample_grads(table) if private else None
        optimizer = (NoiseSourceDPOptimizer(adam, noise=noise, noise_multiplier=z, max_grad_norm=cfg.dpsgd_max_grad_norm,
                                            expected_batch_size=min(cfg.dpsgd_batch_size, n))
                     if private else adam)
        try:
            for _ in range(cfg.dpsgd_local_steps):
                optimizer.zero_grad(set_to_none=True)
                # Poisson batch: each image independently with probability q
                keep = poisson_sample(n, q, sampling).to(device)
                if len(keep) == 0:
                    if private:
                        optimizer.empty_batch_step()
                    continue
                latents = dist.sample(training, keep)
                # mean over the batch: Opacus rescales by the actual B to get per-sample gradients
                loss = batch_losses(pipe, table, ids[keep], latents, training).mean()
                with warnings.catch_warnings():
                    # the row table's input is token indices: PyTorch notes that no input needs a gradient
                    warnings.filterwarnings("ignore", message="Full backward hook is firing")
                    loss.backward()
                optimizer.step()
        finally:
            optimizer.zero_grad(set_to_none=True)
            if hooks is not None:
                hooks.cleanup()  # removes Opacus' hooks and its attributes on the row
        vector = table.rows.weight.detach().float().cpu().reshape(-1).clone()
    if not torch.isfinite(vector).all():
        raise ValueError(f"site {site_index}: DP-SGD produced NaN or infinite entries in round {round_index}")
    return vector
