"""Per-image textual inversion, batched (DPAgg-TI, Peetathawatchai et al. 2024, Sec. 4).

DPAgg-TI learns one embedding per private image, every image with the same frozen model,
placeholder, initializer and data-independent hyperparameters. Instead of one training run
per image, a site trains all of its (sampled) images together: each image owns one row of a
small trainable table (:class:`~common.textual_inversion.PlaceholderEmbedding`), the batch
loss is the SUM of per-image losses, and the optimizer (Adam) acts elementwise. Row i's
gradient therefore depends on image i alone, and row i follows exactly the trajectory of a
separate run on image i with the same random draws: batching changes the cost, not the
privacy unit. Each step draws every row's latent sample, noise and timestep at once, before
the rows are split into batches, so the batch size changes neither the draws nor (beyond
float rounding) the result.

Padding to a public capacity (``secure`` / ``distributed`` aggregation, where the server must
not learn a site's secret Poisson count from how long it works): the run trains dummy rows
(grey images, the public default caption) after the real ones, so that it always does the
same number of forward/backward passes over the same number of rows (:func:`plan_rows`). The
dummy rows have passes of their own and a random generator of their own, and their
embeddings are discarded: the real rows' results are bit for bit those of the unpadded run.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from common.diffusion import LatentDist, StepDraws, draw_step, encode_latents, per_sample_mean, prediction_error
from common.textual_inversion import PlaceholderEmbedding, TISettings, add_placeholder, initializer_vector


def build_prompts(captions: Sequence[str | None], settings: TISettings) -> list[str]:
    """One training prompt per image: its caption (or the public default) with the token."""
    return [
        settings.prompt_template.format(caption=c or settings.default_caption, token=settings.placeholder_token)
        for c in captions
    ]


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


PADDING_SEED = 0  # the dummy rows' draws: public, and never part of what the site sends


@dataclass(frozen=True)
class RowPlan:
    """The rows of one batched run and the forward/backward passes that train them: the
    real rows first, in passes of ``batch_size``, then the dummy rows in passes of their own
    (a pass never holds both)."""

    real: int
    padding: int
    sizes: tuple[int, ...]  # rows per pass, the real rows' passes first

    @property
    def rows(self) -> int:
        return self.real + self.padding

    def passes(self, device) -> tuple[torch.Tensor, ...]:
        """The row indices of every pass, in order."""
        return torch.arange(self.rows, device=device).split(list(self.sizes))


def plan_rows(real: int, batch_size: int, pad_to: int = 0) -> RowPlan:
    """How to train ``real`` rows, padded to capacity ``pad_to`` (0: no padding).

    Padded to capacity c (c = max(pad_to, real)), the run always has c + 1 rows in
    ceil(c / B) + 1 passes of at most B rows: the real rows' ceil(real / B) passes, and the
    dummy rows (c + 1 - real >= 1 of them) spread evenly over the passes that are left.
    Whatever ``real`` is, the site does the same number of passes over the same number of
    rows; only how the rows are spread over the passes changes. (With c rows the number of
    passes would depend on ``real``: real rows and dummy rows never share a pass.)
    """
    if batch_size < 1 or real < 0 or pad_to < 0:
        raise ValueError(f"need batch_size >= 1, real >= 0 and pad_to >= 0, got {batch_size}, {real}, {pad_to}")
    real_sizes = [min(batch_size, real - start) for start in range(0, real, batch_size)]
    if pad_to == 0:
        return RowPlan(real=real, padding=0, sizes=tuple(real_sizes))
    capacity = max(pad_to, real)
    padding = capacity + 1 - real
    passes = math.ceil(capacity / batch_size) + 1 - len(real_sizes)  # >= 1, and padding <= passes * batch_size
    base, extra = divmod(padding, passes)
    padding_sizes = [base + 1] * extra + [base] * (passes - extra)
    return RowPlan(real=real, padding=padding, sizes=tuple(real_sizes + padding_sizes))


def padded_inputs(pixels: torch.Tensor, captions: Sequence[str | None],
                  padding: int) -> tuple[torch.Tensor, list[str | None]]:
    """The images and captions with ``padding`` dummy rows appended: mid-grey images (zeros
    in [-1, 1]) with no caption (the public default is used)."""
    dummies = torch.zeros((padding, *pixels.shape[1:]), dtype=pixels.dtype, device=pixels.device)
    return torch.cat([pixels, dummies]), [*captions, *([None] * padding)]


def step_draws(dist: LatentDist, plan: RowPlan, scheduler, generator: torch.Generator,
               padding_generator: torch.Generator) -> StepDraws:
    """One step's draws for every row: the real rows' from ``generator`` exactly as an
    unpadded run draws them, the dummy rows' from their own generator."""
    real = draw_step(dist.rows(slice(0, plan.real)), scheduler, generator)
    if plan.padding == 0:
        return real
    dummy = draw_step(dist.rows(slice(plan.real, None)), scheduler, padding_generator)
    return StepDraws(torch.cat([real.latents, dummy.latents]), torch.cat([real.noise, dummy.noise]),
                     torch.cat([real.timesteps, dummy.timesteps]))


def train_per_image_embeddings(
    pipe,
    pixels: torch.Tensor,
    captions: Sequence[str | None],
    settings: TISettings,
    *,
    generator: torch.Generator,
    pad_to: int = 0,
) -> torch.Tensor:
    """Learn one embedding per image; returns float32 [n, D] on the CPU.

    Args:
        pipe: a StableDiffusionPipeline with frozen modules (see ``common.models``).
        pixels: [n, 3, R, R] images in [-1, 1].
        captions: one public-template caption (or None) per image.
        settings: the shared hyperparameters.
        generator: drives every random draw of the real rows (latent samples, noise,
            timesteps); it must live on the pipeline's device.
        pad_to: a public capacity: train dummy rows too, so that the work done does not
            depend on n (:func:`plan_rows`); 0 trains the n rows alone.
    """
    n = pixels.shape[0]
    dim = initializer_vector(pipe, settings).numel()
    plan = plan_rows(n, settings.batch_size, pad_to)
    if plan.rows == 0:
        return torch.zeros(0, dim)
    device = pipe.unet.device
    padding_generator = torch.Generator(device=device).manual_seed(PADDING_SEED)
    pixels, captions = padded_inputs(pixels, captions, plan.padding)
    dist = encode_latents(pipe.vae, pixels, sizes=plan.sizes)
    passes = plan.passes(device)
    with placeholder_rows(pipe, settings, plan.rows) as table:
        # tokenize only now: the placeholder token exists from here on
        ids = tokenize(pipe, build_prompts(captions, settings)).to(device)
        optimizer = torch.optim.Adam([table.rows.weight], lr=settings.learning_rate)
        for _ in range(settings.steps):
            optimizer.zero_grad(set_to_none=True)
            draws = step_draws(dist, plan, pipe.scheduler, generator, padding_generator)
            for index in passes:
                # each batch element reads its own image's row
                table.row_index = index
                hidden = pipe.text_encoder(ids[index])[0]
                # sum, not mean: row i's gradient is exactly that of image i's own loss
                per_sample_mean(prediction_error(pipe.unet, pipe.scheduler, draws.rows(index), hidden)).sum().backward()
            optimizer.step()
        return table.rows.weight.detach()[:n].float().cpu().clone()
