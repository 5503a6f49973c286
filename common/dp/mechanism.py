"""The Gaussian sum mechanism shared by every privadapt path.

One object carries the whole mechanism, in the shape of TensorFlow Privacy's DPQuery:
``bound`` (clip or normalize one record, run where the record lives: on the site),
``add`` (sum bounded records; sums of sums merge the same way across sites), and ``release``
(add N(0, (z*C)^2 I) once over the total and divide by a PUBLIC, fixed denominator). The
release returns a :class:`PrivacyEvent`; accounting is not done here but by
:mod:`common.dp.accounting`, which reads the events. The server's blocked sum of bounded
records (:meth:`GaussianSumMechanism.add_bounded_block`) adds into the flat float64 buffer of
:mod:`common.dp.flatsum`.

Sensitivity: every bounded record has L2 norm <= C, so adding or removing one record (one
image for DPAgg-TI, one site's delta for DP-FedAvg) changes the sum by at most C in L2.
With a fixed denominator the denominator itself reveals nothing, and the release is the
sampled Gaussian mechanism of Abadi et al. 2016 / Mironov et al. 2019 with noise multiplier
z = std / C. (DPAgg-TI: Peetathawatchai et al., arXiv 2411.14639, Alg. 1; DP-FedAvg:
McMahan et al., "Learning Differentially Private Recurrent Language Models", ICLR 2018.)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Iterable, Literal, Mapping, Sequence

import numpy as np
import torch

from common.dp.flatsum import ArrayTree, FlatSum, RunningSum, _sum_block, flat_sum_of_squares, flat_views
from common.dp.noise import NoiseSource

BoundMode = Literal["clip", "normalize"]
Unit = Literal["record", "site"]
Tree = Mapping[str, torch.Tensor]


def sum_of_squares(value: "torch.Tensor | np.ndarray") -> float:
    """sum(value^2) over every entry, accumulated in float64 (each square of a float16/32
    entry is exact in float64). Finite iff every entry is finite, for entries in float32's
    range (their squares cannot overflow float64), so the same pass also detects NaN/Inf.

    On the CPU: :func:`~common.dp.flatsum.flat_sum_of_squares` of the one array (a fused,
    compiled loop, :mod:`common.dp.kernels`); a GPU or bfloat16 tensor through torch."""
    flats = flat_views([value])
    if flats is not None:
        return flat_sum_of_squares(flats)
    flat = value.detach().reshape(-1).to(torch.float64)
    return float(torch.dot(flat, flat))


def tree_sum_of_squares(values: "Iterable[torch.Tensor | np.ndarray]") -> float:
    """sum(x^2) over every entry of every array in ``values``, in that order, accumulated in
    float64: :func:`~common.dp.flatsum.flat_sum_of_squares` of their concatenation on the CPU, tensor by tensor
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
    unit: Unit = "record"
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

    def spends_as(self, other: "PrivacyEvent") -> bool:
        """Whether ``other`` spends the same: unit, steps, and (z, q) to float precision
        (scope and label aside). How a site checks the plan it is sent against its own, and
        how the server checks a site's report against the plan."""
        return (self.unit == other.unit and self.steps == other.steps
                and math.isclose(self.noise_multiplier, other.noise_multiplier, rel_tol=1e-12)
                and math.isclose(self.sample_rate, other.sample_rate, rel_tol=1e-12))

    def noted(self, note: str) -> "PrivacyEvent":
        """The same event with `` (note)`` appended to its label: why it is charged as it is."""
        return replace(self, label=f"{self.label} ({note})")

    @classmethod
    def from_dict(cls, d: Mapping) -> "PrivacyEvent":
        return cls(**dict(d))

    # ---- the events privadapt spends: every one is built by one of these -------------
    @classmethod
    def release(cls, noise_multiplier: float, sample_rate: float, unit: Unit, label: str = "") -> "PrivacyEvent":
        """One release of the Gaussian sum mechanism at (z, q): one step, scope ``"all"``
        (:meth:`GaussianSumMechanism.release`, the distributed release, a plan's charge)."""
        return cls(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=1, unit=unit, label=label)

    @classmethod
    def planned(cls, noise_multiplier: float, sample_rate: float, steps: int, unit: Unit, *, scope: str = "all",
                label: str = "") -> "PrivacyEvent":
        """``steps`` compositions at (z, q) of one unit: a plan's spend, as planned, declared
        to the sites, recomputed by them or reserved in a site's lifetime ledger."""
        return cls(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps, unit=unit, scope=scope,
                   label=label)

    @classmethod
    def dpsgd(cls, noise_multiplier: float, sample_rate: float, steps: int, *, scope: str = "all",
              label: str = "") -> "PrivacyEvent":
        """Record-level DP-SGD: ``steps`` Poisson steps at (z, q) (on one site: scope
        :func:`site_scope`)."""
        return cls.planned(noise_multiplier, sample_rate, steps, "record", scope=scope, label=label)


