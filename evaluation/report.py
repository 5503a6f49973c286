"""A run's evaluation report in Markdown, with PNG plots next to it.

Reads what the evaluation wrote into one folder and never computes a privacy or utility figure
of its own beyond the epsilon-per-round curve (recomputed from the run's ledger events):

* ``<run>/privacy.json``: the privacy statement in words and the epsilon after each round;
* ``attacks.json`` (membership and site inference, :mod:`evaluation.attacks`);
* ``audit.json`` and ``audit_no_noise.json`` (the one-run audit of Steinke, Nasr, Jagielski
  2023, with the run's noise and without it: the power check);
* ``skipped.json``: why an evaluation step did not run;
* ``utility.json`` and ``grid.png`` (:mod:`evaluation.utility`).

A file that is missing is reported as "not run"; no figure is ever filled in for it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from evaluation.epsilon_curve import epsilon_by_round
from evaluation.plots import epsilon_rounds_plot, roc_plot
from server.export import lora_claim, ti_claim
from server.statement import fmt_eps

REPORT_FILE = "report.md"
INPUTS = ("attacks.json", "audit.json", "audit_no_noise.json", "utility.json", "skipped.json")


def read_optional(folder: Path, name: str) -> dict | None:
    """``folder/name`` as JSON, or None if it does not exist (an unreadable file is an error)."""
    path = folder / name
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def privacy_statement(privacy: Mapping) -> str:
    """The run's guarantee in words (the same sentences as its model card)."""
    return lora_claim(dict(privacy)) if privacy.get("method") == "dp-fedavg-lora" else ti_claim(dict(privacy))


def _num(x, fmt: str = ".3f") -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return format(x, fmt)


def _ci(ci: Sequence | None, fmt: str = ".3f") -> str:
    return f" [{_num(ci[0], fmt)}, {_num(ci[1], fmt)}]" if ci else ""


def attack_epsilon_heuristic(record: Mapping) -> float | None:
    """An attack record's epsilon heuristic (attacks.json written before the rename called it
    ``epsilon_lower_bound``, which it never was)."""
    return record.get("epsilon_heuristic", record.get("epsilon_lower_bound"))


def attack_rows(records: Sequence[Mapping]) -> list[str]:
    """The attack table: one row per attack; an attack that cannot apply says why."""
    lines = ["| attack | AUC [95% CI] | balanced acc. | TPR @ 1% FPR [CI] | TPR @ 0.1% FPR [CI] | "
             "epsilon heuristic (not a bound) |",
             "|---|---|---|---|---|---|"]
    for rec in records:
        if not rec.get("applicable", True):
            lines.append(f"| {rec['name']} | not applicable: {rec.get('reason') or 'no reason given'} | | | | |")
            continue
        tpr = rec.get("tpr_at_fpr", {})
        cells = [f"{_num(tpr[k]['tpr'])}{_ci(tpr[k].get('ci'))}" if k in tpr else "n/a" for k in ("0.01", "0.001")]
        lines.append(f"| {rec['name']} | {_num(rec.get('auc'))}{_ci(rec.get('auc_ci'))} | "
                     f"{_num(rec.get('balanced_accuracy'))} | {cells[0]} | {cells[1]} | "
                     f"{_num(attack_epsilon_heuristic(rec), '.2f')} |")
    return lines


def attack_section(attacks: Mapping | None, out_dir: Path, why: str | None = None) -> list[str]:
    lines = ["## Membership inference", ""]
    if attacks is None:
        return lines + [f"Not run: {why or 'no `attacks.json` in this folder (`python -m simulations.attack`)'}.", ""]
    lines += [f"{attacks.get('members', '?')} members against {attacks.get('non_members', '?')} non-members "
              f"drawn from the same distribution; adapter: {attacks.get('adapter', '?')}. A higher AUC or TPR at low "
              "FPR means more leakage (0.5 and TPR = FPR are chance). The epsilon heuristic is the smallest "
              "epsilon consistent with the attack's (TPR, FPR) at their confidence limits; it is NOT a lower bound "
              "on epsilon (all the scores come from one trained model, so the trials are not independent). The "
              "statistically valid lower bound is the canary audit below.", ""]
    exposure = attacks.get("defense_exposure")
    if exposure:
        lines += [f"The run's defence ({exposure['defense']}) trained its adapter against a proxy attacker on the "
                  "per-element denoising error; of the attacks below it trained against "
                  f"{', '.join(exposure['trained_against']) or 'none'} (the same kind of attacker, trained afresh on "
                  f"the final model) and never saw {', '.join(exposure['never_seen']) or 'none'}.", ""]
    lines += attack_rows(attacks.get("attacks", []))
    if any(r.get("applicable", True) for r in attacks.get("attacks", [])):
        roc_plot(attacks["attacks"], out_dir / "roc.png")
        lines += ["", "![ROC curves, log-log](roc.png)"]
    sites = attacks.get("site_inference") or []
    lines += ["", "### Site-level inference: did site j take part?", ""]
    lines += attack_rows(sites) if sites else ["Not run."]
    return lines + [""]


