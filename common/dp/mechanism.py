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

import torch

from common.dp.noise import NoiseSource

BoundMode = Literal["clip", "normalize"]
Tree = Mapping[str, torch.Tensor]


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
    def tree_norm(record: Tree) -> torch.Tensor:
        """The flat L2 norm of a record made of several tensors, computed in float64."""
        squares = torch.zeros((), dtype=torch.float64)
        for t in record.values():
            flat = t.detach().reshape(-1).to(torch.float64)
            squares = squares + torch.dot(flat, flat)
        return torch.sqrt(squares)

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

    def add_bounded(self, total: dict[str, torch.Tensor] | None, record: Tree) -> dict[str, torch.Tensor]:
        """``add(total, bound_tree(record))`` without the intermediate copies (the server's hot path).

        The record is scaled by the same factor :meth:`bound_tree` uses and added into
        ``total`` IN PLACE: ``total`` must be a running sum this method returned (pass None
        for the first record). A record within the bound (factor exactly 1) adds exactly as
        :meth:`add` does; a clipped one is added as ``total + factor * record`` in float64.
        """
        factor = self.scale_factors(self.tree_norm(record).reshape(1))[0]
        if total is None:  # the first record starts the sum: bound_tree's own arithmetic
            return {k: v.detach().to(torch.float64, copy=True) if factor == 1 else v.detach().to(torch.float64) * factor
                    for k, v in record.items()}
        factor = float(factor)
        if total.keys() != record.keys():
            raise ValueError(f"record has keys {sorted(record)}, expected {sorted(total)}")
        for k, v in record.items():
            if v.shape != total[k].shape:
                raise ValueError(f"record {k!r} has shape {tuple(v.shape)}, expected {tuple(total[k].shape)}")
            total[k].add_(v.detach(), alpha=factor)
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
