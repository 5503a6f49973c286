"""Wire encoding of adapters: a flat tree of tensors <-> a Flower ArrayRecord.

Tensors travel as float32 numpy arrays under their tree keys (``unet.<peft name>``...).
Decoding on the server goes through :func:`server.replies.read_tree`, which checks every key,
shape, dtype and value before anything touches an aggregate.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord


def tree_record(tree: dict[str, torch.Tensor]) -> ArrayRecord:
    """A flat tree of tensors as a Flower ArrayRecord (float32 on the wire)."""
    return ArrayRecord(array_dict={k: Array(v.detach().cpu().numpy().astype(np.float32)) for k, v in tree.items()})


def record_tree(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """The float32 tensors of an ArrayRecord, by key (no checks: see ``read_tree``)."""
    return {k: torch.from_numpy(np.asarray(record[k].numpy(), dtype=np.float32).copy()) for k in record}
