"""Membership-inference attacks on a run's release: ``run_attacks`` -> the attacks.json dict.

Attacks (higher score = member; all white-box on the released adapter and the public base):

- ``loss``: the denoising loss at one timestep, averaged over fixed noise draws (Matsumoto et
  al. 2023); the best timestep of a grid is reported (chosen in hindsight on the evaluation
  set, so optimistic; every timestep's AUC is in the details).
- ``loss-calibrated``: the same with the base model's loss subtracted (difficulty calibration,
  Carlini et al. 2023 / Watson et al. 2022): removes how hard each image is for any model.
- ``pia``: PIA, two queries per image (Kong et al. 2024), best timestep of the grid.
- ``secmi-stat``: SecMI's t-error after deterministic DDIM inversion (Duan et al. 2023).
- ``proxy-h``: the SMP-LoRA paper's h', a fresh MLP trained on D_aux against the final model
  and scored on D_te only (Luo et al. 2025).
- ``lira``: LiRA with shadow adapters (Carlini et al. 2022), see :mod:`evaluation.lira`
  (opt-in: it trains adapters).

Site-level inference (:mod:`evaluation.site_inference`) reuses the calibrated loss,
averaged over timesteps (no hindsight choice), per site.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from common.data import SiteImages
from evaluation import metrics, queries
from evaluation.proxy import ProxySettings, train_and_score
from evaluation.scores import denoising_errors, encode
from evaluation.site_inference import site_scores
from evaluation.splits import Population, load_folders, population, run_config, run_splits
from evaluation.target import Target, load_target

log = logging.getLogger("privadapt.evaluation")

DEFAULT_ATTACKS = ("loss", "loss-calibrated", "pia", "secmi-stat", "proxy-h")
ALL_ATTACKS = DEFAULT_ATTACKS + ("lira",)
# the attack of the same kind as the proxy attacker h that MP-/SMP-LoRA train against (an MLP on
# the per-element denoising error); every other attack is one the defence never saw
SEEN_BY_PROXY_DEFENSES = ("proxy-h",)


def defense_exposure(defense: str, records: Sequence[dict]) -> dict | None:
    """Which of the attacks run the run's defence trained against and which it never saw; None
    for a run without a proxy-attacker defence."""
    from common.config import PROXY_ATTACKER_DEFENSES

    if defense not in PROXY_ATTACKER_DEFENSES:
        return None
    names = [r["name"] for r in records]
    return {"defense": defense, "trained_against": [n for n in names if n in SEEN_BY_PROXY_DEFENSES],
            "never_seen": [n for n in names if n not in SEEN_BY_PROXY_DEFENSES]}
TIMESTEPS = (10, 50, 100, 200, 300, 500)
PIA_TIMESTEPS = (50, 100, 200, 300)
MIN_SITES = 2  # per class, for site-level inference (with one each the AUC is 0 or 1)

ImageInput = Sequence[str | Path] | Sequence[SiteImages] | None


def _images(sets: ImageInput, resolution: int) -> list[SiteImages]:
    if sets and all(isinstance(s, SiteImages) for s in sets):
        return list(sets)
    return load_folders(list(sets or []), resolution)


def _best_timestep(name: str, scores: np.ndarray, labels: np.ndarray, timesteps: Sequence[int], *, delta: float,
                   seed: int, extra: dict | None = None) -> dict:
    """The record of the column (timestep) with the highest AUC, every column's AUC in details."""
    aucs = [metrics.auc(scores[:, j], labels) for j in range(scores.shape[1])]
    best = int(np.argmax(aucs))
    details = {"timestep": int(timesteps[best]), "auc_by_timestep": dict(zip(map(str, timesteps), aucs)),
               "selection": "best timestep chosen in hindsight on the evaluation set (optimistic)", **(extra or {})}
    return metrics.summarize(name, scores[:, best], labels, delta=delta, details=details, seed=seed)


def run_attacks(run_dir: str | Path, members: ImageInput = None, non_members: ImageInput = None, *,
                attacks: Sequence[str] | None = None, seed: int = 0, progress: bool = True, draws: int = 4,
                timesteps: Sequence[int] = TIMESTEPS, proxy: ProxySettings = ProxySettings(),
                lira_shadows: int = 8, device: str = "cpu") -> dict:
    """Score every requested attack on the run's release; returns the attacks.json dict.

    ``members`` / ``non_members``: image folders (or loaded :class:`SiteImages`) the run did /
    did not train on, from the same distribution. Both None: rebuilt from an MP-/SMP-LoRA
    run's own splits (:func:`evaluation.splits.run_splits`). Each folder is one site
    for site-level inference.
    """
    chosen = list(attacks or DEFAULT_ATTACKS)
    unknown = sorted(set(chosen) - set(ALL_ATTACKS))
    if unknown:
        raise ValueError(f"unknown attack(s) {unknown}; choose from {list(ALL_ATTACKS)}")
    cfg = run_config(run_dir)
    if members is None and non_members is None:
        pop = run_splits(run_dir)
    else:
        if not members or not non_members:
            raise ValueError("give both members and non-members (or neither, for an MP-/SMP-LoRA run's own splits)")
        pop = population(_images(members, cfg.resolution), _images(non_members, cfg.resolution),
                         aux_fraction=cfg.aux_fraction, seed=seed)
    target = load_target(run_dir, device=device)
    delta = target.cfg.target_delta
    records, site_records = _score(target, pop, chosen, seed=seed, progress=progress, draws=draws,
                                   timesteps=timesteps, proxy=proxy, delta=delta, lira_shadows=lira_shadows,
                                   run_dir=Path(run_dir))
    return {"run": str(run_dir), "adapter": target.adapter, "members": int(pop.labels.sum()),
            "non_members": int((pop.labels == 0).sum()), "delta": delta, "model": str(target.model_dir),
            "attacks": records, "site_inference": site_records,
            "defense_exposure": defense_exposure(cfg.defense if cfg.adapter == "lora" else "none", records)}


