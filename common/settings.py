"""What the run config means for the adapters: the TI and LoRA settings, the base model's
folder, and whether a site's replies carry diagnostics.

Both apps derive these from the same :class:`common.config.RunConfig`, so the server's view of
a site's work (the initializer embedding it starts from, the adapter's shapes, which figures a
reply may hold) is the site's own."""

from __future__ import annotations

from common.config import RunConfig
from common.lora import LoRASpec
from common.paths import derive_seed, resolve
from common.textual_inversion import TISettings
from common.tiny_sd import tiny_sd_dir


def ti_settings(cfg: RunConfig) -> TISettings:
    """The textual-inversion hyperparameters of the run."""
    return TISettings(
        steps=cfg.ti_steps,
        learning_rate=cfg.learning_rate,
        batch_size=cfg.batch_size,
        initializer_token=cfg.initializer_token,
        placeholder_token=cfg.placeholder_token,
        prompt_template=cfg.prompt_template,
        default_caption=cfg.default_caption,
    )


def lora_spec(cfg: RunConfig) -> LoRASpec:
    """The adapter's shape: rank, alpha, target modules, text encoder or not, variant."""
    return LoRASpec(rank=cfg.lora_rank, alpha=cfg.lora_alpha, targets=cfg.lora_target_list,
                    text_encoder=cfg.lora_text_encoder, variant=cfg.lora_variant)


def lora_init_seed(cfg: RunConfig) -> int:
    """The seed of the initial adapter, derived from the PUBLIC run seed: the server's initial
    A (B = 0) and, under FFA-LoRA, the frozen A that every site and the server draw for
    themselves (:func:`common.lora.init_frozen_a`). Not privacy randomness: the initial
    adapter is public."""
    return derive_seed(cfg.seed, "lora-init")


def model_dir(cfg: RunConfig) -> str:
    """The base pipeline's folder: ``model-path``, or the tiny model built on first use."""
    return str(resolve(cfg.model_path)) if cfg.model_path else str(tiny_sd_dir())


def sends_diagnostics(cfg: RunConfig) -> bool:
    """Whether a site adds diagnostics to its replies: only when its run config opts in
    (``site-diagnostics = true``) and its reply reaches the server in the clear (``central``;
    in ``secure`` / ``distributed`` aggregation a site sends masked values and keys only).
    The site decides; the server reads whatever arrives."""
    return cfg.site_diagnostics and cfg.aggregation == "central"