def site_scope(index: int) -> str:
    """The scope of what one site spends in its own data (DP-SGD): ``site-<index>``."""
    return f"site-{index}"


def expected_noise_norm_of_mean(noise_multiplier: float, clip_norm: float, dimension: int, denominator: float) -> float:
    """About E||N(0, (zC)^2 I_d)|| / denominator = z*C*sqrt(d)/denominator: the norm of the noise
    on a released mean of ``dimension`` coordinates, from public quantities only (the realised
    noise's norm, with the release, would tell a candidate sum apart exactly). The one place
    this figure is computed: the LoRA round metrics and the run's signal-to-noise plan
    (:func:`common.dp.plan.signal_to_noise`) both read it here."""
    return noise_multiplier * clip_norm * math.sqrt(dimension) / denominator


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
    def add_block(total: "RunningSum | None", parts: Sequence[ArrayTree], *, out: FlatSum | None = None) -> "RunningSum":
        """``add`` of several partial sums in turn, IN PLACE and a block at a time
        (:meth:`add_bounded_block` with every factor 1: each entry of the total sees the same
        float64 additions in the same order as ``add`` one part after another, bit for bit)."""
        return _sum_block(total, parts, [1.0] * len(parts), out)

    def add_bounded(self, total: "RunningSum | None", record: ArrayTree, *,
                    norm: float | None = None) -> "RunningSum":
        """``add(total, bound_tree(record))`` without the intermediate copies: a block of one
        record (:meth:`add_bounded_block`)."""
        return self.add_bounded_block(total, [record], None if norm is None else [norm])

    def add_bounded_block(self, total: "RunningSum | None", records: Sequence[ArrayTree],
                          norms: Sequence[float] | None = None, *, out: FlatSum | None = None) -> "RunningSum":
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
        (16 bytes per parameter, besides the 4 of the float32 record); here one compiled loop
        adds every record of the block to each entry while it is in a register
        (:func:`common.dp.kernels.add_block`), so the total costs 16 bytes per parameter per
        BLOCK. Records may hold tensors or NumPy arrays (the read-only float32 views
        ``read_update`` gives); a GPU or bfloat16 record takes the torch path, one record at a
        time. Every record is checked (keys, shapes) before the total is touched.

        ``out``: when ``total`` is None, a running sum of the same layout that an earlier round
        returned and no longer needs: the new sum is written over it (nothing of it is read)
        instead of into a fresh buffer, whose pages the OS would fault in and zero again."""
        if norms is None:
            norms = [float(self.tree_norm(record)) for record in records]
        elif len(norms) != len(records):
            raise ValueError(f"{len(norms)} norms for {len(records)} records")
        return _sum_block(total, records, [self.scale_factor(norm) for norm in norms], out)

    def release(
        self,
        total: Tree,
        *,
        denominator: float,
        noise: NoiseSource,
        sample_rate: float,
        unit: Unit,
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
        return noised, PrivacyEvent.release(self.noise_multiplier, sample_rate, unit, label)
