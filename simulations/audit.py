"""Empirical DP audit of a run's release mechanism (Steinke, Nasr, Jagielski 2023, one run).

    python -m simulations.audit outputs/demo -o outputs/demo/audit.json
    python -m simulations.audit outputs/demo --no-noise          # the audit's power check
    python -m simulations.audit --clip-norm 0.5 --noise-multiplier 2.5 --sample-rate 0.5

See :mod:`evaluation.audit` for the protocol.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from evaluation.audit import AuditSettings, run_audit


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="One-run canary audit of a privadapt release mechanism.")
    parser.add_argument("run_dir", nargs="?", help="a run's output folder (reads privacy.json)")
    parser.add_argument("-o", "--output", help="write audit.json here (default: print it)")
    parser.add_argument("--canaries", type=int, default=1000)
    parser.add_argument("--guesses-in", type=int, default=250)
    parser.add_argument("--guesses-out", type=int, default=250)
    parser.add_argument("--background", type=int, default=100)
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-noise", action="store_true", help="switch the noise off (power check)")
    for name, kind in (("clip-norm", float), ("noise-multiplier", float), ("sample-rate", float), ("rounds", int),
                       ("delta", float)):
        parser.add_argument(f"--{name}", type=kind, help="override the run's value (or give it without a run)")
    parser.add_argument("--unit", choices=("record", "site"))
    args = parser.parse_args(argv)
    settings = AuditSettings(canaries=args.canaries, guesses_in=args.guesses_in, guesses_out=args.guesses_out,
                             background=args.background, confidence=args.confidence, seed=args.seed)
    overrides = {key: getattr(args, key) for key in ("clip_norm", "noise_multiplier", "sample_rate", "rounds",
                                                     "delta", "unit") if getattr(args, key) is not None}
    try:
        result = run_audit(args.run_dir, settings=settings, noise=not args.no_noise, **overrides)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    text = json.dumps(result, indent=2)
    if args.output:
        Path(args.output).write_text(text + "\n")
        print(f"audit: epsilon lower bound {result['epsilon_lower_bound']:.3f} "
              f"(accountant {result['accountant_epsilon']}); written to {args.output}")
    else:
        print(text)
    return result


if __name__ == "__main__":
    main()
