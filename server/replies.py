"""Checks on what sites send back, before anything touches an aggregate."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord, Message

from common import keys


class ReplyError(ValueError):
    """A site's reply that cannot enter the aggregate."""


def read_vector(reply: Message, key: str, dim: int) -> torch.Tensor:
    """The float64 vector ``key`` of a site's reply, checked: no error, present, shape
    (dim,), finite."""
    if reply.has_error():
        raise ReplyError(f"site reported an error: {reply.error.reason}")
    arrays = reply.content.get(keys.ARRAYS)
    if not isinstance(arrays, ArrayRecord) or key not in arrays:
        raise ReplyError(f"reply has no {keys.ARRAYS}/{key}")
    value = torch.from_numpy(np.asarray(arrays[key].numpy(), dtype=np.float64).copy())
    if value.shape != (dim,):
        raise ReplyError(f"{key} has shape {tuple(value.shape)}, expected ({dim},)")
    if not torch.isfinite(value).all():
        raise ReplyError(f"{key} has NaN or infinite entries")
    return value
