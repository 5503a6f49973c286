"""Empirical DP audit of privadapt's release path with canaries, in one run.

Protocol (Steinke, Nasr, Jagielski, "Privacy Auditing with One (1) Training Run", NeurIPS
2023, Alg. 1 with "gradient-space" canaries): m canaries, each included independently with
probability 1/2, go through the PRODUCTION mechanism (:class:`common.dp.GaussianSumMechanism`
bounding, summing and releasing with noise from :class:`common.dp.NoiseSource`) together with
background records that are always included. Each canary is a record of norm C along its own
coordinate (a Dirac canary: the worst case for a sum, as in the paper's white-box audits), so
its score, the released total's coordinate, is C * [included and sampled] + noise + nothing
from other records. The auditor guesses "in" for the k+ highest scores and "out" for the k-
lowest, and :mod:`evaluation.one_run` turns the number of right guesses into an
epsilon lower bound at the chosen confidence.

Two units, as in privadapt:
- ``record`` (DPAgg-TI): records are Poisson-sampled with rate q, bounded row by row
  (``bound_rows``) on a site, the site's sum is merged (``add``), and the server releases.
- ``site`` (LoRA DP-FedAvg): a canary SITE contributes its delta, bounded with ``bound_tree``
  (flat L2 over the adapter tree), sampled with rate q each round; rounds compose and the
  score reads the sum of the rounds' releases (the adapter's net change at server lr 1).

What is audited is the mechanism and its composition as the strategies call it, not the
Flower message plumbing around them; and a one-run audit with m canaries cannot certify
more than about log(k) epsilon however leaky the mechanism (Steinke et al., Sec. 6).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch

from common.dp import GaussianSumMechanism, NoiseSource, PrivacyEvent, epsilon
from evaluation.one_run import epsilon_lower_bound

METHOD = "steinke-nasr-jagielski-2023"
KEY = "canary-space"


@dataclass(frozen=True)
class AuditSettings:
    """Canaries, guesses and the statistics of the bound (all data-independent)."""

    canaries: int = 1000
    guesses_in: int = 250  # k+: the highest scores, guessed "in"
    guesses_out: int = 250  # k-: the lowest scores, guessed "out"
    background: int = 100  # records (or sites) that are always included
    confidence: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        if self.canaries < 2:
            raise ValueError(f"canaries must be >= 2, got {self.canaries}")
        if self.guesses_in < 0 or self.guesses_out < 0 or self.guesses_in + self.guesses_out > self.canaries:
            raise ValueError(f"guesses_in ({self.guesses_in}) + guesses_out ({self.guesses_out}) must be between 0 "
                             f"and the number of canaries ({self.canaries})")
        if self.background < 0:
            raise ValueError(f"background must be >= 0, got {self.background}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")


def _background(settings: AuditSettings, dim: int, clip_norm: float, gen: torch.Generator) -> torch.Tensor:
    """Background records: random directions, norm 2C before bounding (so bounding acts)."""
    rows = torch.randn((settings.background, dim), generator=gen, dtype=torch.float64)
    return rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12) * 2 * clip_norm


def _release_round(mechanism: GaussianSumMechanism, canary_in: torch.Tensor, background: torch.Tensor, *,
                   unit: Literal["record", "site"], sample_rate: float, denominator: float, noise: NoiseSource,
                   gen: torch.Generator, label: str) -> tuple[torch.Tensor, PrivacyEvent]:
    """One release over the included canaries and the background, through the mechanism."""
    m = canary_in.numel()
    dim = m + (background.shape[1] - m if background.numel() else 0)
    sampled = canary_in & (torch.rand(m, generator=gen, dtype=torch.float64) < sample_rate)
    idx = sampled.nonzero().flatten()
    canary_rows = torch.zeros((idx.numel(), dim), dtype=torch.float64)
    # 2C along the canary's own axis; bounding brings it to C
    canary_rows[torch.arange(idx.numel()), idx] = 2 * mechanism.clip_norm
    bg_keep = torch.rand(background.shape[0], generator=gen, dtype=torch.float64) < sample_rate
    records = torch.cat([canary_rows, background[bg_keep]])
    total = None
    if unit == "record":
        # DPAgg-TI: a site bounds each sampled record and sends its sum
        total = mechanism.add(total, {KEY: mechanism.bound_rows(records).sum(dim=0)})
    else:
        # DP-FedAvg: every sampled site bounds its whole delta tree; the server sums them
        for row in records:
            total = mechanism.add(total, mechanism.bound_tree({KEY: row}))
    if total is None:
        total = {KEY: torch.zeros(dim, dtype=torch.float64)}
    released, event = mechanism.release(total, denominator=denominator, noise=noise, sample_rate=sample_rate,
                                        unit=unit, label=label)
    return released[KEY], event


def audit_mechanism(
    *,
    clip_norm: float,
    noise_multiplier: float,
    sample_rate: float = 1.0,
    rounds: int = 1,
    unit: Literal["record", "site"] = "record",
    delta: float = 1e-5,
    bound_mode: str = "clip",
    settings: AuditSettings = AuditSettings(),
    noise: NoiseSource | None = None,
) -> dict:
    """Run the canary audit of ``rounds`` releases and return the audit.json record.

    ``accountant_epsilon`` is the PRV epsilon of the events the releases emitted (what the
    run's ledger would hold), None when there is no noise (infinite)."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if unit not in ("record", "site"):
        raise ValueError(f"unit must be 'record' or 'site', got {unit!r}")
    mechanism = GaussianSumMechanism(clip_norm=clip_norm, noise_multiplier=noise_multiplier, bound_mode=bound_mode)
    gen = torch.Generator().manual_seed(settings.seed)
    noise = noise or NoiseSource.seeded(settings.seed + 1)
    m = settings.canaries
    dim = m + 16  # one axis per canary, and a few more for the background to spread over
    background = _background(settings, dim, clip_norm, gen)
    canary_in = torch.rand(m, generator=gen, dtype=torch.float64) < 0.5
    denominator = sample_rate * (m / 2 + settings.background)  # public expected count
    scores = torch.zeros(m, dtype=torch.float64)
    events = []
    for r in range(rounds):
        released, event = _release_round(mechanism, canary_in, background, unit=unit, sample_rate=sample_rate,
                                         denominator=denominator, noise=noise, gen=gen, label=f"audit round {r + 1}")
        scores += released[:m]
        events.append(event)
    return guess_and_bound(scores, canary_in, settings, delta=delta, events=events, unit=unit,
                            noise=noise_multiplier > 0, extra={"rounds": rounds, "sample_rate": sample_rate,
                                                              "noise_multiplier": noise_multiplier,
                                                              "clip_norm": clip_norm})


def guess_and_bound(scores: torch.Tensor, truth: torch.Tensor, settings: AuditSettings, *, delta: float,
                     events: Sequence[PrivacyEvent], unit: str, noise: bool, extra: dict) -> dict:
    """Guess in/out for the top k+ and bottom k- scores, count the right ones, bound epsilon."""
    # ties broken at random (a zero-noise release has many equal scores among the "out")
    jitter = torch.rand(scores.numel(), generator=torch.Generator().manual_seed(settings.seed + 2), dtype=torch.float64)
    order = torch.from_numpy(np.lexsort((jitter.numpy(), scores.numpy())))  # ascending
    out_idx, in_idx = order[: settings.guesses_out], order[scores.numel() - settings.guesses_in:]
    correct = int(truth[in_idx].sum()) + int((~truth[out_idx]).sum())
    guesses = settings.guesses_in + settings.guesses_out
    accountant = epsilon(events, delta, "prv") if noise else math.inf
    return {
        "method": METHOD, "canaries": settings.canaries, "guesses": guesses, "correct": correct,
        "confidence": settings.confidence, "delta": delta,
        "epsilon_lower_bound": epsilon_lower_bound(settings.canaries, guesses, correct, delta=delta,
                                                   confidence=settings.confidence),
        "accountant_epsilon": accountant if math.isfinite(accountant) else None,
        "noise": noise, "unit": unit,
        "details": {**extra, "guesses_in": settings.guesses_in, "guesses_out": settings.guesses_out,
                    "background": settings.background, "included": int(truth.sum()), "seed": settings.seed,
                    "canary": "Dirac (one axis per canary, norm 2C before bounding)",
                    "accountant": "prv", "events": [e.to_dict() for e in events]},
    }


def run_audit(run_dir: str | Path | None = None, *, settings: AuditSettings = AuditSettings(), noise: bool = True,
              **mechanism: float) -> dict:
    """Audit the mechanism of a run (read from ``run_dir``/privacy.json: C, z, q, unit, delta,
    and every release as an event) or of explicit ``clip_norm``, ``noise_multiplier``,
    ``sample_rate``, ``rounds``, ``unit``, ``delta``. ``noise=False`` switches the noise
    off (the audit's power check)."""
    params = dict(mechanism)
    if run_dir is not None:
        params = {**_from_privacy_json(Path(run_dir)), **params}
    if "clip_norm" not in params or "noise_multiplier" not in params:
        raise ValueError("run_audit needs a run folder or clip_norm and noise_multiplier")
    if not noise:
        params["noise_multiplier"] = 0.0
    result = audit_mechanism(settings=settings, **params)
    if run_dir is not None:
        result["run"] = str(run_dir)
    return result


def _from_privacy_json(run_dir: Path) -> dict:
    path = run_dir / "privacy.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a privadapt run's output folder?")
    privacy = json.loads(path.read_text())
    events = [PrivacyEvent.from_dict(e) for e in privacy.get("events", [])]
    if not events:
        raise ValueError(f"{path} records no release (no events): nothing to audit")
    kinds = {(e.noise_multiplier, e.sample_rate, e.unit) for e in events}
    if len(kinds) > 1:
        raise ValueError(f"{path}: releases with different (noise multiplier, sample rate, unit) {sorted(kinds)}; "
                         "the audit replays one kind of release")
    z, q, unit = kinds.pop()
    clip = privacy.get("clip_norm")
    if clip is None:
        raise ValueError(f"{path} has no clip_norm")
    return {"clip_norm": float(clip), "noise_multiplier": z, "sample_rate": q, "unit": unit,
            "rounds": sum(e.steps for e in events), "delta": float(privacy["delta"]),
            "bound_mode": privacy.get("bound", "clip")}
