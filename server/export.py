"""What a run leaves behind: the adapter in diffusers' format, privacy.json, metrics,
sample images next to the base model's, and a model card that says it all in words."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image

from common.models import load_pipeline
from common.textual_inversion import EMBEDS_FILE, save_embedding
from server.statement import smallest_achieved


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def generate_samples(
    model_dir: str,
    embeds_path: Path,
    token: str,
    prompts: Sequence[str],
    out_dir: Path,
    *,
    template: str,
    steps: int,
    guidance: float,
    seed: int,
    device: str = "auto",
) -> list[dict]:
    """Base and TI-adapted images for the same prompts and seeds, from a fresh stock pipeline
    that loads the exported embedding as a user would. The base draws each prompt as given; the
    adapted model draws it through the run's prompt ``template`` (the one the embedding was
    trained with: ``template.format(caption=prompt, token=token)``)."""
    return sample_pairs(model_dir, prompts, out_dir, adapt=lambda pipe: pipe.load_textual_inversion(str(embeds_path), token=token),
                        adapted_prompt=lambda prompt: template.format(caption=prompt, token=token),
                        steps=steps, guidance=guidance, seed=seed, device=device)


def sample_pairs(
    model_dir: str,
    prompts: Sequence[str],
    out_dir: Path,
    *,
    adapt: Callable[[Any], None],
    adapted_prompt: Callable[[str], str],
    steps: int,
    guidance: float,
    seed: int,
    device: str = "auto",
) -> list[dict]:
    """Images of a fresh stock pipeline for each prompt, then the same after ``adapt(pipe)``
    (which loads the exported adapter the way a user would), with the same seeds; writes
    them and ``grid.png`` (base row above, adapted row below) into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(model_dir, device=device)
    rows: list[dict] = []
    images: dict[str, list[Image.Image]] = {"base": [], "adapted": []}
    for kind in ("base", "adapted"):
        if kind == "adapted":
            adapt(pipe)
        for i, prompt in enumerate(prompts):
            text = prompt if kind == "base" else adapted_prompt(prompt)
            gen = torch.Generator(device="cpu").manual_seed(seed + i)
            image = pipe(text, num_inference_steps=steps, guidance_scale=guidance, generator=gen).images[0]
            name = f"{kind}_{i:02d}.png"
            image.save(out_dir / name)
            images[kind].append(image)
            rows.append({"kind": kind, "prompt": text, "seed": seed + i, "file": f"samples/{name}"})
    grid(images["base"], images["adapted"]).save(out_dir / "grid.png")
    return rows


def grid(top: Sequence[Image.Image], bottom: Sequence[Image.Image]) -> Image.Image:
    """Two rows: base samples above, adapted samples below."""
    w, h = top[0].size
    sheet = Image.new("RGB", (w * len(top), h * 2), "white")
    for i, (a, b) in enumerate(zip(top, bottom)):
        sheet.paste(a, (i * w, 0))
        sheet.paste(b, (i * w, h))
    return sheet


def noise_std_words(p: dict) -> str:
    """"z*C = z x C" as the card states it: the z the releases achieved. Where distributed
    dropouts lowered it (``achieved_noise_multipliers`` below the plan's z), the smallest
    achieved z is stated, with the plan's next to it; never the plan's alone."""
    planned, clip = p["noise_multiplier"], p["clip_norm"]
    lowest = smallest_achieved(p.get("achieved_noise_multipliers") or (), planned)
    if lowest is not None:
        return (f"z*C = {lowest:.4g} x {clip:g} at the least (the smallest achieved z, lowered from the planned "
                f"{planned:.4g} where sites dropped out of distributed noise)")
    return f"z*C = {planned:.4g} x {clip:g}"