def audit_section(audit: Mapping | None, power: Mapping | None = None, why: str | None = None) -> list[str]:
    lines = ["## Empirical privacy audit", ""]
    if audit is None:
        return lines + [f"Not run: {why or 'no `audit.json` in this folder (`python -m simulations.audit`)'}.", ""]
    acc = audit.get("accountant_epsilon")
    verdict = ""
    if acc is not None and audit.get("epsilon_lower_bound") is not None:
        verdict = (" The bound stays below the accountant's epsilon, as it must." if audit["epsilon_lower_bound"] <= acc
                   else " **The bound exceeds the accountant's epsilon: the promised noise is not all there.**")
    lines.append(
        f"One-run audit (Steinke, Nasr, Jagielski 2023), {audit['unit']}-level canaries: {audit['canaries']} canaries, "
        f"each inserted with probability 1/2; the auditor guessed {audit['guesses']} and got {audit['correct']} right. "
        f"With confidence {audit['confidence']:g} this implies epsilon >= {_num(audit['epsilon_lower_bound'], '.2f')} "
        f"at delta {audit['delta']:g} (noise {'on' if audit['noise'] else 'off'}; accountant epsilon "
        f"{_num(acc) if acc is not None else 'infinite: the run adds no noise'}).{verdict}")
    if power is not None:
        lines += ["", f"Power check, the same audit with the noise switched off: epsilon >= "
                      f"{_num(power['epsilon_lower_bound'], '.2f')} ({power['correct']} of {power['guesses']} guesses right)."]
    return lines + [""]


def epsilon_section(privacy: Mapping, out_dir: Path) -> list[str]:
    lines = ["## Privacy spent per round", ""]
    if not privacy.get("private"):
        return lines + ["No noise was added: epsilon is infinite from the first round on.", ""]
    curve = epsilon_by_round(dict(privacy))
    if not curve["rounds"]:
        return lines + ["The ledger holds no event.", ""]
    epsilon_rounds_plot(curve, out_dir / "epsilon_rounds.png", target=privacy.get("target_epsilon"))
    lines += ["![epsilon after each round](epsilon_rounds.png)", "",
              "| round | " + " | ".join(f"{u}, {a.upper()}" for u, c in curve["curves"].items() for a in c) + " |",
              "|---|" + "---|" * sum(len(c) for c in curve["curves"].values())]
    for i, r in enumerate(curve["rounds"]):
        lines.append(f"| {r} | " + " | ".join(_num(v[i]) for c in curve["curves"].values() for v in c.values()) + " |")
    return lines + ["", *ledger_check(privacy, curve), ""]


def ledger_check(privacy: Mapping, curve: Mapping, *, tolerance: float = 0.02) -> list[str]:
    """Compare the recomputed final epsilon of each unit with the one privacy.json reports."""
    reported = privacy.get("epsilon") or {}
    out = []
    for unit, by_acc in curve["curves"].items():
        told = reported.get(unit, reported if unit == privacy.get("unit") else {})
        mine, theirs = by_acc["prv"][-1], told.get("prv") if isinstance(told, Mapping) else None
        if mine is None or theirs is None:
            continue
        same = abs(mine - theirs) <= tolerance * max(1.0, abs(theirs))
        out.append(f"{unit.capitalize()} level: the epsilon recomputed from the ledger ({mine:.3f}) "
                   + ("agrees with privacy.json." if same else f"**disagrees with privacy.json ({theirs:.3f}).**"))
    return out


