"""How good is a release: utility of a privadapt run's adapter against held-out private images.

Four figures, each comparing the adapted model with the base model it was trained from:

* **denoising loss** on held-out private images (images of the private distribution that did
  not train the adapter): the LDM objective (Rombach et al. 2022, Eq. 2) at fixed timesteps,
  averaged over noise draws that are the same for the base and the adapted model, so the
  per-image difference is a paired comparison. Lower is better.
* **KID** (Bińkowski et al., "Demystifying MMD GANs", ICLR 2018) between images generated
  for the held-out images' captions and the held-out images themselves, on the penultimate
  features of privadapt's committed style classifier (``assets/style-classifier``, a CNN that
  tells Twemoji from Noto emoji; :mod:`evaluation.features`), not Inception's pool3 (which cannot
  be had offline): values compare within privadapt only. Lower is better.
* **style accuracy**: the share of those generated images the same classifier assigns to the
  held-out images' majority style.
* for textual inversion, the **cosine** between the released embedding and a non-private
  run's embedding, both raw and after subtracting the initializer token's embedding (the
  direction the private data moved it).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common.config import RunConfig
from common.data import SiteImages
from common.lora import LORA_FILE
from common.textual_inversion import EMBEDS_FILE, load_embedding, token_id
from evaluation.features import STYLES, embed, kid, load_style_net, style_probabilities
from evaluation.scores import denoising_errors, encode

DEFAULT_TIMESTEPS = (100, 300, 500, 700, 900)
FEATURE_EXTRACTOR = ("privadapt style classifier (assets/style-classifier), penultimate layer, 128 features "
                     "(Twemoji vs Noto CNN; not Inception)")


@dataclass(frozen=True)
class Run:
    """A finished run's output folder, read and checked."""

    path: Path
    config: RunConfig
    privacy: dict
    adapter: str  # "lora" or "textual-inversion"

    @property
    def token(self) -> str:
        return self.config.placeholder_token


def read_run(run_dir: str | Path) -> Run:
    """Read ``run_config.json`` and ``privacy.json`` of a run folder and find its adapter.

    Raises:
        FileNotFoundError: If the folder, one of those files or the adapter file is missing.
        ValueError: If a file is not valid JSON or the run config is invalid.
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"run folder not found: {path}")
    docs = {}
    for name in ("run_config.json", "privacy.json"):
        file = path / name
        if not file.is_file():
            raise FileNotFoundError(f"{path} is not a finished privadapt run: no {name}")
        try:
            docs[name] = json.loads(file.read_text())
        except ValueError as err:
            raise ValueError(f"{file} is not valid JSON: {err}") from err
    config = RunConfig.from_run_config(docs["run_config.json"])
    adapter = "lora" if config.adapter == "lora" else "textual-inversion"
    weights = path / (LORA_FILE if adapter == "lora" else EMBEDS_FILE)
    if not weights.is_file():
        raise FileNotFoundError(f"{path}: the {adapter} run has no {weights.name}")
    return Run(path=path, config=config, privacy=docs["privacy.json"], adapter=adapter)


def apply_adapter(run: Run, pipe) -> None:
    """Load the run's exported adapter into ``pipe`` the way a user would."""
    if run.adapter == "lora":
        pipe.load_lora_weights(str(run.path), weight_name=LORA_FILE)
    else:
        pipe.load_textual_inversion(str(run.path / EMBEDS_FILE), token=run.token)


def prompts_for(run: Run, captions: Sequence[str | None], *, adapted: bool) -> list[str]:
    """The text each image is scored or generated with: its caption, and for an adapted TI
    model the run's prompt template with the placeholder token."""
    cfg = run.config
    texts = [c or cfg.default_caption for c in captions]
    if adapted and run.adapter == "textual-inversion":
        return [cfg.prompt_template.format(caption=t, token=run.token) for t in texts]
    return texts


