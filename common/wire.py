"""Wire encoding of adapters: a flat tree of tensors <-> a Flower ArrayRecord.

Two layouts, both float32 on the wire:

- **per tensor** (:func:`tree_record`): one ``Array`` under each tree key (``unet.<peft name>``...);
- **packed** (:func:`packed_record`): ONE ``Array`` under :data:`PACKED`, the tensors' entries
  concatenated (each in C order) in the tree's key order. Both sides know that order and the
  shapes (the adapter's layout is fixed by the run config), so nothing else travels.

Messages use the packed layout: Flower moves every ``Array`` as its own object (plus a chunk
object each), one request apiece between SuperLink, SuperNode and ServerApp, so a 64-tensor
LoRA adapter is ~131 requests per message leg and 1 packed array is ~5 (BENCHMARKS.md,
"Flower rounds in deployment"). Decoding on the server goes through
:func:`server.replies.read_update`, which accepts either layout and checks every key, shape,
dtype and value before anything touches an aggregate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

PACKED = "privadapt.packed"  # the one key of a packed record (no adapter tensor is named so)


def tree_record(tree: dict[str, torch.Tensor]) -> ArrayRecord:
    """A flat tree of tensors as a Flower ArrayRecord, one Array per key (float32 on the wire)."""
    return ArrayRecord(array_dict={k: Array(v.detach().cpu().numpy().astype(np.float32)) for k, v in tree.items()})


def packed_record(tree: dict[str, torch.Tensor]) -> ArrayRecord:
    """A flat tree of tensors as ONE float32 Array under :data:`PACKED`, in the tree's key order."""
    parts = [v.detach().cpu().reshape(-1).to(torch.float32) for v in tree.values()]
    flat = torch.cat(parts).numpy() if parts else np.zeros(0, dtype=np.float32)
    return ArrayRecord(array_dict={PACKED: Array(flat)})


def is_packed(record: ArrayRecord) -> bool:
    return list(record.keys()) == [PACKED]


def record_tree(record: ArrayRecord, shapes: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, torch.Tensor]:
    """The float32 tensors of an ArrayRecord, by key (no value checks: see ``read_update``).

    A packed record needs ``shapes`` (the expected keys and shapes, in key order) and must hold
    exactly their number of entries; a per-tensor record is read as it is."""
    if not is_packed(record):
        return {k: torch.from_numpy(np.asarray(record[k].numpy(), dtype=np.float32).copy()) for k in record}
    if shapes is None:
        raise ValueError(f"a packed record ({PACKED}) needs the adapter's shapes to be unpacked")
    flat = np.asarray(record[PACKED].numpy(), dtype=np.float32).reshape(-1)
    sizes = [math.prod(shape) for shape in shapes.values()]
    if flat.size != sum(sizes):
        raise ValueError(f"packed record holds {flat.size} entries, the adapter has {sum(sizes)}")
    out, start = {}, 0
    for (key, shape), size in zip(shapes.items(), sizes):
        out[key] = torch.from_numpy(flat[start:start + size].copy()).reshape(shape)
        start += size
    return out