def dpagg_steps(p: dict) -> list[str]:
    post = "; ".join(p["post_processing"]) or "none"
    sampled = p["sample_rate"] < 1
    which = (f"Each image was kept with probability q = {p['sample_rate']:g} (Poisson sampling)" if sampled
             else "Every image was used (q = 1, no sampling)")
    return [
        f"- Method: {p['mechanism']}.",
        f"- Sites that contributed: {p['num_sites']}; declared (public) number of images N = {p['declared_num_images']}.",
        f"- {which}, its embedding {'centred on the initializer token and ' if p['centered'] else ''}"
        f"{'clipped' if p['bound'] == 'clip' else 'normalized'} to L2 norm C = {p['clip_norm']:g}.",
        f"- Gaussian noise with standard deviation {noise_std_words(p)} was added once to the sum over all sites, "
        f"which was then divided by the public {'expected ' if sampled else ''}count q*N = {p['denominator']:g}.",
        f"- Releases: {p['num_releases']}. Post-processing (free under DP): {post}.",
    ]


def signal_lines(p: dict) -> list[str]:
    """The planned signal-to-noise figures (privacy.json's ``signal_to_noise``, built once by
    :func:`server.statement.checked_signal`), where the run has them (private DPAgg-TI and LoRA)."""
    figures = p.get("signal_to_noise")
    return [f"- {figures['summary']}"] if figures else []


def dpsgd_steps(p: dict) -> list[str]:
    plan = p["plan"]
    per_site = ", ".join(f"{s}: q={q:.3g}, z={p['site_noise_multipliers'][s]:.4g}" for s, q in sorted(p["site_sample_rates"].items()))
    return [
        f"- Method: {p['mechanism']}.",
        f"- Sites that contributed: {p['num_sites']}; rounds: {p['num_releases']}, each with "
        f"{plan['local_steps_per_round']} local DP-SGD steps (expected batch {plan['batch_size']}) per site.",
        f"- Per-example gradients clipped to L2 norm C = {p['clip_norm']:g}; Poisson batches at the public rate "
        f"q = {p['sample_rate']:.4g} (batch size / the declared site size D = {p.get('declared_site_size')}), the "
        f"clipped sum divided by q*D = {p['denominator']:g}; per site sampling rate and noise multiplier: {per_site}.",
        f"- Composition: {p['composition']}.",
        f"- Post-processing (free under DP): {'; '.join(p['post_processing']) or 'none'}.",
    ]


def samples_and_metrics(adapter: str, samples: list[dict], metrics: dict) -> list[str]:
    """The model card's sample table and metrics, the same for every adapter."""
    return [
        "",
        "## Samples",
        f"`samples/grid.png`: top row the base model, bottom row with {adapter}; same prompts and seeds.",
        "",
        "| kind | prompt | seed | file |",
        "|---|---|---|---|",
        *[f"| {s['kind']} | {s['prompt']} | {s['seed']} | {s['file']} |" for s in samples],
        "",
        "## Metrics",
        "```json",
        json.dumps(metrics, indent=2),
        "```",
        "",
    ]


OLD_SCHEMA = "This privacy.json predates schema 2 and states no guarantee in words: read its fields."


def ti_claim(p: dict) -> str:
    """The privacy statement of a textual-inversion run, in words: privacy.json's ``statement``
    (built in one place, :mod:`server.statement`)."""
    return p.get("statement", OLD_SCHEMA)


def model_card(privacy: dict, metrics: dict, samples: list[dict]) -> str:
    """README.md of the output folder: the adapter, how to load it, and its privacy in words."""
    p = privacy
    token = p["adapter"]["token"]
    # the prompt of the first adapted sample: the run's template, which the embedding was trained with
    example = next((s["prompt"] for s in samples if s["kind"] == "adapted"), f"an emoji of a cat in the style of {token}")
    lines = [
        f"# privadapt textual-inversion embedding `{token}`",
        "",
        ti_claim(p),
        "",
        "## How it was made",
        *(dpsgd_steps(p) if p.get("method") == "dp-sgd-ti" else dpagg_steps(p)),
        *signal_lines(p),
        f"- Noise source: {p['noise_source']}.",
        f"- Trust model: {p['trust_model']}",
        *([f"- Not covered by the guarantee: {p['not_covered']}"] if p.get("not_covered") else []),
        "",
        "## Use it",
        "```python",
        "from diffusers import StableDiffusionPipeline",
        "pipe = StableDiffusionPipeline.from_pretrained(BASE_MODEL_DIR)",
        f'pipe.load_textual_inversion("{EMBEDS_FILE}", token="{token}")',
        f'image = pipe("{example}").images[0]',
        "```",
        *samples_and_metrics("the embedding", samples, metrics),
        "Full privacy report: `privacy.json`.",
    ]
    return "\n".join(lines) + "\n"


