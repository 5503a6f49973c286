"""SMP-LoRA inside DP-SGD (LoRA defense ``smp-dp-sgd``): an empirical defence under a formal one.

Stable PrivateLoRA (Luo et al., arXiv 2402.11989; :mod:`client.smp`) trains the adapter
against a proxy membership attacker h kept on the site; DP-SGD (Abadi et al., CCS 2016;
:mod:`client.dpsgd_lora`) bounds what one image can change. Here both run at once, and the
record-level epsilon covers EVERY image of the site: the members that train the adapter and
the images the attacker learns from (its members and its non-members alike).

Splits. Each image goes to D^m_aux, D^m_te, D^nm_aux or D^nm_te by its own name alone
(:func:`client.smp.split_members_by_name`): adding or removing one image moves no other image
between splits, as add/remove adjacency needs (a permutation of range(n) would reshuffle them all).

Every local step runs two DP-SGD mechanisms, both Poisson-sampled per image at the public
q = dpsgd-batch-size / D (D: the declared ``site-dataset-size``), clipped to
C = dpsgd-max-grad-norm, noised with N(0, (zC)^2 I) from the site's secret noise source and
divided by the public expected batch size q*D:

1. the attacker's step, over A = D^m_aux ∪ D^nm_aux (labels y_j: member / non-member), on
   h's weights φ, with the UNet's per-element squared denoising errors f_j(θ) as features
   (no gradient to the adapter θ)::

       g_j = ∇_φ CE(h_φ(f_j(θ)), y_j),   φ ← Adam(φ, (Σ_{j∈S_A} clip_C(g_j) + N(0, z²C²I)) / (qD))

2. the adapter's step, over the members M = D^m_aux ∪ D^m_te, on the per-member SMP loss
   (h frozen, eval mode)::

       ℓ_i(θ) = L_ada(x_i; θ) / (1 + λ·CE_i(θ) + δ),   CE_i(θ) = -log h(member | f_i(θ)),   δ = 1e-5
       g_i = ∇_θ ℓ_i,   θ ← AdamW(θ, (Σ_{i∈S_M} clip_C(g_i) + N(0, z²C²I)) / (qD))

   L_ada and f_i are member i's own two draws (timestep and noise), from one UNet call of 2B
   rows (rows i and B+i are member i's); the clipped g_i is the gradient of the WHOLE per-member
   objective, through L_ada and through the attacker's term, so it is exactly member i's
   per-sample gradient (:class:`MemberRowsDPOptimizer` folds its two rows before clipping).
   SMP-LoRA's batch loss is the ratio of batch means, mean L_ada / (1 + λ·mean CE + δ), which
   couples the batch's members and has no per-member gradient; the mean of per-member ratios
   keeps its point (each member's adaptation gradient rescaled by 1 / (1 + λ·CE_i + δ)).

Why the attacker is private too. h is a function of the images it trained on. Were its step
not clipped and noised per image, removing one image of A would change h and, through h, every
member's clipped gradient, so the adapter's step would no longer have sensitivity C and the
record-level claim would fail for every image h saw (the non-members included). With both
steps private, each step is a subsampled Gaussian mechanism of sensitivity C under add/remove
of one image, given the previous steps' noisy outputs (h and θ are post-processing of them),
so the site's accountant composes 2 x local-steps steps at (z, q) per round
(:data:`common.config.DPSGD_MECHANISMS_PER_STEP`): an image in D^m_aux is in both, which is the
worst case, and the one epsilon covers every image. D^nm_te never trains anything; it only
scores h at the end of the round, a diagnostic that leaves the site only with the operator's
``site-diagnostics = true`` (not covered, like every diagnostic).

h and its Adam state stay in the site's ``context.state`` (:data:`client.app.ATTACKER_KEY`)
and never leave the site; the reply is the adapter's delta (clipped again and noised by the
server, site-level DP-FedAvg) and the public (z, q, steps) of the site's spend.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from flwr.app import RecordDict
from opacus import GradSampleModule

from client.dpsgd_lora import begin_site_round, per_sample_unet
from client.lora_train import proxy_attacker
from client.site_accountant import NoiseSourceDPOptimizer, mean_loss, poisson_step
from client.smp import (
    MEMBER,
    NONMEMBER,
    SMP_DELTA,
    ProxyAttacker,
    attack_features,
    attacker_accuracy,
    attacker_to_bytes,
    frozen,
    seeded_from,
    split_members_by_name,
)
from common import keys
from common.config import RunConfig
from common.data import SiteImages
from common.diffusion import denoising_error, per_sample_mean
from common.dp.dpsgd import DPSGDBudget
from common.dp.sampling import poisson_sample
from common.lora import LoRASpec, training_adapter
from common.paths import derive_seed

log = logging.getLogger("privadapt.client")

ROWS_PER_MEMBER = 2  # member i's rows in the adapter step's UNet call: its L_ada draw and its attacker draw


def per_member_smp_loss(h: ProxyAttacker, unet, scheduler, latents: torch.Tensor, hidden: torch.Tensor,
                        generator: torch.Generator | None, lam: float, delta: float = SMP_DELTA) -> torch.Tensor:
    """ℓ_i = L_ada,i / (1 + λ·CE_i + δ) for each member i of the batch, shape [B].

    One UNet call of 2B rows: row i gives L_ada,i, row B+i (its own timestep and noise) the
    features of CE_i = -log h(member | f_i). ℓ_i depends on member i's image alone."""
    batch = latents.shape[0]
    error = denoising_error(unet, scheduler, torch.cat([latents, latents]), torch.cat([hidden, hidden]), generator)
    l_ada = per_sample_mean(error[:batch])
    ce = -F.log_softmax(h(error[batch:].flatten(1)), dim=1)[:, MEMBER]
    return l_ada / (1 + lam * ce + delta)


