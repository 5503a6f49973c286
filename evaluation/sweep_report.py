"""A sweep's report: one table row per (method, epsilon) run, the privacy-utility curves and a
grid with one row of adapted samples per run, all read from the runs' evaluation folders.

``sweep.json`` (written by ``simulations.sweep``) lists the runs as
``{"method", "target_epsilon", "run", "evaluation"}``; every figure comes from the run's
``privacy.json`` and its evaluation's ``utility.json`` / ``attacks.json``. A figure that was
not computed is shown as "not run".
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image

from evaluation.plots import privacy_utility_plot
from evaluation.report import read_optional

SWEEP_FILE = "sweep.json"
SWEEP_REPORT = "sweep_report.md"


def load_sweep(sweep_dir: Path) -> list[dict]:
    path = sweep_dir / SWEEP_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{sweep_dir} holds no {SWEEP_FILE}: not a sweep folder")
    entries = json.loads(path.read_text())["runs"]
    for e in entries:
        e["target_epsilon"] = math.inf if e["target_epsilon"] in (None, "inf") else float(e["target_epsilon"])
    return entries


def achieved_epsilon(privacy: Mapping) -> float:
    """The run's headline (PRV) epsilon: site level for LoRA, record level for TI; inf if none."""
    if not privacy.get("private"):
        return math.inf
    eps = privacy.get("epsilon") or {}
    value = (eps["site"] if "site" in eps else eps).get("prv")
    return math.inf if value is None else float(value)


def best_attack(attacks: Mapping | None) -> dict | None:
    """The applicable membership attack with the highest AUC (its attacks.json record), or None
    if none was run."""
    if not attacks:
        return None
    ran = [r for r in attacks.get("attacks", []) if r.get("applicable", True) and r.get("auc") is not None]
    return max(ran, key=lambda r: r["auc"]) if ran else None


def best_attack_auc(attacks: Mapping | None) -> float | None:
    """The highest AUC among the applicable membership attacks, or None if none was run."""
    best = best_attack(attacks)
    return None if best is None else best["auc"]


def collect(sweep_dir: Path, entries: Sequence[Mapping]) -> list[dict]:
    """One row of figures per run (None where a figure was not computed)."""
    rows = []
    for e in entries:
        run, ev = Path(e["run"]), Path(e["evaluation"])
        privacy = read_optional(run, "privacy.json")
        utility = read_optional(ev, "utility.json")
        attacks = read_optional(ev, "attacks.json")
        d = utility["denoising_loss"] if utility else None
        dist = utility["distribution"] if utility else None
        rows.append({
            "method": e["method"], "target_epsilon": e["target_epsilon"],
            "epsilon": achieved_epsilon(privacy) if privacy else None,
            "loss_change": d["relative_change"] if d else None,
            "loss_change_ci": [c / d["base"] for c in d["difference_ci"]] if d else None,
            "kid_adapted": dist["adapted"]["kid"] if dist else None, "kid_base": dist["base"]["kid"] if dist else None,
            "style_accuracy": dist["adapted"]["style_accuracy"] if dist else None,
            "cosine": (utility.get("embedding") or {}).get("cosine_centred_on_initializer") if utility else None,
            "is_ti_reference": bool(utility) and utility.get("adapter") == "textual-inversion"
                               and math.isinf(e["target_epsilon"]),
            "attack_auc": best_attack_auc(attacks),
            "attack": best_attack(attacks),
            "report": os.path.relpath(ev / "report.md", sweep_dir), "grid": ev / "grid.png",
        })
    return rows


def _f(x, fmt: str) -> str:
    if x is None:
        return "not run"
    return "inf" if isinstance(x, float) and math.isinf(x) else format(x, fmt)


def curves(rows: Sequence[Mapping], key: str) -> dict[str, list[tuple[float, float]]]:
    out: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if r[key] is not None:
            out.setdefault(r["method"], []).append((r["target_epsilon"], r[key]))
    return out