def paired_summary(base: np.ndarray, adapted: np.ndarray, *, confidence: float = 0.95) -> dict:
    """Means of two paired per-image samples and a t interval on the mean difference."""
    from scipy import stats

    diff = adapted - base
    n = len(diff)
    half = (float(stats.t.ppf(0.5 + confidence / 2, n - 1) * diff.std(ddof=1) / math.sqrt(n)) if n > 1 else math.inf)
    mean = float(diff.mean())
    return {"base": float(base.mean()), "adapted": float(adapted.mean()), "difference": mean,
            "difference_ci": [mean - half, mean + half], "relative_change": mean / float(base.mean()),
            "images": n, "confidence": confidence}


def held_out_errors(run: Run, pipe, images: SiteImages, *, adapted: bool,
                    timesteps: Sequence[int] = DEFAULT_TIMESTEPS, draws: int = 4, seed: int = 0) -> torch.Tensor:
    """Per-image denoising errors ``[N, timesteps, draws]`` of ``pipe`` on ``images``, prompted
    as the run's base (``adapted=False``) or adapted model; the same ``seed`` gives every model
    the same noise (:func:`evaluation.scores.denoising_errors`)."""
    data = encode(pipe, images.pixels, prompts_for(run, images.captions, adapted=adapted))
    return denoising_errors(pipe.unet, pipe.scheduler, data, timesteps, draws=draws, seed=seed)


def denoising_comparison(run: Run, base_pipe, adapted_pipe, images: SiteImages, *,
                         timesteps: Sequence[int] = DEFAULT_TIMESTEPS, draws: int = 4, seed: int = 0) -> dict:
    """Held-out denoising loss of the base and the adapted model, per image averaged over
    ``timesteps`` and ``draws`` (the same noise for both models, so the per-image difference is
    paired); also per timestep."""
    base, adapted = (held_out_errors(run, pipe, images, adapted=flag, timesteps=timesteps, draws=draws, seed=seed)
                     for pipe, flag in ((base_pipe, False), (adapted_pipe, True)))
    summary = paired_summary(base.mean((1, 2)).numpy(), adapted.mean((1, 2)).numpy())
    summary["per_timestep"] = {str(t): {"base": float(base[:, j].mean()), "adapted": float(adapted[:, j].mean())}
                               for j, t in enumerate(timesteps)}
    summary["timesteps"] = [int(t) for t in timesteps]
    summary["noise_draws"] = draws
    return summary


@torch.no_grad()
def generate(pipe, prompts: Sequence[str], *, seed: int, steps: int, guidance: float,
             batch_size: int = 32) -> list[Image.Image]:
    """One image per prompt, drawn in batches; image ``i`` starts from the latent noise of seed
    ``seed + i`` (the same for every model) whatever its batch, as the pipeline takes one
    generator per image. With a deterministic sampler (the embedded base's DDIM) an image is
    the one drawn alone, up to batched floating point."""
    images: list[Image.Image] = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        gens = [torch.Generator(device="cpu").manual_seed(seed + start + i) for i in range(len(chunk))]
        images += pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gens).images
    return images