class MemberRowsDPOptimizer(NoiseSourceDPOptimizer):
    """DP-SGD whose records span ``rows_per_member`` rows of the batch (rows i, B+i, ...).

    Opacus computes one gradient per ROW; clipping must bound one per MEMBER, so the rows
    are folded first. Opacus (``loss_reduction="mean"``) scales row r by the row count R*B, as
    for a mean over rows; the loss is the mean over the B members, so member i's gradient is
    ∇ℓ_i = (1/R) Σ_k grad_sample[k*B + i]. Then clipping, noise and scaling are Opacus'."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, rows_per_member: int, **kwargs) -> None:
        super().__init__(optimizer, **kwargs)
        self.rows_per_member = rows_per_member

    def clip_and_accumulate(self) -> None:
        r = self.rows_per_member
        for p in self.params:
            rows = p.grad_sample
            p.grad_sample = rows.reshape(r, rows.shape[0] // r, *rows.shape[1:]).mean(dim=0)
        super().clip_and_accumulate()


@contextmanager
def per_sample_attacker(h: ProxyAttacker, private: bool) -> Iterator[torch.nn.Module]:
    """h with Opacus' per-sample hooks for one attacker step (removed afterwards), or h itself."""
    if not private:
        yield h
        return
    wrapped = GradSampleModule(h, batch_first=True, loss_reduction="mean")
    try:
        yield wrapped
    finally:
        wrapped.cleanup()


