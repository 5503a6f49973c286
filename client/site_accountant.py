"""A site's own record-level accountant for DP-SGD, kept across rounds, and the Opacus
optimizer that draws its noise from privadapt's noise source.

Flower's Opacus example builds a fresh PrivacyEngine every round, so its accountant forgets
the rounds before and under-reports. Here the site appends each round's public parameters
(z, q, steps) to a history kept in Flower's ``context.state`` and recomputes its epsilon from
the whole history; it refuses a round that would exceed its target before touching a single
image. Its (z, q) come from public settings only (:mod:`common.dp.dpsgd`: q = batch size /
declared site size), so they are the server's too and reveal nothing of the site's data. Used by the DP-SGD textual-inversion baseline and by LoRA with defense ``dp-sgd``.

DP-SGD: Abadi et al., "Deep Learning with Differential Privacy", CCS 2016; Poisson batches and
add/remove adjacency, accounted by Opacus' PRV (headline) and RDP accountants.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from flwr.app import ConfigRecord, RecordDict
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

from common.dp import BudgetCheck, NoiseSource, PrivacyEvent, epsilon
from common.dp.dpsgd import DPSGDBudget, budget_noise_multiplier
from common.dp.mechanism import site_scope
from common.dp.noise import privacy_noise
from common.dp.sampling import SamplingSource, privacy_sampling
from common.paths import derive_seed

STATE_KEY = "privadapt-dpsgd"  # ConfigRecord in context.state holding the site's accountant


@dataclass(frozen=True)
class SiteRound:
    """One round of DP-SGD on a site, as its accountant sees it."""

    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int

    def event(self, site_index: int) -> PrivacyEvent:
        return PrivacyEvent.dpsgd(self.noise_multiplier, self.sample_rate, self.steps, scope=site_scope(site_index),
                                  label=f"dp-sgd site {site_index} round {self.round}")


def load_history(state: RecordDict) -> list[SiteRound]:
    """The rounds this site has already spent (empty on the first round)."""
    record = state.get(STATE_KEY)
    if record is None:
        return []
    return [SiteRound(**entry) for entry in json.loads(str(record["history"]))]


def save_history(state: RecordDict, history: list[SiteRound], calibration: dict | None) -> None:
    state[STATE_KEY] = ConfigRecord({
        "history": json.dumps([vars(h) for h in history]),
        "calibration": json.dumps(calibration),
    })


def site_epsilon(history: list[SiteRound], site_index: int, delta: float, accountant: str = "prv") -> float:
    """Record-level epsilon of all of this site's rounds composed (inf if any had no noise)."""
    return epsilon([h.event(site_index) for h in history], delta, accountant)  # type: ignore[arg-type]


def _calibration_key(budget: DPSGDBudget, sample_rate: float) -> dict[str, float | int]:
    return {"target_epsilon": budget.target_epsilon, "delta": budget.delta, "sample_rate": sample_rate,
            "steps": budget.total_steps}


def site_noise_multiplier(budget: DPSGDBudget, sample_rate: float, state: RecordDict) -> float:
    """z for every round of this site (:func:`common.dp.dpsgd.budget_noise_multiplier`, the
    server's too). A calibration is cached in ``state``: it is deterministic in public settings
    and costs seconds."""
    if not budget.private or budget.noise_multiplier >= 0:
        return budget_noise_multiplier(budget, sample_rate)
    key = _calibration_key(budget, sample_rate)
    record = state.get(STATE_KEY)
    cached = json.loads(str(record["calibration"])) if record is not None else None
    if cached and cached.get("key") == key:
        return float(cached["noise_multiplier"])
    z = budget_noise_multiplier(budget, sample_rate)
    save_history(state, load_history(state), {"key": key, "noise_multiplier": z})
    return z


