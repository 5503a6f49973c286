"""Membership-inference attacks on a run's output.

    python -m simulations.attack outputs/run --members data/demo/site-0 data/demo/site-1 \\
        --non-members data/other/site-4 -o outputs/run/attacks.json
    python -m simulations.attack outputs/smp-run -o attacks.json        # an SMP-LoRA run's own splits

Each folder is one site for site-level inference. See :mod:`evaluation.attacks`.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from common.data import SiteDataError
from evaluation.attacks import ALL_ATTACKS, DEFAULT_ATTACKS, run_attacks
from evaluation.proxy import ProxySettings


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Membership-inference attacks on a privadapt run's adapter.")
    parser.add_argument("run_dir", help="the run's output folder")
    parser.add_argument("--members", nargs="+", help="image folders the run trained on")
    parser.add_argument("--non-members", nargs="+", help="image folders of the same distribution it did not see")
    parser.add_argument("-o", "--output", help="write attacks.json here (default: print it)")
    parser.add_argument("--attacks", nargs="+", choices=ALL_ATTACKS, default=list(DEFAULT_ATTACKS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--draws", type=int, default=4, help="noise draws per image and timestep (loss attacks)")
    parser.add_argument("--proxy-steps", type=int, default=300, help="training steps of h'")
    parser.add_argument("--lira-shadows", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        result = run_attacks(args.run_dir, args.members, args.non_members, attacks=args.attacks, seed=args.seed,
                             progress=not args.no_progress, draws=args.draws,
                             proxy=ProxySettings(steps=args.proxy_steps), lira_shadows=args.lira_shadows,
                             device=args.device)
    except (ValueError, FileNotFoundError, SiteDataError) as err:
        parser.error(str(err))
    text = json.dumps(result, indent=2)
    if args.output:
        Path(args.output).write_text(text + "\n")
        for record in result["attacks"] + result["site_inference"]:
            figure = f"AUC {record['auc']:.3f} [{record['auc_ci'][0]:.3f}, {record['auc_ci'][1]:.3f}]" \
                if record["applicable"] else f"not applicable: {record['reason']}"
            print(f"{record['name']:>22}: {figure}")
        print(f"written to {args.output}")
    else:
        print(text)
    return result


if __name__ == "__main__":
    main()