def attacker_features_count(pipe, resolution: int) -> int:
    """h's input size C*H*W of the latents at ``resolution``: public, so a site without images
    builds the same h."""
    return int(pipe.unet.config.in_channels) * (resolution // pipe.vae_scale_factor) ** 2


def smp_dpsgd_round(
    pipe,
    spec: LoRASpec,
    images: SiteImages,
    cfg: RunConfig,
    *,
    state: RecordDict,
    site_index: int,
    round_index: int,
    attacker_state: bytes | None,
    budget: DPSGDBudget | None = None,
) -> tuple[dict[str, float | int], bytes]:
    """Train the attached adapter in place for ``local-steps`` SMP-in-DP-SGD steps.

    Returns the public spend (z, q, steps = 2 x local-steps, site index, the site's
    record-level epsilon over all its rounds), the diagnostics (mean adaptation loss, h's
    balanced accuracy on the te splits) and h's new state for ``context.state``. Raises
    ValueError, spending and training nothing, if the round would exceed the site's target or
    the site holds more images than declared. ``budget`` overrides the plan (benchmarks)."""
    start = begin_site_round(pipe, spec, images, cfg, state=state, site_index=site_index, round_index=round_index,
                             budget=budget, label="lora-smp-dpsgd")
    schedule, z, eps, q = start.schedule, start.noise_multiplier, start.epsilon, start.schedule.sample_rate
    training, sampling, noise, dist, hidden_all = start.training, start.sampling, start.noise, start.dist, start.hidden
    device = pipe.unet.device
    splits = split_members_by_name(images.names, member_fraction=cfg.member_fraction, aux_fraction=cfg.aux_fraction,
                                   seed=derive_seed(cfg.seed, "member-split", site_index))
    members = splits.members.to(device)
    aux = torch.cat([splits.member_aux, splits.nonmember_aux]).to(device)
    aux_labels = torch.cat([torch.full((splits.member_aux.numel(),), MEMBER),
                            torch.full((splits.nonmember_aux.numel(),), NONMEMBER)]).to(device)

    h, h_adam = proxy_attacker(attacker_state, attacker_features_count(pipe, cfg.resolution), training, device,
                               lr=cfg.attacker_learning_rate, weight_decay=cfg.attacker_weight_decay)
    private = schedule.budget.private
    dp = {"noise": noise, "noise_multiplier": z, "max_grad_norm": cfg.dpsgd_max_grad_norm,
          "expected_batch_size": schedule.expected_batch_size}
    attacker_opt = NoiseSourceDPOptimizer(h_adam, **dp) if private else h_adam

    def attacker_loss(model: torch.nn.Module, keep: torch.Tensor) -> torch.Tensor:
        index = aux[keep]
        features = attack_features(pipe.unet, pipe.scheduler, dist.sample(training, index), hidden_all[index],
                                   training, grad=False)
        with seeded_from(training):  # h's dropout
            return F.cross_entropy(model(features), aux_labels[keep])  # mean: Opacus rescales per sample

    def adapter_loss(unet, keep: torch.Tensor) -> torch.Tensor:
        index = members[keep]
        return per_member_smp_loss(h, unet, pipe.scheduler, dist.sample(training, index), hidden_all[index], training,
                                   cfg.smp_lambda).mean()

    losses: list[float] = []
    with training_adapter(pipe, spec) as params:  # set before Opacus hooks the trained layers (FFA-LoRA: B only)
        adamw = torch.optim.AdamW(params, lr=cfg.lora_learning_rate)
        unet = per_sample_unet(pipe) if private else pipe.unet
        adapter_opt = MemberRowsDPOptimizer(adamw, rows_per_member=ROWS_PER_MEMBER, **dp) if private else adamw
        try:
            for _ in range(cfg.local_steps):
                # 1. the attacker's DP-SGD step on a Poisson batch of D^m_aux ∪ D^nm_aux (adapter frozen)
                h.train()
                with per_sample_attacker(h, private) as model:
                    poisson_step(attacker_opt, poisson_sample(aux.numel(), q, sampling).to(device), private=private,
                                 loss_fn=lambda keep: attacker_loss(model, keep))
                # 2. the adapter's DP-SGD step on a Poisson batch of the members (h frozen)
                with frozen(h):
                    loss = poisson_step(adapter_opt, poisson_sample(members.numel(), q, sampling).to(device),
                                        private=private, loss_fn=lambda keep: adapter_loss(unet, keep))
                if loss is not None:
                    losses.append(loss)
        finally:
            adapter_opt.zero_grad(set_to_none=True)
            attacker_opt.zero_grad(set_to_none=True)
            if private:
                unet.cleanup()  # removes Opacus' hooks and its attributes
            pipe.unet.eval()
    if not all(torch.isfinite(p).all() for p in params):
        raise ValueError(f"site {site_index}: SMP DP-SGD produced NaN or infinite LoRA weights in round {round_index}")
    log.info("site %d round %d: LoRA SMP inside DP-SGD z=%.4g q=%.4g C=%g, %d step(s) (attacker + adapter), site "
             "record epsilon %.4g", site_index, round_index, z, q, cfg.dpsgd_max_grad_norm, cfg.local_steps, eps)
    metrics: dict[str, float | int] = {
        keys.SITE_EPSILON: float(eps),
        keys.SITE_NOISE_MULTIPLIER: float(z),
        keys.SITE_SAMPLE_RATE: float(q),
        keys.SITE_STEPS: int(schedule.steps_per_round),
        keys.SITE_INDEX: int(site_index),
        keys.DIAG_LOSS: mean_loss(losses),
        keys.DIAG_ATTACKER_ACCURACY: _score(pipe, h, dist, hidden_all, splits, training, cfg.dpsgd_batch_size),
    }
    return metrics, attacker_to_bytes(h, h_adam)


def _score(pipe, h: ProxyAttacker, dist, hidden_all, splits, generator: torch.Generator, batch_size: int) -> float:
    """h's balanced accuracy on D^m_te / D^nm_te against the trained adapter (NaN if one is empty):
    a diagnostic, never private."""
    members, nonmembers = splits.member_te.to(pipe.unet.device), splits.nonmember_te.to(pipe.unet.device)
    if not members.numel() or not nonmembers.numel():
        return float("nan")
    return attacker_accuracy(h, pipe.unet, pipe.scheduler, dist.sample(generator, members), hidden_all[members],
                             dist.sample(generator, nonmembers), hidden_all[nonmembers], generator,
                             batch_size=batch_size)