def pil_images(images: SiteImages) -> list[Image.Image]:
    """The loader's [-1, 1] tensors back to 8-bit RGB images."""
    arrays = ((images.pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arrays]


def distribution_metrics(generated: dict[str, list[Image.Image]], reference: list[Image.Image], *,
                         classifier_dir: Path | None = None, seed: int = 0) -> dict:
    """KID (mean, std over subsets) of each generated set against ``reference`` and the share
    of each set that the style classifier puts in ``reference``'s majority style."""
    net = load_style_net(classifier_dir) if classifier_dir else load_style_net()
    ref_feats = embed(net, reference)
    style = int(style_probabilities(net, reference).argmax(-1).mode().values)
    out: dict = {"feature_extractor": FEATURE_EXTRACTOR, "reference_images": len(reference),
                 "reference_style": STYLES[style]}
    for name, images in generated.items():
        mean, std = kid(embed(net, images), ref_feats, seed=seed)
        share = float((style_probabilities(net, images).argmax(-1) == style).double().mean())
        out[name] = {"kid": mean, "kid_std": std, "style_accuracy": share, "images": len(images)}
    return out


def embedding_cosine(run: Run, reference: Run, base_pipe) -> dict:
    """Cosine between a TI run's released embedding and a reference (non-private) run's,
    raw and centred on the initializer token's embedding in ``base_pipe``."""
    if run.adapter != "textual-inversion" or reference.adapter != "textual-inversion":
        raise ValueError("the embedding cosine needs two textual-inversion runs")
    _, released = load_embedding(run.path / EMBEDS_FILE)
    _, nonprivate = load_embedding(reference.path / EMBEDS_FILE)
    if released.numel() != nonprivate.numel():
        raise ValueError(f"embeddings differ in size: {released.numel()} ({run.path}) vs {nonprivate.numel()} "
                         f"({reference.path})")
    tid = token_id(base_pipe.tokenizer, run.config.initializer_token)
    init = base_pipe.text_encoder.get_input_embeddings().weight[tid].detach().double().cpu()
    a, b = released.double().flatten(), nonprivate.double().flatten()
    cos = torch.nn.functional.cosine_similarity
    return {"reference_run": str(reference.path), "cosine": float(cos(a, b, dim=0)),
            "cosine_centred_on_initializer": float(cos(a - init, b - init, dim=0)),
            "distance": float(torch.linalg.vector_norm(a - b)),
            "reference_private": bool(reference.privacy.get("private"))}


def evaluate_utility(run: Run, held_out: SiteImages, out_dir: Path, *, reference: Run | None = None,
                     timesteps: Sequence[int] = DEFAULT_TIMESTEPS, draws: int = 4, seed: int = 0,
                     sample_steps: int | None = None, device: str = "cpu") -> dict:
    """Every utility figure of ``run`` on ``held_out``; writes ``grid.png`` (the run's sample
    prompts with seeds ``seed, seed+1, ...``: base row above, adapted row below) into
    ``out_dir`` and returns the figures (``utility.json``'s content)."""
    from common.models import load_pipeline
    from common.settings import model_dir
    from server.export import grid

    if len(held_out) < 2:
        raise ValueError(f"need at least 2 held-out images, got {len(held_out)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = run.config
    steps = sample_steps or cfg.sample_steps
    base_pipe = load_pipeline(model_dir(cfg), device=device)
    adapted_pipe = load_pipeline(model_dir(cfg), device=device)
    apply_adapter(run, adapted_pipe)
    result: dict = {"run": str(run.path), "adapter": run.adapter, "held_out_images": len(held_out),
                    "denoising_loss": denoising_comparison(run, base_pipe, adapted_pipe, held_out, timesteps=timesteps,
                                                           draws=draws, seed=seed)}
    generated = {}
    for name, pipe in (("base", base_pipe), ("adapted", adapted_pipe)):
        generated[name] = generate(pipe, prompts_for(run, held_out.captions, adapted=name == "adapted"), seed=seed,
                                   steps=steps, guidance=cfg.sample_guidance)
    result["distribution"] = {**distribution_metrics(generated, pil_images(held_out), seed=seed),
                              "prompts": "the held-out images' captions", "sample_steps": steps, "seed": seed}
    rows = {name: generate(pipe, prompts_for(run, cfg.prompts, adapted=name == "adapted"), seed=seed, steps=steps,
                           guidance=cfg.sample_guidance) for name, pipe in (("base", base_pipe), ("adapted", adapted_pipe))}
    grid(rows["base"], rows["adapted"]).save(out_dir / "grid.png")
    result["grid"] = {"file": "grid.png", "prompts": cfg.prompts, "seeds": [seed + i for i in range(len(cfg.prompts))],
                      "rows": ["base", "adapted"], "sample_steps": steps}
    if reference is not None:
        result["embedding"] = embedding_cosine(run, reference, base_pipe)
    elif run.adapter == "textual-inversion":
        result["embedding"] = None  # no non-private reference run given
    return result
