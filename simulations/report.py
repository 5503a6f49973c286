"""Render (again) the Markdown report of an evaluated run or of a sweep, from files on disk.

    python -m simulations.report outputs/demo                  # reads outputs/demo/evaluation/
    python -m simulations.report outputs/demo --eval-dir DIR   # attacks.json, audit.json, utility.json in DIR
    python -m simulations.report --sweep outputs/sweep         # sweep_report.md from sweep.json

Computes nothing new except the epsilon-per-round curve (from the run's ledger events); a
missing attacks.json, audit.json or utility.json is reported as "not run".
"""

from __future__ import annotations

import argparse
from pathlib import Path

from evaluation.report import render_run_report
from evaluation.sweep_report import render_sweep_report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Render a privadapt evaluation report.")
    parser.add_argument("run", type=Path, nargs="?", help="a run's output folder")
    parser.add_argument("--eval-dir", type=Path, help="the evaluation folder (default: <run>/evaluation)")
    parser.add_argument("--sweep", type=Path, help="a sweep folder (holds sweep.json) instead of a run")
    args = parser.parse_args(argv)
    if (args.run is None) == (args.sweep is None):
        parser.error("give either a run folder or --sweep SWEEP_DIR")
    if args.sweep is not None:
        path = render_sweep_report(args.sweep)
    else:
        path = render_run_report(args.run, args.eval_dir or args.run / "evaluation")
    print(f"privadapt: report in {path}")


if __name__ == "__main__":
    main()
