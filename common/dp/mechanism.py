"""The Gaussian sum mechanism shared by every privadapt path.

One object carries the whole mechanism, in the shape of TensorFlow Privacy's DPQuery:
``bound`` (clip or normalize one record, run where the record lives: on the site),
``add`` (sum bounded records; sums of sums merge the same way across sites), and ``release``
(add N(0, (z*C)^2 I) once over the total and divide by a PUBLIC, fixed denominator). The
release returns a :class:`PrivacyEvent`; accounting is not done here but by
:mod:`common.dp.accounting`, which reads the events.

Sensitivity: every bounded record has L2 norm <= C, so adding or removing one record (one
image for DPAgg-TI, one site's delta for DP-FedAvg) changes the sum by at most C in L2.
With a fixed denominator the denominator itself reveals nothing, and the release is the
sampled Gaussian mechanism of Abadi et al. 2016 / Mironov et al. 2019 with noise multiplier
z = std / C. (DPAgg-TI: Peetathawatchai et al., arXiv 2411.14639, Alg. 1; DP-FedAvg:
McMahan et al., "Learning Differentially Private Recurrent Language Models", ICLR 2018.)
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Iterable, Literal, Mapping, Sequence

import numpy as np
import torch

from common.dp.noise import NoiseSource

BoundMode = Literal["clip", "normalize"]
Tree = Mapping[str, torch.Tensor]
# A record the server read off the wire: tensors, or NumPy arrays (read-only views of the
# message bytes, float32 as sent); :meth:`GaussianSumMechanism.add_bounded` takes either.
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


# Entries per run of the norm's float64 conversion and of the blocked sum: 64K float64 entries
# (512 KB, within a 1 MB L2). Measured on SD 1.5 LoRA rank 4 and 64 against runs of 4K-128K
# entries (BENCHMARKS.md, item 3): below 32K the NumPy calls per run and record cost more than
# the cache saves; 32K-128K were equal within the noise.
_SQUARES_CHUNK = 1 << 16
_ADD_CHUNK = 1 << 16
_DIRECT_PIECE = 1 << 14  # pieces at least this long on average are added one by one, not staged


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
    across array boundaries: a tree of many small tensors costs one conversion and one BLAS
    ``dot`` per run, not per tensor); each run is converted to float64 (exact for float16/32:
    every square is then exact too) and its dot product added, left to right, to a Python
    float. The result depends only on the entries and their order, so every caller that
    passes the same values in the same order gets the same float, bit for bit."""
    if len(flats) == 1 and flats[0].size <= _SQUARES_CHUNK:  # one small array: the one run is the array
        run = flats[0].astype(np.float64)
        return float(np.dot(run, run))
    plan = chunk_plan(tuple(flat.size for flat in flats) if sizes is None else sizes, _SQUARES_CHUNK)
    if len(plan) == 1:  # one run (a small tree): one conversion call, no stage to set up
        run = np.concatenate(chunk_pieces(flats, plan[0]), dtype=np.float64)
        return float(np.dot(run, run))
    squares = 0.0
    stage = np.empty(_SQUARES_CHUNK, dtype=np.float64)
    for entry in plan:
        run = stage[:entry[1] - entry[0]]
        np.concatenate(chunk_pieces(flats, entry), out=run)
        squares += float(np.dot(run, run))
    return squares


def sum_of_squares(value: "torch.Tensor | np.ndarray") -> float:
    """sum(value^2) over every entry, accumulated in float64 (each square of a float16/32
    entry is exact in float64). Finite iff every entry is finite, for entries in float32's
    range (their squares cannot overflow float64), so the same pass also detects NaN/Inf.

    On the CPU: :func:`flat_sum_of_squares` of the one array (float64 copies of at most 64K
    entries at a time and BLAS ``dot``, which measured 2-10x faster than
    ``np.einsum(..., dtype=float64)`` and ``Tensor.to(float64)`` + ``torch.dot`` on this
    project's adapter tensors, 3K-800K entries)."""
    flats = flat_views([value])
    if flats is not None:
        return flat_sum_of_squares(flats)
    flat = value.detach().reshape(-1).to(torch.float64)
    return float(torch.dot(flat, flat))