def utility_section(utility: Mapping | None, out_dir: Path, run_dir: Path) -> list[str]:
    lines = ["## Utility", ""]
    if utility is None:
        return lines + ["Not run: no `utility.json` in this folder.", ""]
    d = utility["denoising_loss"]
    dist = utility["distribution"]
    lines += [f"On {utility['held_out_images']} held-out private images (not used in training). Denoising loss: "
              f"mean squared error of the noise prediction at timesteps {d['timesteps']} over {d['noise_draws']} "
              "noise draws, the same draws for both models (lower is better). KID: "
              f"{dist['feature_extractor']}, generated images (prompts: {dist['prompts']}, {dist['sample_steps']} "
              f"steps, seeds from {dist['seed']}) against the held-out images (lower is better); style accuracy: "
              f"share of generated images the classifier calls {dist['reference_style']}, the held-out images' style.",
              "", "| figure | base | adapted | adapted - base [95% CI] |", "|---|---|---|---|",
              f"| denoising loss | {d['base']:.4f} | {d['adapted']:.4f} | {d['difference']:+.4f}"
              f"{_ci(d['difference_ci'], '+.4f')} ({d['relative_change']:+.1%}) |",
              f"| KID (x 1e3, +- std over subsets) | {1e3 * dist['base']['kid']:.2f} +- {1e3 * dist['base']['kid_std']:.2f} | "
              f"{1e3 * dist['adapted']['kid']:.2f} +- {1e3 * dist['adapted']['kid_std']:.2f} | "
              f"{1e3 * (dist['adapted']['kid'] - dist['base']['kid']):+.2f} |",
              f"| style accuracy | {dist['base']['style_accuracy']:.0%} | {dist['adapted']['style_accuracy']:.0%} | "
              f"{dist['adapted']['style_accuracy'] - dist['base']['style_accuracy']:+.0%} |"]
    emb = utility.get("embedding", "absent")
    if utility.get("adapter") == "textual-inversion":
        if emb and emb != "absent":
            lines += ["", f"Released embedding against the non-private run `{emb['reference_run']}`: cosine "
                          f"{emb['cosine']:.4f}; cosine of the two moves away from the initializer token "
                          f"{emb['cosine_centred_on_initializer']:.4f}; L2 distance {emb['distance']:.4f}."]
        else:
            lines += ["", "Embedding cosine to a non-private run: not run (no reference run given: `--reference`)."]
    lines += ["", "## Image grids", ""]
    g = utility.get("grid")
    if g:
        lines += [f"Fixed prompts {g['prompts']} with seeds {g['seeds']}; top row base, bottom row adapted:", "",
                  f"![base vs adapted]({g['file']})"]
    samples = run_dir / "samples" / "grid.png"
    if samples.is_file():
        lines += ["", f"The run's own samples: ![run samples]({os.path.relpath(samples, out_dir)})"]
    return lines + [""]


def run_header(run_dir: Path, privacy: Mapping) -> list[str]:
    method = privacy.get("method", "?") + (f" ({privacy['defense']})" if privacy.get("defense") else "")
    eps = privacy.get("epsilon", {})
    flat = eps.get("site", eps) if isinstance(eps, Mapping) else {}
    return [f"# Evaluation of `{run_dir.name}`", "", f"Run folder: `{run_dir}`; method: {method}; headline epsilon "
            f"(PRV): {fmt_eps(flat.get('prv') if privacy.get('private') else None)}.", "", "## Privacy statement", "",
            privacy_statement(privacy), ""]


def render_run_report(run_dir: str | Path, eval_dir: str | Path) -> Path:
    """Write ``eval_dir/report.md`` (and its PNG plots) for the run in ``run_dir``.

    Raises:
        FileNotFoundError: If ``run_dir`` has no ``privacy.json``.
    """
    run_dir, out_dir = Path(run_dir), Path(eval_dir)
    privacy_file = run_dir / "privacy.json"
    if not privacy_file.is_file():
        raise FileNotFoundError(f"{run_dir} is not a finished privadapt run: no privacy.json")
    privacy = json.loads(privacy_file.read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    found = {name: read_optional(out_dir, name) for name in INPUTS}
    why = found["skipped.json"] or {}
    lines = [*run_header(run_dir, privacy),
             *attack_section(found["attacks.json"], out_dir, why.get("attacks")),
             *audit_section(found["audit.json"], found["audit_no_noise.json"], why.get("audit")),
             *epsilon_section(privacy, out_dir),
             *utility_section(found["utility.json"], out_dir, run_dir)]
    path = out_dir / REPORT_FILE
    path.write_text("\n".join(lines) + "\n")
    return path
