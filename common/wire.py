"""Wire encoding of adapters: a flat tree of tensors <-> a Flower ArrayRecord.

Two layouts, both float32 on the wire:

- **per tensor** (:func:`tree_record`): one ``Array`` under each tree key (``unet.<peft name>``...);
- **packed** (:func:`packed_record`): ONE ``Array``, the tensors' entries concatenated (each in
  C order) in the tree's key order, under the key ``privadapt.packed:<digest>``. Both sides know
  that order and the shapes (the run config fixes the adapter); the digest of keys and shapes
  lets the receiver check that they are the same, so only the numbers travel.

Messages use the packed layout: Flower moves every ``Array`` as its own object (plus a chunk
object each), one request apiece between SuperLink, SuperNode and ServerApp, so a 64-tensor
LoRA adapter is ~131 requests per message leg and 1 packed array is ~5 (BENCHMARKS.md,
"Flower rounds in deployment"). Decoding on the server goes through
:func:`server.replies.read_update`, which accepts either layout and checks every key, shape,
dtype and value before anything touches an aggregate.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from common.dp.flatsum import split_at
from common.lora import tree_shapes

PACKED = "privadapt.packed"  # the one key of a packed record is PACKED:<layout digest> (no tensor is named so)


def layout_digest(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """16 hex digits naming the keys and shapes in their order: a packed record carries its
    sender's, so a receiver whose adapter is laid out otherwise (other targets, rank or key
    order: same size, different meaning) gets an error instead of misplaced values."""
    if isinstance(shapes, Layout):
        return shapes.digest
    text = ";".join(f"{k}={','.join(map(str, shape))}" for k, shape in shapes.items())
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Layout(Mapping[str, tuple[int, ...]]):
    """An adapter's keys and shapes in order (read-only), with what every packed message of
    the run needs computed once: the digest, each tensor's entries and offset, the total.

    A receiver reads every reply of a run against the same layout, so hashing 64-256 keys and
    shapes per reply (what :func:`packed_key` does for a plain mapping) is avoided by holding
    one ``Layout``; it compares equal to a dict of the same keys and shapes."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        self._shapes = {k: tuple(int(n) for n in shape) for k, shape in shapes.items()}
        self.names = list(self._shapes)
        self.shape_list = list(self._shapes.values())
        self.sizes = tuple(math.prod(shape) for shape in self.shape_list)
        self.offsets = tuple(int(n) for n in np.cumsum((0,) + self.sizes))
        self.total = self.offsets[-1]
        self.digest = layout_digest(self._shapes)
        self.key = f"{PACKED}:{self.digest}"

    def __getitem__(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def __repr__(self) -> str:
        return f"Layout({len(self)} tensors, {self.total} entries, {self.digest})"


def as_layout(shapes: Mapping[str, tuple[int, ...]]) -> Layout:
    return shapes if isinstance(shapes, Layout) else Layout(shapes)


def packed_key(shapes: Mapping[str, tuple[int, ...]]) -> str:
    return shapes.key if isinstance(shapes, Layout) else f"{PACKED}:{layout_digest(shapes)}"


def tree_record(tree: dict[str, torch.Tensor]) -> ArrayRecord:
    """A flat tree of tensors as a Flower ArrayRecord, one Array per key (float32 on the wire)."""
    return ArrayRecord(array_dict={k: Array(v.detach().cpu().numpy().astype(np.float32)) for k, v in tree.items()})


def packed_record(tree: dict[str, torch.Tensor]) -> ArrayRecord:
    """A flat tree of tensors as ONE float32 Array under :func:`packed_key`, in the tree's key order."""
    parts = [v.detach().cpu().reshape(-1).to(torch.float32) for v in tree.values()]
    flat = torch.cat(parts).numpy() if parts else np.zeros(0, dtype=np.float32)
    return ArrayRecord(array_dict={packed_key(tree_shapes(tree)): Array(flat)})


def packed_array_key(record: ArrayRecord) -> str | None:
    """The key of a packed record's one Array, or None for a per-tensor record."""
    names = list(record.keys())
    return names[0] if len(names) == 1 and names[0].startswith(PACKED + ":") else None


def check_layout(key: str, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """ValueError unless the packed ``key`` names the layout ``shapes``."""
    if key != packed_key(shapes):
        raise ValueError(f"packed record's layout {key.partition(':')[2]!r} is not this adapter's "
                         f"{layout_digest(shapes)!r} (other LoRA targets, rank or tensor order)")


def record_tree(record: ArrayRecord, shapes: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, torch.Tensor]:
    """The float32 tensors of an ArrayRecord, by key (no value checks: see ``read_update``).

    A packed record needs ``shapes`` (the expected keys and shapes, in key order) and must hold
    exactly their number of entries; a per-tensor record is read as it is."""
    key = packed_array_key(record)
    if key is None:
        return {k: torch.from_numpy(np.asarray(record[k].numpy(), dtype=np.float32).copy()) for k in record}
    if shapes is None:
        raise ValueError(f"a packed record ({PACKED}) needs the adapter's shapes to be unpacked")
    layout = as_layout(shapes)
    check_layout(key, layout)
    flat = np.asarray(record[key].numpy(), dtype=np.float32).reshape(-1)
    if flat.size != layout.total:
        raise ValueError(f"packed record holds {flat.size} entries, the adapter has {layout.total}")
    return {k: torch.from_numpy(part.copy()).reshape(shape)
            for (k, shape), part in zip(layout.items(), split_packed(flat, layout))}


def split_packed(flat: np.ndarray, shapes: Mapping[str, tuple[int, ...]]) -> list[np.ndarray]:
    """The 1-D views of a packed array's tensors, in the order of ``shapes`` (its length checked by the caller)."""
    return split_at(flat, as_layout(shapes).offsets)
