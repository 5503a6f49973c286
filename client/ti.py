"""Per-image textual inversion, batched (DPAgg-TI, Peetathawatchai et al. 2024, Sec. 4).

DPAgg-TI learns one embedding per private image, every image with the same frozen model,
placeholder, initializer and data-independent hyperparameters. Instead of one training run
per image, a site trains all of its (sampled) images together: each image owns one row of a
small trainable table (:class:`~common.textual_inversion.PlaceholderEmbedding`), the batch
loss is the SUM of per-image losses, and the optimizer (Adam) acts elementwise. Row i's
gradient therefore depends on image i alone, and row i follows exactly the trajectory of a
separate run on image i with the same random draws: batching changes the cost, not the
privacy unit.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from common.diffusion import denoising_loss, encode_latents
from common.textual_inversion import PlaceholderEmbedding, add_placeholder, token_id


@dataclass(frozen=True)
class TISettings:
    """Data-independent textual-inversion hyperparameters (the same for every image)."""

    steps: int = 100
    learning_rate: float = 5e-3
    batch_size: int = 16
    initializer_token: str = "emoji"
    placeholder_token: str = "<S*>"
    prompt_template: str = "{caption} in the style of {token}"
    default_caption: str = "an image"


def build_prompts(captions: Sequence[str | None], settings: TISettings) -> list[str]:
    """One training prompt per image: its caption (or the public default) with the token."""
    return [
        settings.prompt_template.format(caption=c or settings.default_caption, token=settings.placeholder_token)
        for c in captions
    ]


def initializer_vector(pipe, settings: TISettings) -> torch.Tensor:
    """The frozen embedding of the initializer token, float32 [D] on the CPU."""
    tid = token_id(pipe.tokenizer, settings.initializer_token)
    table = pipe.text_encoder.get_input_embeddings()
    base = table.base if isinstance(table, PlaceholderEmbedding) else table
    return base.weight[tid].detach().float().cpu()


@contextmanager
def placeholder_rows(pipe, settings: TISettings, num_rows: int) -> Iterator[PlaceholderEmbedding]:
    """Swap the text encoder's token table for one with ``num_rows`` trainable placeholder
    rows (initialised at the initializer token), and restore the original on exit."""
    encoder = pipe.text_encoder
    original = encoder.get_input_embeddings()
    placeholder_id = add_placeholder(pipe.tokenizer, settings.placeholder_token)
    init = initializer_vector(pipe, settings)
    module = PlaceholderEmbedding(original, placeholder_id, init, num_rows).to(original.weight.device)
    module.rows.weight.requires_grad_(True)
    encoder.set_input_embeddings(module)
    try:
        yield module
    finally:
        encoder.set_input_embeddings(original)


def tokenize(pipe, prompts: Sequence[str]) -> torch.Tensor:
    tok = pipe.tokenizer
    return tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids


def train_per_image_embeddings(
    pipe,
    pixels: torch.Tensor,
    captions: Sequence[str | None],
    settings: TISettings,
    *,
    generator: torch.Generator,
) -> torch.Tensor:
    """Learn one embedding per image; returns float32 [n, D] on the CPU.

    Args:
        pipe: a StableDiffusionPipeline with frozen modules (see ``common.models``).
        pixels: [n, 3, R, R] images in [-1, 1].
        captions: one public-template caption (or None) per image.
        settings: the shared hyperparameters.
        generator: drives every random draw (latent samples, noise, timesteps); it must
            live on the pipeline's device.
    """
    n = pixels.shape[0]
    if n == 0:
        return torch.zeros(0, initializer_vector(pipe, settings).numel())
    device = pipe.unet.device
    dist = encode_latents(pipe.vae, pixels, batch_size=settings.batch_size)
    with placeholder_rows(pipe, settings, n) as table:
        # tokenize only now: the placeholder token exists from here on
        ids = tokenize(pipe, build_prompts(captions, settings)).to(device)
        optimizer = torch.optim.Adam([table.rows.weight], lr=settings.learning_rate)
        chunks = torch.arange(n, device=device).split(settings.batch_size)
        for _ in range(settings.steps):
            optimizer.zero_grad(set_to_none=True)
            for index in chunks:
                # each batch element reads its own image's row
                table.row_index = index
                hidden = pipe.text_encoder(ids[index])[0]
                latents = dist.sample(generator, index)
                # sum, not mean: row i's gradient is exactly that of image i's own loss
                denoising_loss(pipe.unet, pipe.scheduler, latents, hidden, generator).sum().backward()
            optimizer.step()
        return table.rows.weight.detach().float().cpu().clone()
