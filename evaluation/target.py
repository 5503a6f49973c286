"""The model under attack: a run's base pipeline and the same pipeline with its adapter.

A LoRA run's ``pytorch_lora_weights.safetensors`` loads with ``pipe.load_lora_weights``; a
textual-inversion run's ``learned_embeds.safetensors`` with ``pipe.load_textual_inversion``
bound to the run's placeholder token. The base pipeline is the reference model of the
calibrated attacks: for TI it reads the same prompt with the initializer token in place of
the learned one (the embedding TI starts from).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from common.config import RunConfig
from common.lora import LORA_FILE
from common.paths import resolve
from evaluation.splits import run_config

TI_FILE = "learned_embeds.safetensors"
ADAPTERS = {"lora": "lora", "ti": "textual-inversion"}


@dataclass
class Target:
    base: object
    adapted: object
    adapter: str  # "lora" | "textual-inversion"
    cfg: RunConfig
    model_dir: Path

    def prompts(self, captions: Sequence[str | None]) -> tuple[list[str], list[str]]:
        """(prompts for the adapted model, prompts for the base) of each image, as in training."""
        cfg = self.cfg
        plain = [c or cfg.default_caption for c in captions]
        if self.adapter == "lora":
            return plain, plain
        fill = cfg.prompt_template.format
        return ([fill(caption=c, token=cfg.placeholder_token) for c in plain],
                [fill(caption=c, token=cfg.initializer_token) for c in plain])


def base_model_dir(cfg: RunConfig) -> Path:
    if not cfg.model_path:
        from common.tiny_sd import tiny_sd_dir

        return Path(tiny_sd_dir())
    return resolve(cfg.model_path)


def load_target(run_dir: str | Path, *, device: str = "cpu") -> Target:
    """Load the run's base model twice: as is, and with the run's adapter."""
    from common.models import load_pipeline

    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    model = base_model_dir(cfg)
    base = load_pipeline(model, device=device, dtype="float32")
    adapted = load_pipeline(model, device=device, dtype="float32")
    if cfg.adapter == "lora":
        if not (run_dir / LORA_FILE).is_file():
            raise FileNotFoundError(f"{run_dir / LORA_FILE} not found: the LoRA run left no adapter")
        adapted.load_lora_weights(str(run_dir), weight_name=LORA_FILE)
    else:
        if not (run_dir / TI_FILE).is_file():
            raise FileNotFoundError(f"{run_dir / TI_FILE} not found: the textual-inversion run left no embedding")
        adapted.load_textual_inversion(str(run_dir / TI_FILE), token=cfg.placeholder_token)
    for pipe in (base, adapted):
        pipe.unet.eval().requires_grad_(False)
        pipe.text_encoder.eval().requires_grad_(False)
    return Target(base, adapted, ADAPTERS[cfg.adapter], cfg, model)
