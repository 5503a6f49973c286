"""The flat float64 buffer behind the server's blocked sum, and the norm's runs.

:meth:`common.dp.mechanism.GaussianSumMechanism.add_bounded_block` and ``add_block`` add
CHECKED records (keys and shapes those of the running sum, every record checked before the
total is touched) into one C-ordered float64 buffer (:class:`FlatSum`), every record of a
block in one compiled loop (:func:`common.dp.kernels.add_block`): each entry of the sum is read
and written once per block and still sees the float64 additions one record after another, in
block order, so the sum is exact in the sense that matters here: bit for bit the one that
adding the records one by one gives. :func:`flat_sum_of_squares` gives the float64 norm, in
runs (:func:`chunk_plan`, across tensor boundaries) that make it independent of how a record is
cut into tensors. Bounding, noise and release stay in :mod:`common.dp.mechanism`, the one entry
point; nothing here draws noise or decides a scale factor.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

from common.dp import kernels

# A record the server read off the wire: tensors, or NumPy arrays (read-only views of the
# message bytes, float32 as sent);
# :meth:`common.dp.mechanism.GaussianSumMechanism.add_bounded` takes either.
ArrayTree = Mapping[str, "torch.Tensor | np.ndarray"]
_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)


def cpu_array(value: "torch.Tensor | np.ndarray") -> np.ndarray | None:
    """``value`` as a NumPy array without a copy: a NumPy array itself, or a view of a CPU
    tensor of a dtype NumPy has (float16/32/64). None for anything else (a GPU tensor,
    bfloat16), which then takes the torch path. NumPy is used on the CPU because its
    mixed-precision loops (float32 in, float64 out) run 5-10x faster than torch's there."""
    if isinstance(value, np.ndarray):
        return value
    if value.device.type == "cpu" and value.dtype in _NUMPY_FLOATS:
        return value.detach().numpy()
    return None


# Entries per run of the norm: its runs' partial sums are added left to right whatever the
# tensors, and a run that spans tensors is staged into one contiguous array of this size.
_SQUARES_CHUNK = 1 << 16


def flat_views(values: "Iterable[torch.Tensor | np.ndarray]") -> list[np.ndarray] | None:
    """The entries of ``values`` as 1-D NumPy arrays in C order (views whenever the layout
    allows; a Fortran-ordered array is copied), or None if any of them needs torch
    (:func:`cpu_array`)."""
    flats = []
    for value in values:
        array = cpu_array(value)
        if array is None:
            return None
        flats.append(array.reshape(-1))
    return flats


@functools.lru_cache(maxsize=256)
def chunk_plan(sizes: tuple[int, ...], chunk: int) -> tuple[tuple[int, int, int, int, int, int], ...]:
    """Cut the concatenation of arrays of ``sizes`` entries into runs of ``chunk`` entries.

    Entry ``(start, stop, first, lo, last, hi)``: entries ``start:stop`` of the concatenation
    are ``flats[first][lo:]``, ``flats[first + 1:last]`` and ``flats[last][:hi]`` (or
    ``flats[first][lo:hi]`` when ``first == last``). Cached: a run sees the same few trees."""
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)
    plan, index = [], 0
    for start in range(0, offsets[-1], chunk):
        stop = min(start + chunk, offsets[-1])
        while offsets[index + 1] <= start:  # skip empty arrays and those entirely before start
            index += 1
        last = index
        while offsets[last + 1] < stop:
            last += 1
        plan.append((start, stop, index, start - offsets[index], last, stop - offsets[last]))
    return tuple(plan)


def chunk_pieces(flats: list[np.ndarray], entry: tuple[int, int, int, int, int, int]) -> list[np.ndarray]:
    """The views that make up one :func:`chunk_plan` entry, in order."""
    _, _, first, lo, last, hi = entry
    if first == last:
        whole = lo == 0 and hi == flats[first].size
        return [flats[first] if whole else flats[first][lo:hi]]
    pieces = flats[first:last + 1]
    pieces[0], pieces[-1] = pieces[0][lo:], pieces[-1][:hi]
    return pieces


def flat_sum_of_squares(flats: list[np.ndarray], sizes: tuple[int, ...] | None = None) -> float:
    """sum(x^2) over the concatenation of ``flats`` (1-D arrays; ``sizes``: their lengths,
    when the caller has them at hand), accumulated in float64.

    The concatenation is cut into runs of ``_SQUARES_CHUNK`` entries (:func:`chunk_plan`,
    across array boundaries); each run's float64 sum of squares comes from the fused loop
    :func:`common.dp.kernels.run_squares` (float32 read and squared in float64: every square of
    a float16/32 entry is exact), and the runs' sums are added left to right. A run within one
    array is read where it lies; a run that spans arrays is first copied into one contiguous
    stage (float32, or float64 when one of its pieces is). So the result depends only on the
    entries, their order and dtype: the same values give the same float, bit for bit, whether
    they come as one packed array or as one array per tensor."""
    if len(flats) == 1:  # one array: its runs are walked inside the compiled loop
        return kernels.run_squares(flats[0], _SQUARES_CHUNK)
    plan = chunk_plan(tuple(flat.size for flat in flats) if sizes is None else sizes, _SQUARES_CHUNK)
    squares = 0.0
    stage: np.ndarray | None = None
    for entry in plan:
        pieces = chunk_pieces(flats, entry)
        if len(pieces) == 1:
            run = pieces[0]
        else:
            dtype = np.float64 if any(piece.dtype == np.float64 for piece in pieces) else np.float32
            if stage is None or stage.dtype != dtype:
                stage = np.empty(_SQUARES_CHUNK, dtype=dtype)
            run = stage[:entry[1] - entry[0]]
            np.concatenate(pieces, out=run)
        squares += kernels.run_squares(run, _SQUARES_CHUNK)  # one run: the same loop as above
    return squares


