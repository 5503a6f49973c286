"""Known-answer adapters for testing the attacks: a deliberately overfit, non-private LoRA
saved as a run folder that :func:`evaluation.attacks.run_attacks` reads.

Used by the tests (and handy for checking an attack by hand); nothing here is part of a
privacy claim.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from common.config import RunConfig
from common.data import SiteImages


def take(images: SiteImages, start: int, stop: int) -> SiteImages:
    """Images [start, stop) of a site, as a SiteImages of the same site."""
    return SiteImages(images.names[start:stop], images.pixels[start:stop], images.captions[start:stop], images.site)


def merge(parts: list[SiteImages], site: str) -> SiteImages:
    return SiteImages(sum((p.names for p in parts), ()), torch.cat([p.pixels for p in parts]),
                      sum((p.captions for p in parts), ()), site)


@dataclass(frozen=True)
class OverfitRecipe:
    rank: int = 16
    steps: int = 200
    batch_size: int = 8
    learning_rate: float = 3e-3
    seed: int = 0


def overfit_lora_run(out_dir: str | Path, model_dir: str | Path, train: SiteImages, *, resolution: int,
                     recipe: OverfitRecipe = OverfitRecipe()) -> Path:
    """Train a plain LoRA on ``train`` (no DP, no defence, many steps, high rank) and save it
    with a run_config.json as a run's output folder."""
    from client.lora_train import LoRATrainSettings, train_lora_locally
    from common.lora import LoRASpec, attach_lora, save_lora
    from common.models import load_pipeline

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = RunConfig(adapter="lora", target_epsilon=float("inf"), model_path=str(model_dir), resolution=resolution,
                    lora_rank=recipe.rank, lora_alpha=float(recipe.rank), seed=recipe.seed, rounds=1,
                    local_steps=recipe.steps, lora_batch_size=recipe.batch_size,
                    lora_learning_rate=recipe.learning_rate)
    pipe = load_pipeline(model_dir, device="cpu", dtype="float32")
    spec = LoRASpec(rank=recipe.rank, alpha=float(recipe.rank))
    attach_lora(pipe, spec, seed=recipe.seed)
    settings = LoRATrainSettings(steps=recipe.steps, batch_size=recipe.batch_size, learning_rate=recipe.learning_rate,
                                 default_caption=cfg.default_caption)
    result = train_lora_locally(pipe, spec, train, settings, generator=torch.Generator().manual_seed(recipe.seed),
                                split_seed=recipe.seed, attacker_state=None)
    save_lora(out, pipe, spec)
    (out / "run_config.json").write_text(json.dumps(cfg.to_run_config(), indent=2))
    (out / "training.json").write_text(json.dumps({"recipe": recipe.__dict__, "metrics": result.metrics,
                                                   "trained_on": list(train.names)}, indent=2))
    return out
