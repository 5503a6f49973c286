"""Textual-inversion embeddings: the placeholder-token module and the diffusers file format.

:class:`PlaceholderEmbedding` replaces a text encoder's token-embedding table for training:
the vocabulary stays frozen, and the placeholder token's vector comes from a small trainable
table with one row per private image (``row_index`` says which row each batch element uses).
Keeping the trainable rows in their own ``nn.Embedding`` keeps per-sample gradients (Opacus)
at B x rows x D instead of B x vocabulary x D (see ENV.md).

The export format is the one ``StableDiffusionPipeline.load_textual_inversion`` reads:
a safetensors file mapping the token to a float32 tensor of shape [1, D].
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from common.config import RunConfig

EMBEDS_FILE = "learned_embeds.safetensors"


class PlaceholderEmbedding(nn.Module):
    """Frozen vocabulary embedding plus trainable rows for one placeholder token id."""

    def __init__(self, base: nn.Embedding, placeholder_id: int, init: torch.Tensor, num_rows: int) -> None:
        super().__init__()
        self.base = base
        self.placeholder_id = int(placeholder_id)
        self.rows = nn.Embedding(num_rows, init.numel())
        with torch.no_grad():
            self.rows.weight.copy_(init.reshape(1, -1).expand(num_rows, -1).to(self.rows.weight.dtype))
        self.register_buffer("row_index", torch.zeros(1, dtype=torch.long), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_placeholder = input_ids == self.placeholder_id
        frozen = self.base(torch.where(is_placeholder, torch.zeros_like(input_ids), input_ids))
        rows = self.rows(self.row_index.reshape(-1, 1).expand_as(input_ids))
        return torch.where(is_placeholder.unsqueeze(-1), rows.to(frozen.dtype), frozen)


def token_id(tokenizer, token: str) -> int:
    """Id of a token that must encode to exactly one tokenizer id."""
    ids = tokenizer(token, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ValueError(f"token {token!r} must be a single tokenizer token, it encodes to {len(ids)} ids {ids}")
    return ids[0]


def add_placeholder(tokenizer, placeholder: str) -> int:
    """Register ``placeholder`` as a new token (error if the vocabulary already has it)."""
    if tokenizer.add_tokens(placeholder) == 0 and placeholder in tokenizer.get_vocab():
        if tokenizer.convert_tokens_to_ids(placeholder) < tokenizer.vocab_size:
            raise ValueError(f"placeholder token {placeholder!r} is already an ordinary word of the vocabulary; choose another")
    return tokenizer.convert_tokens_to_ids(placeholder)


def save_embedding(path: str | Path, token: str, vector: torch.Tensor) -> Path:
    """Write ``{token: [1, D] float32}`` as diffusers' learned_embeds.safetensors."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({token: vector.detach().to(torch.float32).reshape(1, -1).contiguous().cpu()}, str(path))
    return path


def load_embedding(path: str | Path) -> tuple[str, torch.Tensor]:
    tensors = load_file(str(path))
    if len(tensors) != 1:
        raise ValueError(f"{path}: expected one token, found {sorted(tensors)}")
    (token, vector), = tensors.items()
    return token, vector.reshape(-1)


@dataclass(frozen=True)
class TISettings:
    """Data-independent textual-inversion hyperparameters (the same for every image); the
    defaults are the run config's (:class:`common.config.RunConfig`), built by
    :func:`common.settings.ti_settings`."""

    steps: int = RunConfig.ti_steps
    learning_rate: float = RunConfig.learning_rate
    batch_size: int = RunConfig.batch_size
    initializer_token: str = RunConfig.initializer_token
    placeholder_token: str = RunConfig.placeholder_token
    prompt_template: str = RunConfig.prompt_template
    default_caption: str = RunConfig.default_caption


def initializer_vector(pipe, settings: TISettings) -> torch.Tensor:
    """The frozen embedding of the initializer token, float32 [D] on the CPU."""
    tid = token_id(pipe.tokenizer, settings.initializer_token)
    table = pipe.text_encoder.get_input_embeddings()
    base = table.base if isinstance(table, PlaceholderEmbedding) else table
    return base.weight[tid].detach().float().cpu()