def adapted_row(grid_png: Path) -> list[Image.Image]:
    """The adapted (bottom) row of an evaluation's two-row ``grid.png``, cell by cell."""
    sheet = Image.open(grid_png).convert("RGB")
    cell = sheet.height // 2
    return [sheet.crop((i * cell, cell, (i + 1) * cell, 2 * cell)) for i in range(sheet.width // cell)]


def sweep_grid(rows: Sequence[Mapping], out: Path) -> Path | None:
    """Base row (from the first run) and one adapted row per run, labelled."""
    from evaluation.grid import compose

    have = [r for r in rows if Path(r["grid"]).is_file()]
    if not have:
        return None
    first = Image.open(have[0]["grid"]).convert("RGB")
    cell = first.height // 2
    base = [first.crop((i * cell, 0, (i + 1) * cell, cell)) for i in range(first.width // cell)]
    labelled = [("base model", base)] + [(f"{r['method']}, eps = {_f(r['target_epsilon'], 'g')}", adapted_row(r["grid"]))
                                         for r in have]
    compose(labelled, [""] * len(base), cell=64, label_width=200).save(out)
    return out


def attack_cells(best: Mapping | None) -> str:
    """"name AUC [CI] | TPR [CI]" of the strongest attack, for the report's table."""
    if best is None:
        return "not run | not run"
    lo, hi = best["auc_ci"] or (math.nan, math.nan)
    rate = (best.get("tpr_at_fpr") or {}).get("0.01")
    tpr = f"{rate['tpr']:.3f} [{rate['ci'][0]:.3f}, {rate['ci'][1]:.3f}]" if rate else "not run"
    return f"{best['name']} {best['auc']:.3f} [{lo:.3f}, {hi:.3f}] | {tpr}"


def render_sweep_report(sweep_dir: str | Path) -> Path:
    """Write ``sweep_report.md`` with its plots into ``sweep_dir``."""
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir, load_sweep(sweep_dir))
    lines = ["# privadapt sweep", "", f"{len(rows)} runs: methods {sorted({r['method'] for r in rows})}, target epsilons "
             f"{sorted({_f(r['target_epsilon'], 'g') for r in rows}, key=lambda s: math.inf if s == 'inf' else float(s))}. "
             "epsilon is the run's headline PRV epsilon (site level for LoRA, record level for TI; inf = no privacy). "
             "Held-out loss change: (adapted - base) / base denoising loss on held-out private images, negative = "
             "better. KID on the style classifier's features against the held-out images. Attack AUC: the strongest "
             "applicable membership-inference attack (0.5 = chance).", "",
             "| method | target eps | eps (PRV) | held-out loss change [95% CI] | KID x1e3 (base -> adapted) | "
             "style acc. | TI cosine to non-private (centred) | best attack: AUC [95% CI] | its TPR at 1% FPR [95% CI] "
             "| report |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ci = r["loss_change_ci"]
        change = (f"{r['loss_change']:+.2%} [{ci[0]:+.2%}, {ci[1]:+.2%}]" if r["loss_change"] is not None else "not run")
        kid = (f"{1e3 * r['kid_base']:.2f} -> {1e3 * r['kid_adapted']:.2f}" if r["kid_adapted"] is not None else "not run")
        lines.append(f"| {r['method']} | {_f(r['target_epsilon'], 'g')} | {_f(r['epsilon'], '.3f')} | {change} | {kid} | "
                     f"{_f(r['style_accuracy'], '.0%')} | "
                     f"{'(the reference)' if r['is_ti_reference'] else _f(r['cosine'], '.3f')} | "
                     f"{attack_cells(r['attack'])} | [report]({r['report']}) |")
    plots = [("loss_change", "held-out denoising loss, (adapted - base) / base", "privacy_utility_loss.png"),
             ("kid_adapted", "KID (style-classifier features) vs held-out", "privacy_utility_kid.png"),
             ("attack_auc", "best membership-inference AUC", "privacy_attack_auc.png")]
    lines += ["", "## Privacy-utility curves", ""]
    base_kids = [r["kid_base"] for r in rows if r["kid_base"] is not None]
    baselines = {"loss_change": 0.0, "kid_adapted": sum(base_kids) / len(base_kids) if base_kids else None}
    for key, label, name in plots:
        series = curves(rows, key)
        if series:
            privacy_utility_plot(series, sweep_dir / name, ylabel=label, baseline=baselines.get(key))
            lines.append(f"![{label}]({name})")
        else:
            lines.append(f"{label}: not run.")
        lines.append("")
    if sweep_grid(rows, sweep_dir / "sweep_grid.png"):
        lines += ["## Samples", "", "Same prompts and seeds in every row:", "", "![samples per run](sweep_grid.png)", ""]
    path = sweep_dir / SWEEP_REPORT
    path.write_text("\n".join(lines) + "\n")
    return path