def score_target(target: Target, pop: Population, attacks: Sequence[str] = ("loss", "loss-calibrated", "pia"), *,
                 seed: int = 0, draws: int = 4, timesteps: Sequence[int] = TIMESTEPS,
                 proxy: ProxySettings = ProxySettings(), delta: float | None = None,
                 progress: bool = False) -> tuple[list[dict], list[dict]]:
    """The attacks' records (and the site-level record) on a target already in memory, e.g. a
    base pipeline and an adapted one (:class:`evaluation.target.Target`), without a run
    folder. ``delta`` defaults to the target config's. LiRA needs a run folder (its shadows
    retrain the run's recipe): use :func:`run_attacks` for it."""
    chosen = list(attacks)
    unknown = sorted(set(chosen) - set(DEFAULT_ATTACKS))
    if unknown:
        raise ValueError(f"unknown attack(s) {unknown} for an in-memory target; choose from {list(DEFAULT_ATTACKS)}"
                         " (LiRA: run_attacks on a run folder)")
    return _score(target, pop, chosen, seed=seed, progress=progress, draws=draws, timesteps=timesteps, proxy=proxy,
                  delta=target.cfg.target_delta if delta is None else delta, lira_shadows=0, run_dir=None)


def _score(target: Target, pop: Population, chosen: list[str], *, seed: int, progress: bool, draws: int,
           timesteps: Sequence[int], proxy: ProxySettings, delta: float, lira_shadows: int,
           run_dir: Path | None) -> tuple[list[dict], list[dict]]:
    adapted_prompts, base_prompts = target.prompts(pop.captions)
    data = encode(target.adapted, pop.pixels, adapted_prompts)
    base_data = encode(target.base, pop.pixels, base_prompts)
    unet, sched = target.adapted.unet, target.adapted.scheduler
    labels = pop.labels
    records: list[dict] = []
    losses: dict[str, np.ndarray] = {}

    def loss(which: str) -> np.ndarray:
        """Mean over draws of each image's loss at each timestep [N, T] (computed once)."""
        if not losses:
            losses["adapted"] = denoising_errors(unet, sched, data, timesteps, draws=draws, seed=seed).mean(2).numpy()
            losses["base"] = denoising_errors(target.base.unet, target.base.scheduler, base_data, timesteps,
                                              draws=draws, seed=seed).mean(2).numpy()
        return losses[which]

    bar = tqdm(chosen, desc="attacks", disable=not progress)
    for name in bar:
        bar.set_postfix_str(name)
        if name == "loss":
            records.append(_best_timestep(name, -loss("adapted"), labels, timesteps, delta=delta, seed=seed,
                                          extra={"draws": draws}))
        elif name == "loss-calibrated":
            records.append(_best_timestep(name, loss("base") - loss("adapted"), labels, timesteps, delta=delta, seed=seed,
                                          extra={"draws": draws, "reference": "the base model, same noise"}))
        elif name == "pia":
            scores = queries.pia_scores(unet, sched, data, PIA_TIMESTEPS).numpy()
            records.append(_best_timestep(name, scores, labels, PIA_TIMESTEPS, delta=delta, seed=seed,
                                          extra={"queries_per_image": 2}))
        elif name == "secmi-stat":
            scores = queries.secmi_scores(unet, sched, data).numpy()
            records.append(metrics.summarize(name, scores, labels, delta=delta, seed=seed,
                                             details={"t_sec": 100, "interval": 10}))
        elif name == "proxy-h":
            records.append(_proxy(unet, sched, data, pop, proxy, delta=delta, seed=seed))
        elif name == "lira":
            from evaluation.lira import lira_record

            records.append(lira_record(target, pop, run_dir, shadows=lira_shadows, delta=delta, seed=seed,
                                       draws=draws, progress=progress))
    # site level: calibrated loss averaged over the timestep grid, mean over each site's images
    site_records = [_site_record((loss("base") - loss("adapted")).mean(1), pop, delta=delta, seed=seed)]
    return records, site_records


def _proxy(unet, sched, data, pop: Population, settings: ProxySettings, *, delta: float, seed: int) -> dict:
    try:
        scores, test_labels, details = train_and_score(unet, sched, data, pop.labels, pop.aux, seed=seed,
                                                       settings=settings)
    except ValueError as err:
        return metrics.not_applicable("proxy-h", str(err))
    return metrics.summarize("proxy-h", scores, test_labels, delta=delta, seed=seed,
                             details={**details, "scored_on": "held-out (te) splits only"})


def _site_record(image_scores: np.ndarray, pop: Population, *, delta: float, seed: int) -> dict:
    name = "site-loss-calibrated"
    try:
        scores, site_labels, names = site_scores(image_scores, pop.labels, pop.sites)
    except ValueError as err:
        return metrics.not_applicable(name, str(err))
    took_part = int(site_labels.sum())
    if min(took_part, site_labels.size - took_part) < MIN_SITES:
        return metrics.not_applicable(name, f"{took_part} site(s) that took part and {site_labels.size - took_part} "
                                            f"that did not: site-level inference needs at least {MIN_SITES} of each "
                                            "(give each site's images as a folder; non-participating sites as "
                                            "non-members)")
    return metrics.summarize(name, scores, site_labels, delta=delta, seed=seed,
                             details={"sites": dict(zip(names, scores.tolist())),
                                      "score": "calibrated loss, mean over timesteps and the site's images"})
