"""PNG plots of the evaluation report (matplotlib, Agg backend: no display needed).

* ROC curves on log-log axes, as Carlini et al. ("Membership Inference Attacks From First
  Principles", IEEE S&P 2022) recommend: the low-FPR corner is where an attack matters.
* epsilon after each round (per privacy unit and accountant);
* the privacy-utility curve of a sweep: a utility figure against epsilon, one line per method,
  with the non-private runs (epsilon = infinity) drawn at a separate position on the right.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def roc_plot(records: Sequence[Mapping], path: Path, *, title: str = "Membership inference ROC") -> Path:
    """One ROC curve per applicable attack record (``{"name", "auc", "roc": {"fpr", "tpr"}}``)
    on log-log axes, with the chance line; zero rates are drawn at the axis floor."""
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    drawn = [r for r in records if r.get("applicable", True) and len((r.get("roc") or {}).get("fpr") or []) >= 2]
    positive = [v for r in drawn for v in list(r["roc"]["fpr"]) + list(r["roc"]["tpr"]) if v > 0]
    floor = min([1e-3, *positive])
    for rec in drawn:
        ax.plot([max(v, floor / 2) for v in rec["roc"]["fpr"]], [max(v, floor / 2) for v in rec["roc"]["tpr"]],
                label=f"{rec['name']} (AUC {rec['auc']:.3f})")
    ax.plot([floor / 2, 1], [floor / 2, 1], "k--", lw=0.8, label="chance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(floor / 2, 1)
    ax.set_ylim(floor / 2, 1.05)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def epsilon_rounds_plot(curve: Mapping, path: Path, *, target: float | None = None) -> Path:
    """epsilon after each round (``epsilon_by_round``'s output), one line per unit and accountant."""
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    rounds = list(curve["rounds"])
    for unit, by_acc in curve["curves"].items():
        for acc, values in by_acc.items():
            points = [(r, v) for r, v in zip(rounds, values) if v is not None]
            if points:
                ax.plot(*zip(*points), marker="o", ls="-" if acc == "prv" else "--", label=f"{unit}, {acc.upper()}")
    if target is not None and math.isfinite(target):
        ax.axhline(target, color="grey", lw=0.8, ls=":", label=f"target {target:g}")
    ax.set_xlabel("round")
    ax.set_ylabel(f"epsilon (delta = {curve['delta']:g})")
    ax.set_xticks(rounds)
    ax.set_title("Privacy spent after each round")
    ax.legend(fontsize=8)
    return _save(fig, path)


def privacy_utility_plot(series: Mapping[str, Sequence[tuple[float, float]]], path: Path, *, ylabel: str,
                         title: str = "Privacy-utility trade-off", baseline: float | None = None) -> Path:
    """``series[method] = [(epsilon, value), ...]``; epsilon = inf is drawn at the right end,
    past the largest finite epsilon, on a log epsilon axis; ``baseline`` (the base model's
    value) as a dotted line."""
    finite = [e for pts in series.values() for e, _ in pts if math.isfinite(e)]
    hi = max(finite) if finite else 1.0
    lo = min(finite) if finite else 1.0
    inf_x = hi * 2.5
    fig, ax = plt.subplots(figsize=(6.0, 4.2))
    for method, pts in series.items():
        pts = sorted(pts, key=lambda p: p[0])
        if pts:
            ax.plot([inf_x if math.isinf(e) else e for e, _ in pts], [v for _, v in pts], marker="o", label=method)
    if baseline is not None:
        ax.axhline(baseline, color="grey", lw=0.8, ls=":", label="base model")
    ax.set_xscale("log")
    ticks = sorted(set(finite)) + [inf_x]
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:g}" for t in ticks[:-1]] + ["inf"])
    ax.minorticks_off()
    ax.set_xlim(lo / 1.5, inf_x * 1.5)
    ax.set_xlabel("epsilon (inf = no privacy)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)
