"""LiRA, the likelihood-ratio attack with shadow adapters (Carlini, Chien, Nasr, Song, Terzis,
Tramèr, "Membership Inference Attacks From First Principles", IEEE S&P 2022).

K shadow LoRAs are trained on random halves of the candidate population (every image in about
half of them). For each image, its statistic under the shadows that trained on it ("in") and
under those that did not ("out") is fitted with a Gaussian; the target model's statistic is
scored by the log-likelihood ratio (online variant) and by how far above the "out" Gaussian it
lies (offline variant, one-sided). With few shadows the variances are pooled over images, as
the paper recommends. The statistic is the calibrated loss (base loss minus adapted loss,
averaged over the timestep grid and fixed noise draws).

Shadows are trained as ONE site's plain local LoRA training for ``rounds x local-steps``
steps with the run's rank, learning rate and batch size: the federated rounds, clipping and
noise of a DP-FedAvg run are not replayed, so against a private run the shadows are stronger
than the target (a miscalibrated but valid attack). Textual inversion is not covered: a shadow
there is a whole DPAgg-TI run (one TI optimisation per image), which this module does not
train.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from scipy import stats
from tqdm.auto import tqdm

from common.data import SiteImages
from evaluation import metrics
from evaluation.scores import denoising_errors, encode
from evaluation.splits import Population
from evaluation.target import Target

LIRA_TIMESTEPS = (50, 100, 200, 300)


def lira_scores(target_stat: np.ndarray, shadow_stats: np.ndarray, inclusion: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(online, offline) LiRA scores of each image from its statistic under the target
    ([N]) and under K shadows ([K, N]) with their inclusion mask ([K, N], True = trained on)."""
    if shadow_stats.shape != inclusion.shape or shadow_stats.shape[1] != target_stat.size:
        raise ValueError(f"shapes disagree: target {target_stat.shape}, shadows {shadow_stats.shape}, "
                         f"inclusion {inclusion.shape}")
    if not (inclusion.any(0).all() and (~inclusion).any(0).all()):
        raise ValueError("every image needs at least one shadow with it and one without it")
    masked_in = np.ma.masked_array(shadow_stats, ~inclusion)
    masked_out = np.ma.masked_array(shadow_stats, inclusion)
    mu_in, mu_out = masked_in.mean(0).filled(), masked_out.mean(0).filled()
    # pooled (global) standard deviations: few shadows per image
    sd_in = float(np.sqrt(((shadow_stats - mu_in) ** 2)[inclusion].mean())) + 1e-12
    sd_out = float(np.sqrt(((shadow_stats - mu_out) ** 2)[~inclusion].mean())) + 1e-12
    online = stats.norm.logpdf(target_stat, mu_in, sd_in) - stats.norm.logpdf(target_stat, mu_out, sd_out)
    offline = (target_stat - mu_out) / sd_out
    return online, offline


def _statistic(unet, scheduler, data, base_loss: np.ndarray, *, draws: int, seed: int) -> np.ndarray:
    adapted = denoising_errors(unet, scheduler, data, LIRA_TIMESTEPS, draws=draws, seed=seed).mean((1, 2)).numpy()
    return base_loss - adapted


def lira_record(target: Target, pop: Population, run_dir: Path, *, shadows: int, delta: float, seed: int,
                draws: int, progress: bool) -> dict:
    """The attacks.json record of LiRA (online; offline in the details), or why it cannot run."""
    if target.adapter != "lora":
        return metrics.not_applicable("lira", "LiRA needs shadow adapters trained like the target; a DPAgg-TI shadow "
                                              "is a whole per-image TI run, which is not implemented (cost)")
    if shadows < 2:
        raise ValueError(f"LiRA needs at least 2 shadow adapters, got {shadows}")
    from client.lora_train import LoRATrainSettings, train_lora_locally
    from common.lora import attach_lora, init_frozen_a, load_lora_state, lora_state
    from common.models import load_pipeline
    from common.settings import lora_init_seed, lora_spec

    cfg = target.cfg
    spec = lora_spec(cfg)
    pipe = load_pipeline(target.model_dir, device=str(target.base.unet.device), dtype="float32")
    attach_lora(pipe, spec, seed=cfg.seed)
    if spec.frozen_a:  # FFA-LoRA: the shadows train B against the target's public frozen A
        init_frozen_a(pipe, spec, seed=lora_init_seed(cfg))
    initial = lora_state(pipe, spec)
    prompts, base_prompts = target.prompts(pop.captions)
    data = encode(target.adapted, pop.pixels, prompts)
    base = denoising_errors(target.base.unet, target.base.scheduler, encode(target.base, pop.pixels, base_prompts),
                            LIRA_TIMESTEPS, draws=draws, seed=seed).mean((1, 2)).numpy()
    target_stat = _statistic(target.adapted.unet, target.adapted.scheduler, data, base, draws=draws, seed=seed)
    rng = np.random.default_rng(seed)
    n = len(pop)
    # balanced inclusion: each image in exactly half of the shadows (K even) or about half
    inclusion = np.stack([rng.permutation(shadows) < shadows // 2 for _ in range(n)], axis=1)
    settings = LoRATrainSettings(steps=cfg.rounds * cfg.local_steps, batch_size=cfg.lora_batch_size,
                                 learning_rate=cfg.lora_learning_rate, default_caption=cfg.default_caption)
    stats_k = np.empty((shadows, n))
    for k in tqdm(range(shadows), desc="LiRA shadows", disable=not progress):
        load_lora_state(pipe, spec, initial)
        idx = torch.from_numpy(np.flatnonzero(inclusion[k]))
        subset = SiteImages(tuple(f"{i}" for i in idx.tolist()), pop.pixels[idx],
                            tuple(pop.captions[i] for i in idx.tolist()), "shadow")
        train_lora_locally(pipe, spec, subset, settings, generator=torch.Generator().manual_seed(seed * 1000 + k),
                           split_seed=seed, attacker_state=None)
        shadow_data = encode(pipe, pop.pixels, prompts) if spec.text_encoder else data
        stats_k[k] = _statistic(pipe.unet, pipe.scheduler, shadow_data, base, draws=draws, seed=seed)
    online, offline = lira_scores(target_stat, stats_k, inclusion)
    offline_auc = metrics.auc(offline, pop.labels)
    return metrics.summarize("lira", online, pop.labels, delta=delta, seed=seed, details={
        "variant": "online", "shadows": shadows, "shadow_steps": settings.steps, "timesteps": list(LIRA_TIMESTEPS),
        "offline_auc": offline_auc, "shadow_training": "one-site plain LoRA, rounds x local-steps, no DP (see module)"})