def _scaled_float64(value: "torch.Tensor | np.ndarray", factor: float) -> torch.Tensor:
    """A new float64 tensor holding ``float64(value) * factor`` (a plain copy when factor is 1)."""
    if isinstance(value, np.ndarray):
        out = np.array(value, dtype=np.float64, order="C")
        if factor != 1.0:
            np.multiply(out, factor, out=out)
        return torch.from_numpy(out)
    value = value.detach()
    return value.to(torch.float64, copy=True) if factor == 1.0 else value.to(torch.float64) * factor


def _add_into(total: torch.Tensor, value: "torch.Tensor | np.ndarray", factor: float) -> None:
    """``total += float64(value) * factor`` in place (just ``total += value`` when factor is 1).

    On the CPU, through NumPy: ``np.add`` reads float32 and accumulates in float64 in one
    pass. Elsewhere (a GPU sum, a bfloat16 record), torch."""
    out = total.numpy() if total.device.type == "cpu" and total.dtype == torch.float64 else None
    array = cpu_array(value) if out is not None else None
    if array is not None:
        np.add(out, array if factor == 1.0 else np.multiply(array, factor, dtype=np.float64), out=out)
        return
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(np.array(value, dtype=np.float64))
    value = value.detach().to(device=total.device, dtype=torch.float64)
    total.add_(value if factor == 1.0 else value * factor)