def lora_claim(p: dict) -> str:
    """The privacy statement of a LoRA run, in words: privacy.json's ``statement``."""
    return p.get("statement", OLD_SCHEMA)


def adapter_words(a: dict) -> str:
    """The card's adapter line: the shape and, for FFA-LoRA, the parameters frozen and released (d)."""
    where = f"{', '.join(a['targets'])}{' and the text encoder' if a['text_encoder'] else ''}"
    line = f"- Adapter: LoRA rank {a['rank']}, alpha {a['alpha']:g}, on {where}"
    if a.get("variant") == "ffa":
        return (f"{line}; FFA-LoRA: every A ({a['frozen_parameters']:,} parameters) frozen at a public initialisation "
                f"drawn from the run seed, independent of the data; only B trained and released: "
                f"{a['parameters']:,} parameters.")
    return f"{line}."


def fedavg_steps(p: dict) -> list[str]:
    plan = p["plan"]
    released = "B tensors (FFA-LoRA)" if p["adapter"].get("variant") == "ffa" else "adapter tensors"
    return [
        f"- Method: {p['mechanism']}.",
        f"- Local training: {p['defense_description']}.",
        f"- Rounds: {p['num_rounds']}; each of the K = {p['num_sites_declared']} sites took part in a round with "
        f"probability q = {p['sample_rate']:g} (sampling: {p['sampling']}); {plan['local_steps']} local steps per round.",
        (f"- Each site's delta was clipped to L2 norm C = {p['clip_norm']:g} over all {released}; "
         f"Gaussian noise of standard deviation {noise_std_words(p)} was added to the sum, which was "
         f"divided by the public expected count q*K = {p['denominator']:g} (uniform weights)." if p["private"] else
         "- Non-private: the deltas were neither clipped nor noised; the adapter moved by their plain mean."),
        adapter_words(p["adapter"]),
    ]


def lora_model_card(privacy: dict, metrics: dict, samples: list[dict]) -> str:
    """README.md of a LoRA run's output folder."""
    p = privacy
    lines = [
        f"# privadapt {'FFA-' if p['adapter'].get('variant') == 'ffa' else ''}LoRA adapter ({p['defense']})",
        "",
        lora_claim(p),
        "",
        "## How it was made",
        *fedavg_steps(p),
        *signal_lines(p),
        f"- Noise source: {p['noise_source']}.",
        f"- Trust model: {p['trust_model']}",
        *([f"- Not covered by the guarantee: {p['not_covered']}"] if p.get("not_covered") else []),
        "",
        "## Use it",
        "```python",
        "from diffusers import StableDiffusionPipeline",
        "pipe = StableDiffusionPipeline.from_pretrained(BASE_MODEL_DIR)",
        "pipe.load_lora_weights(OUTPUT_DIR)  # reads pytorch_lora_weights.safetensors",
        'image = pipe("an emoji of a cat").images[0]',
        "```",
        *samples_and_metrics("the adapter", samples, metrics),
        "Full privacy report: `privacy.json`; per-round server diagnostics: `round_metrics.json`.",
    ]
    return "\n".join(lines) + "\n"


def embedding_metrics(vector: torch.Tensor, init: torch.Tensor) -> dict[str, float]:
    """How far the published embedding sits from the initializer token's."""
    return {
        "embedding_norm": float(torch.linalg.vector_norm(vector)),
        "initializer_norm": float(torch.linalg.vector_norm(init)),
        "cosine_to_initializer": float(torch.nn.functional.cosine_similarity(vector.float(), init.float(), dim=0)),
    }


def export_embedding(out_dir: Path, token: str, vector: torch.Tensor) -> Path:
    return save_embedding(out_dir / EMBEDS_FILE, token, vector)
