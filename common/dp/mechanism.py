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

import math
from dataclasses import asdict, dataclass
from typing import Literal, Mapping

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


_SQUARES_CHUNK = 1 << 16  # entries converted to float64 at a time: 512 KB, stays in cache


def sum_of_squares(value: "torch.Tensor | np.ndarray") -> float:
    """sum(value^2) over every entry, accumulated in float64 (each square of a float16/32
    entry is exact in float64). Finite iff every entry is finite, for entries in float32's
    range (their squares cannot overflow float64), so the same pass also detects NaN/Inf.

    On the CPU: float64 copies of at most 64K entries at a time and BLAS ``dot``, which
    measured 2-10x faster than ``np.einsum(..., dtype=float64)`` and ``Tensor.to(float64)`` +
    ``torch.dot`` on this project's adapter tensors (3K-800K entries)."""
    array = cpu_array(value)
    if array is not None:
        flat = array.ravel(order="K")  # a view in memory order whenever the layout allows
        squares = 0.0
        for start in range(0, flat.size, _SQUARES_CHUNK):
            chunk = flat[start:start + _SQUARES_CHUNK].astype(np.float64)
            squares += float(np.dot(chunk, chunk))
        return squares
    flat = value.detach().reshape(-1).to(torch.float64)
    return float(torch.dot(flat, flat))


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

    @staticmethod
    def tree_norm(record: ArrayTree) -> torch.Tensor:
        """The flat L2 norm of a record made of several tensors (or arrays), computed in float64
        (the squares summed tensor by tensor in key order, as :func:`server.replies.read_update`
        does: the same values give the same norm, bit for bit)."""
        squares = 0.0
        for t in record.values():
            squares += sum_of_squares(t)
        return torch.tensor(math.sqrt(squares), dtype=torch.float64)

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

    def add_bounded(self, total: dict[str, torch.Tensor] | None, record: ArrayTree, *,
                    norm: float | None = None) -> dict[str, torch.Tensor]:
        """``add(total, bound_tree(record))`` without the intermediate copies (the server's hot path).

        The record is scaled by the same factor :meth:`bound_tree` uses and added into
        ``total`` IN PLACE: ``total`` must be a running sum this method returned (pass None
        for the first record). A record within the bound (factor exactly 1) adds exactly as
        :meth:`add` does (float32 -> float64 is exact; one rounding per addition); a clipped
        one is added as ``total + (float64(record) * factor)``, bound_tree's own arithmetic.

        ``record`` may hold tensors or NumPy arrays (:func:`server.replies.read_update`
        gives read-only float32 views of the message, never copied to float64). ``norm`` is
        the record's flat L2 norm in float64 when the caller already computed it from these
        same values (``read_update`` does, to check the bound); None computes it here with
        :meth:`tree_norm`. The clip factor comes from that float64 norm either way.
        """
        if norm is None:
            norm = float(self.tree_norm(record))
        factor = float(self.scale_factors(torch.tensor([norm], dtype=torch.float64))[0])
        if total is None:  # the first record starts the sum: a float64 copy, scaled as bound_tree does
            return {k: _scaled_float64(v, factor) for k, v in record.items()}
        if total.keys() != record.keys():
            raise ValueError(f"record has keys {sorted(record)}, expected {sorted(total)}")
        for k, v in record.items():
            if tuple(v.shape) != tuple(total[k].shape):
                raise ValueError(f"record {k!r} has shape {tuple(v.shape)}, expected {tuple(total[k].shape)}")
            _add_into(total[k], v, factor)
        return total

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