def split_at(flat: np.ndarray, offsets: Sequence[int]) -> list[np.ndarray]:
    """The views ``flat[offsets[i]:offsets[i + 1]]``, one per consecutive pair of ``offsets``."""
    return [flat[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]


class FlatRecord(Mapping[str, np.ndarray]):
    """A record as 1-D arrays in key order, with each key's shape (what
    :func:`server.replies.read_update` gives: read-only float32 views of a reply's bytes).

    Reading a key gives that array in its shape (a view); the blocked sum takes ``flats``
    as they are when the keys and shapes are the running sum's, so a record of many small
    tensors costs no per-tensor work there. A packed reply (:func:`common.wire.packed_record`)
    is held as ``whole``, its entries contiguous in key order, with the ``offsets`` of the keys
    (``len(keys) + 1`` of them): the blocked sum then walks it as one array, and ``flats`` are
    its views, cut when first asked for."""

    def __init__(self, keys: list[str], shapes: list[tuple[int, ...]], flats: list[np.ndarray] | None = None, *,
                 whole: np.ndarray | None = None, offsets: Sequence[int] | None = None) -> None:
        if (flats is None) == (whole is None) or (whole is not None and offsets is None):
            raise ValueError("a FlatRecord takes its flats, or one whole array with the offsets of its keys")
        self.keys_list, self.shapes, self.whole = keys, shapes, whole
        self._flats, self._offsets = flats, offsets
        self._index: dict[str, int] | None = None

    @property
    def flats(self) -> list[np.ndarray]:
        if self._flats is None:
            self._flats = split_at(self.whole, self._offsets)
        return self._flats

    def __getitem__(self, key: str) -> np.ndarray:
        if self._index is None:
            self._index = {k: i for i, k in enumerate(self.keys_list)}
        i = self._index[key]
        return self.flats[i].reshape(self.shapes[i])

    def __iter__(self):
        return iter(self.keys_list)

    def __len__(self) -> int:
        return len(self.keys_list)


class FlatSum(Mapping[str, torch.Tensor]):
    """A float64 running sum over a fixed set of tensors, kept in ONE flat C-ordered buffer.

    Reads as a mapping of float64 tensors (views into the buffer, in key order), so
    :meth:`common.dp.mechanism.GaussianSumMechanism.release` and the strategies use it as any
    tree. The blocked sum (:func:`_add_records`) adds a block of packed records to the whole
    buffer in one compiled loop, and records held per tensor tensor by tensor (``flats``)."""

    def __init__(self, keys: list[str], shapes: list[tuple[int, ...]]) -> None:
        self.keys_list, self.shapes = keys, shapes
        sizes = tuple(math.prod(shape) for shape in shapes)
        self.flat = np.empty(sum(sizes), dtype=np.float64)
        self.flats = split_at(self.flat, (0, *itertools.accumulate(sizes)))  # 1-D views, one per key
        self._tensors: dict[str, torch.Tensor] | None = None  # the views, made when first read

    @property
    def _views(self) -> dict[str, torch.Tensor]:
        if self._tensors is None:
            self._tensors = {key: torch.from_numpy(part.reshape(shape)) for key, shape, part in
                             zip(self.keys_list, self.shapes, self.flats)}
        return self._tensors

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._views[key]

    def __iter__(self):
        return iter(self.keys_list)

    def __len__(self) -> int:
        return len(self.keys_list)


RunningSum = FlatSum | dict[str, torch.Tensor]


def _layout(record: ArrayTree) -> tuple[list[str], list[tuple[int, ...]]]:
    """A record's keys and shapes, in its order."""
    if isinstance(record, FlatRecord):
        return record.keys_list, record.shapes
    return list(record), [tuple(v.shape) for v in record.values()]


def _ordered_values(keys: list[str], shapes: list[tuple[int, ...]], record: ArrayTree) -> list:
    """The record's values in the order of ``keys``, after checking that it has exactly those
    keys and shapes (a record that does not fit raises ValueError)."""
    if record.keys() != set(keys):
        raise ValueError(f"record has keys {sorted(record)}, expected {sorted(keys)}")
    values = [record[k] for k in keys]
    for key, value, shape in zip(keys, values, shapes):
        if tuple(value.shape) != shape:
            raise ValueError(f"record {key!r} has shape {tuple(value.shape)}, expected {shape}")
    return values


def _fits(keys: list[str], shapes: list[tuple[int, ...]], record: ArrayTree) -> bool:
    """Whether ``record`` is a FlatRecord of exactly these keys and shapes in this order."""
    return isinstance(record, FlatRecord) and (record.keys_list is keys or record.keys_list == keys) and (
        record.shapes is shapes or record.shapes == shapes)


def _record_flats(keys: list[str], shapes: list[tuple[int, ...]], record: ArrayTree) -> list[np.ndarray] | None:
    """The record's entries as 1-D arrays in the order of ``keys`` (checked as
    :func:`_ordered_values` does), or None if one of them needs torch."""
    if _fits(keys, shapes, record):
        return record.flats
    return flat_views(_ordered_values(keys, shapes, record))


def _sum_block(total: RunningSum | None, records: Sequence[ArrayTree], factors: list[float],
               out: FlatSum | None = None) -> RunningSum | None:
    """``total + float64(record) * factor`` for each record in turn, in place (``factor`` 1:
    just the record). Every record is checked (keys, shapes) before the total is touched.
    CPU arrays go through :func:`_add_records` into a :class:`FlatSum`; a GPU or bfloat16 record,
    or a total that is a plain dict, through torch one record at a time. ``out``: when
    ``total`` is None, a FlatSum of the same keys and shapes to start the sum in (what it held
    is overwritten, never read) instead of a new buffer; ignored when it does not fit."""
    if not records:
        return total
    keys, shapes = (total.keys_list, total.shapes) if isinstance(total, FlatSum) else _layout(
        records[0] if total is None else total)
    flat_total = total is None or isinstance(total, FlatSum)
    # packed records (each one contiguous array) are added whole: the same additions in the
    # same order per entry as through their per-key views, bit for bit
    whole = flat_total and all(_fits(keys, shapes, r) and r.whole is not None for r in records)
    flats = [[r.whole] for r in records] if whole else [_record_flats(keys, shapes, r) for r in records]
    if flat_total and all(f is not None for f in flats):
        fresh = total is None
        if fresh:
            fits = out is not None and out.keys_list == keys and out.shapes == shapes
            total = out if fits else FlatSum(keys, shapes)
        _add_records([total.flat] if whole else total.flats, flats, factors, fresh)
        return total
    for record, factor in zip(records, factors):
        values = _ordered_values(keys, shapes, record)
        if total is None:  # the first record starts the sum: a float64 copy, scaled as bound_tree does
            total = {k: _scaled_float64(v, factor) for k, v in zip(keys, values)}
        else:
            for k, v in zip(keys, values):
                _add_into(total[k], v, factor)
    return total


def _add_records(out: list[np.ndarray], flats: list[list[np.ndarray]], factors: list[float], fresh: bool) -> None:
    """Add every record (``flats[j]``: its 1-D arrays, one per part of ``out``, times
    ``factors[j]``) into the float64 sum's parts ``out`` (the whole buffer, for packed records;
    one view per tensor otherwise), a part at a time, every record of the block at once
    (:func:`common.dp.kernels.add_block`): each entry of the sum is read and written once per
    block and sees the records' additions one after another in block order, so the float64
    result is that of adding the records one by one. A clipped record enters as
    float64(x) * factor (one rounding, as bound_tree). ``fresh``: the first record STARTS the
    sum (its scaled copy is written, nothing is read)."""
    for part, pieces in zip(out, zip(*flats)):
        if part.size:
            kernels.add_block(part, pieces, factors, fresh=fresh)