def tree_sum_of_squares(values: "Iterable[torch.Tensor | np.ndarray]") -> float:
    """sum(x^2) over every entry of every array in ``values``, in that order, accumulated in
    float64: :func:`flat_sum_of_squares` of their concatenation on the CPU, tensor by tensor
    (:func:`sum_of_squares`) when one of them needs torch (a GPU or bfloat16 tensor)."""
    values = list(values)
    flats = flat_views(values)
    if flats is not None:
        return flat_sum_of_squares(flats)
    squares = 0.0
    for value in values:  # left to right, as the CPU path adds its runs
        squares += sum_of_squares(value)
    return squares


@dataclass(frozen=True)
class PrivacyEvent:
    """One (possibly repeated) application of the Poisson-subsampled Gaussian mechanism.

    ``sampling`` and ``adjacency`` are recorded so the accountant can refuse a mismatch: the
    Opacus accountants used here are valid for Poisson sampling under add/remove-one
    adjacency only. ``scope`` names the disjoint part of the data the event touches
    ("all" for a release over every site's records, "site-3" for DP-SGD inside one site):
    events compose within a scope, and disjoint scopes compose in parallel (the maximum).
    """

    noise_multiplier: float
    sample_rate: float
    steps: int = 1
    unit: Literal["record", "site"] = "record"
    sampling: Literal["poisson", "none", ""] = ""  # "": derived, "none" iff sample_rate == 1
    adjacency: Literal["add-remove"] = "add-remove"
    scope: str = "all"
    label: str = ""

    def __post_init__(self) -> None:
        if not (0.0 < self.sample_rate <= 1.0):
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.noise_multiplier < 0 or not math.isfinite(self.noise_multiplier):
            raise ValueError(f"noise_multiplier must be finite and >= 0, got {self.noise_multiplier}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not self.sampling:
            object.__setattr__(self, "sampling", "none" if self.sample_rate == 1.0 else "poisson")
        if self.sampling == "none" and self.sample_rate != 1.0:
            raise ValueError("sampling 'none' means every record is used: sample_rate must be 1")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "PrivacyEvent":
        return cls(**dict(d))


@dataclass(frozen=True)
class GaussianSumMechanism:
    """Bound records to L2 norm ``clip_norm``, sum, add Gaussian noise, divide.

    Args:
        clip_norm: the bound C on each record's L2 norm (flat over all of its tensors).
        noise_multiplier: z; the noise added to the sum has std z*C per coordinate.
        bound_mode: ``"clip"`` scales records with norm > C down to C (others unchanged);
            ``"normalize"`` scales every non-zero record to norm exactly C. Both are
            zero-safe: an all-zero record stays zero.
    """

    clip_norm: float
    noise_multiplier: float
    bound_mode: BoundMode = "clip"

    def __post_init__(self) -> None:
        if not (self.clip_norm > 0 and math.isfinite(self.clip_norm)):
            raise ValueError(f"clip_norm must be finite and > 0, got {self.clip_norm}")
        if self.noise_multiplier < 0 or not math.isfinite(self.noise_multiplier):
            raise ValueError(f"noise_multiplier must be finite and >= 0, got {self.noise_multiplier}")
        if self.bound_mode not in ("clip", "normalize"):
            raise ValueError(f"bound_mode must be 'clip' or 'normalize', got {self.bound_mode!r}")

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise added to the SUM (before the division)."""
        return self.noise_multiplier * self.clip_norm

    # ---- bounding (runs on the site) -------------------------------------------------
    def scale_factors(self, norms: torch.Tensor) -> torch.Tensor:
        """Per-record multipliers that bound records of the given L2 norms (float64)."""
        norms = norms.to(torch.float64)
        if not torch.isfinite(norms).all():
            raise ValueError("cannot bound a record with NaN or infinite entries")
        # A zero record has nothing to scale; dividing by 1 instead of 0 keeps it zero.
        safe = torch.where(norms > 0, norms, torch.ones_like(norms))
        # Tensor / tensor is IEEE division: C / C == 1 exactly, so clip leaves records with
        # norm <= C bitwise unchanged. (A Python float / tensor is computed as C * (1 / norm),
        # which rounds twice and shrinks some of those records by an ulp.)
        factors = torch.full_like(safe, self.clip_norm) / safe
        return torch.clamp(factors, max=1.0) if self.bound_mode == "clip" else factors

    def bound_rows(self, records: torch.Tensor) -> torch.Tensor:
        """Bound each row of ``records`` ([n, ...]) independently; returns float64."""
        flat = records.detach().to(torch.float64).flatten(start_dim=1)
        factors = self.scale_factors(torch.linalg.vector_norm(flat, dim=1))
        return (flat * factors[:, None]).reshape(records.shape)

    def scale_factor(self, norm: float) -> float:
        """:meth:`scale_factors` of one float64 norm, in Python floats: the same IEEE
        operations (C / norm, one correctly rounded division, so C / C == 1 exactly; then at
        most 1 for clip), without building tensors for each reply the server bounds."""
        if not math.isfinite(norm):
            raise ValueError("cannot bound a record with NaN or infinite entries")
        factor = self.clip_norm / (norm if norm > 0 else 1.0)  # a zero record stays zero
        return min(factor, 1.0) if self.bound_mode == "clip" else factor

    @staticmethod
    def tree_norm(record: ArrayTree) -> torch.Tensor:
        """The flat L2 norm of a record made of several tensors (or arrays), computed in float64
        by :func:`tree_sum_of_squares` over its values in key order, as
        :func:`server.replies.read_update` does: the same values give the same norm, bit for bit."""
        return torch.tensor(math.sqrt(tree_sum_of_squares(record.values())), dtype=torch.float64)

    def bound_tree(self, record: Tree) -> dict[str, torch.Tensor]:
        """Bound one record made of several tensors by its flat L2 norm over all of them."""
        factor = self.scale_factors(self.tree_norm(record).reshape(1))[0]
        return {k: v.detach().to(torch.float64) * factor for k, v in record.items()}

    # ---- aggregation and release (runs on the server) --------------------------------
    @staticmethod
    def add(total: Tree | None, part: Tree) -> dict[str, torch.Tensor]:
        """Merge a partial sum (one site's, or one record's) into the running total."""
        part64 = {k: v.detach().to(torch.float64) for k, v in part.items()}
        if total is None:
            return part64
        if total.keys() != part64.keys():
            raise ValueError(f"partial sum has keys {sorted(part64)}, expected {sorted(total)}")
        for k, v in part64.items():
            if v.shape != total[k].shape:
                raise ValueError(f"partial sum {k!r} has shape {tuple(v.shape)}, expected {tuple(total[k].shape)}")
        return {k: total[k] + part64[k] for k in total}

    @staticmethod
    def add_block(total: "RunningSum | None", parts: Sequence[ArrayTree]) -> "RunningSum":
        """``add`` of several partial sums in turn, IN PLACE and a block at a time
        (:meth:`add_bounded_block` with every factor 1: each entry of the total sees the same
        float64 additions in the same order as ``add`` one part after another, bit for bit)."""
        return _sum_block(total, parts, [1.0] * len(parts))

    def add_bounded(self, total: "RunningSum | None", record: ArrayTree, *,
                    norm: float | None = None) -> "RunningSum":
        """``add(total, bound_tree(record))`` without the intermediate copies: a block of one
        record (:meth:`add_bounded_block`)."""
        return self.add_bounded_block(total, [record], None if norm is None else [norm])

    def add_bounded_block(self, total: "RunningSum | None", records: Sequence[ArrayTree],
                          norms: Sequence[float] | None = None) -> "RunningSum":
        """``add(total, bound_tree(record))`` for each record in turn, IN PLACE (the server's hot path).

        ``total`` must be None (the first block starts the sum) or a running sum this method
        or :meth:`add_block` returned. Each record is scaled by the factor :meth:`bound_tree`
        uses, from its float64 flat norm: ``norms[i]`` when the caller already computed it
        from these same values (:func:`server.replies.read_update` does, to check the bound),
        else :meth:`tree_norm`. A record within the bound (factor exactly 1) adds exactly as
        :meth:`add` does (float32 -> float64 is exact; one rounding per addition); a clipped
        one is added as ``float64(record) * factor``, bound_tree's own product. Every entry of
        the total sees these additions in record order, so a block gives the float64 result of
        adding its records one by one, bit for bit.

        Why blocks: one record at a time, the float64 total is read and written once per record
        (16 bytes per parameter, besides the 4 of the float32 record); here the total is walked
        in runs of ``_ADD_CHUNK`` entries (cache-sized) and every record of the block is added
        to a run before the next, so the total costs 16 bytes per parameter per BLOCK. Records
        may hold tensors or NumPy arrays (the read-only float32 views ``read_update`` gives);
        a GPU or bfloat16 record takes the torch path, one record at a time. Every record is
        checked (keys, shapes) before the total is touched."""
        if norms is None:
            norms = [float(self.tree_norm(record)) for record in records]
        elif len(norms) != len(records):
            raise ValueError(f"{len(norms)} norms for {len(records)} records")
        return _sum_block(total, records, [self.scale_factor(norm) for norm in norms])

    def release(
        self,
        total: Tree,
        *,
        denominator: float,
        noise: NoiseSource,
        sample_rate: float,
        unit: Literal["record", "site"],
        label: str = "",
    ) -> tuple[dict[str, torch.Tensor], PrivacyEvent]:
        """Add the noise once over the total and divide by the public ``denominator``.

        ``denominator`` must not depend on private data (use the expected count q*N of a
        declared public N, never the observed count). Returns the float64 release and the
        privacy event it spends.
        """
        if not (denominator > 0 and math.isfinite(denominator)):
            raise ValueError(f"denominator must be finite and > 0, got {denominator}")
        noised = {k: (v.to(torch.float64) + noise.normal(v.shape, self.noise_std)) / denominator for k, v in total.items()}
        event = PrivacyEvent(
            noise_multiplier=self.noise_multiplier,
            sample_rate=sample_rate,
            steps=1,
            unit=unit,
            label=label,
        )
        return noised, event


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


class FlatRecord(Mapping[str, np.ndarray]):
    """A record as 1-D arrays in key order, with each key's shape (what
    :func:`server.replies.read_update` gives: read-only float32 views of a reply's bytes).

    Reading a key gives that array in its shape (a view); the blocked sum takes ``flats``
    as they are when the keys and shapes are the running sum's, so a record of many small
    tensors costs no per-tensor work there."""

    def __init__(self, keys: list[str], shapes: list[tuple[int, ...]], flats: list[np.ndarray]) -> None:
        self.keys_list, self.shapes, self.flats = keys, shapes, flats
        self._index: dict[str, int] | None = None

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
    :meth:`GaussianSumMechanism.release` and the strategies use it as any tree. The blocked
    sum (:func:`_add_runs`) walks the buffer in runs of ``_ADD_CHUNK`` entries across tensor
    boundaries: a tree of many small tensors (SD 1.5 rank 4: 256 tensors of 3K entries) costs a
    few NumPy calls per record and run, not one per tensor."""

    def __init__(self, keys: list[str], shapes: list[tuple[int, ...]]) -> None:
        self.keys_list, self.shapes = keys, shapes
        sizes = tuple(math.prod(shape) for shape in shapes)
        self.flat = np.empty(sum(sizes), dtype=np.float64)
        self.plan = chunk_plan(sizes, _ADD_CHUNK)
        self._views: dict[str, torch.Tensor] = {}
        offset = 0
        for key, shape, size in zip(keys, shapes, sizes):
            self._views[key] = torch.from_numpy(self.flat[offset:offset + size].reshape(shape))
            offset += size

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._views[key]

    def __iter__(self):
        return iter(self._views)

    def __len__(self) -> int:
        return len(self._views)


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


def _record_flats(keys: list[str], shapes: list[tuple[int, ...]], record: ArrayTree) -> list[np.ndarray] | None:
    """The record's entries as 1-D arrays in the order of ``keys`` (checked as
    :func:`_ordered_values` does), or None if one of them needs torch."""
    if isinstance(record, FlatRecord) and record.keys_list == keys and record.shapes == shapes:
        return record.flats
    return flat_views(_ordered_values(keys, shapes, record))


def _sum_block(total: RunningSum | None, records: Sequence[ArrayTree], factors: list[float]) -> RunningSum | None:
    """``total + float64(record) * factor`` for each record in turn, in place (``factor`` 1:
    just the record). Every record is checked (keys, shapes) before the total is touched.
    CPU arrays go through :func:`_add_runs` into a :class:`FlatSum`; a GPU or bfloat16 record,
    or a total that is a plain dict, through torch one record at a time."""
    if not records:
        return total
    keys, shapes = (total.keys_list, total.shapes) if isinstance(total, FlatSum) else _layout(
        records[0] if total is None else total)
    flats = [_record_flats(keys, shapes, record) for record in records]
    if (total is None or isinstance(total, FlatSum)) and all(f is not None for f in flats):
        fresh = total is None
        if fresh:
            total = FlatSum(keys, shapes)
        _add_runs(total.flat, total.plan, flats, factors, fresh)
        return total
    for record, factor in zip(records, factors):
        values = _ordered_values(keys, shapes, record)
        if total is None:  # the first record starts the sum: a float64 copy, scaled as bound_tree does
            total = {k: _scaled_float64(v, factor) for k, v in zip(keys, values)}
        else:
            for k, v in zip(keys, values):
                _add_into(total[k], v, factor)
    return total


def _add_runs(out: np.ndarray, plan, flats: list[list[np.ndarray]], factors: list[float], fresh: bool) -> None:
    """Add every record (``flats[j]``: its 1-D arrays in key order, times ``factors[j]``) into
    the flat float64 sum ``out``, one cache-sized run of ``out`` at a time.

    For each run every record's matching entries are added before the next run, so the run
    stays in cache and ``out`` is read and written once per block instead of once per record.
    Each entry still sees the additions one record after another in block order: the float64
    result is that of adding the records one by one. A record's pieces of a run are converted
    to float64 (exact) with one ``np.concatenate`` into a cache-resident stage, scaled there
    when clipped (float64(x) * factor, one rounding, as bound_tree), then added. ``fresh``: the
    first record STARTS the sum (its scaled copy is written, nothing is read)."""
    stage = np.empty(min(_ADD_CHUNK, out.size), dtype=np.float64)
    for entry in plan:
        run = out[entry[0]:entry[1]]
        for j, (record, factor) in enumerate(zip(flats, factors)):
            pieces = chunk_pieces(record, entry)
            if fresh and j == 0:
                _load(run, pieces, factor)
            elif factor == 1.0 and (len(pieces) == 1 or len(pieces) * _DIRECT_PIECE <= run.size):
                _add_pieces(run, pieces)  # one or a few large pieces: no stage (measured 15% faster)
            else:
                part = stage[:run.size]
                _load(part, pieces, factor)
                np.add(run, part, out=run)


def _add_pieces(run: np.ndarray, pieces: list[np.ndarray]) -> None:
    """``run += float64(concatenate(pieces))``, one ``np.add`` per piece: NumPy converts each
    float32 piece in its own loop, exactly, and adds in float64 (one rounding per entry)."""
    if len(pieces) == 1:
        np.add(run, pieces[0], out=run)
        return
    offset = 0
    for piece in pieces:
        part = run[offset:offset + piece.size]
        np.add(part, piece, out=part)
        offset += piece.size


def _load(out: np.ndarray, pieces: list[np.ndarray], factor: float) -> None:
    """``out = float64(concatenate(pieces)) * factor`` (a plain exact copy when factor is 1)."""
    np.concatenate(pieces, out=out)
    if factor != 1.0:
        np.multiply(out, factor, out=out)