def begin_round(state: RecordDict, budget: DPSGDBudget, *, sample_rate: float, steps: int, site_index: int,
                round_index: int) -> tuple[float, float]:
    """Check and record the spend of one round BEFORE training: returns (z, the site's
    epsilon over all its rounds including this one). Raises ValueError, spending nothing,
    if this round would take the site above its target. Once recorded, the round counts as
    spent even if training then fails (conservative)."""
    z = site_noise_multiplier(budget, sample_rate, state)
    spent = load_history(state)
    this = SiteRound(round=int(round_index), noise_multiplier=z, sample_rate=sample_rate, steps=steps)
    history = spent + [this]
    check = BudgetCheck([h.event(site_index) for h in spent], [this.event(site_index)], budget.target_epsilon,
                        budget.delta)
    eps = check.epsilon if budget.private else math.inf
    if check.over:
        raise ValueError(
            f"site {site_index}: DP-SGD round {round_index} would bring this site's record-level epsilon to "
            f"{eps:.4f} (PRV, delta {budget.delta:g}; {len(history)} round(s) at z={z:.4g}, q={sample_rate:.4g}, "
            f"{steps} step(s) each), above its target {budget.target_epsilon}: refusing to train"
        )
    calibration = ({"key": _calibration_key(budget, sample_rate), "noise_multiplier": z}
                   if budget.private and budget.noise_multiplier < 0 else None)
    save_history(state, history, calibration)
    return z, eps


class NoiseSourceDPOptimizer(DPOptimizer):
    """Opacus' DPOptimizer (per-sample clipping, sum, noise, scaling by the expected batch
    size) with the Gaussian noise drawn from a :class:`~common.dp.NoiseSource`.

    ``expected_batch_size`` must be public: q*D from the declared site size D
    (:attr:`common.dp.dpsgd.DPSGDSchedule.expected_batch_size`), never a count of the site's images.

    Only ``add_noise`` differs from Opacus 1.6: it adds N(0, (z*C)^2) per coordinate of the
    clipped sum, as Opacus does, but from privadapt's explicit noise source.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, noise: NoiseSource, noise_multiplier: float,
                 max_grad_norm: float, expected_batch_size: float) -> None:
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


def dpsgd_draws(seed: int, label: str, device, site_index: int, round_index: int, *,
                secret: bool) -> tuple[torch.Generator, SamplingSource, NoiseSource]:
    """The three random sources of a DP-SGD round: training draws (latents, diffusion noise,
    timesteps; on ``device``; from the run seed, ``<label>-train``, site and round: they need
    no secrecy), Poisson batches and DP noise. The last two must stay secret: the OS CSPRNG
    when ``secret`` (``privacy-randomness = "os"``), else derived from the run seed
    (``<label>-sample``, ``<label>``), which makes the round replayable and NOT private."""
    training = torch.Generator(device=device)
    training.manual_seed(derive_seed(seed, f"{label}-train", site_index, round_index))
    return (training, privacy_sampling(secret, seed, f"{label}-sample", site_index, round_index),
            privacy_noise(secret, seed, label, site_index, round_index))


def poisson_step(optimizer: torch.optim.Optimizer, keep: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor],
                 *, private: bool) -> float | None:
    """One optimisation step on a Poisson batch ``keep``; returns the batch's mean loss.

    An empty batch still takes a DP step (noise only, :meth:`NoiseSourceDPOptimizer.empty_batch_step`)
    so that its emptiness is not revealed; without privacy it is skipped. ``loss_fn(keep)`` must
    return the MEAN loss over the batch: Opacus rescales by the actual batch size to get
    per-sample gradients."""
    optimizer.zero_grad(set_to_none=True)
    if len(keep) == 0:
        if private:
            optimizer.empty_batch_step()  # type: ignore[attr-defined]
        return None
    loss = loss_fn(keep)
    with warnings.catch_warnings():
        # Opacus' hooks on layers whose input needs no gradient (token indices, frozen activations)
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        loss.backward()
    optimizer.step()
    return float(loss.detach())


def mean_loss(losses: list[float]) -> float:
    """The mean of a round's batch losses (NaN if every batch was empty): a diagnostic."""
    return sum(losses) / len(losses) if losses else float("nan")
