"""Run privadapt as a Flower simulation (Ray backend) from the command line.

    python -m simulations.run --num-sites 4 --run-config "target-epsilon=1 output-dir=outputs/demo"

The run config starts from ``[tool.flwr.app.config]`` in pyproject.toml (the same defaults
``flwr run .`` uses) and is updated with ``--run-config`` (Flower's "key=value key=value"
syntax). Flower's Python simulation entry point passes no run config of its own, so the
merged config is handed to the apps explicitly.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

from common.config import RunConfig, parse_overrides, pyproject_run_config
from common.paths import resolve


def declared_config(num_sites: int, overrides: dict[str, Any]) -> dict[str, Any]:
    """pyproject's run config updated with ``overrides``; ``num-sites`` (the public K of
    site-level DP) is declared as ``num_sites`` unless the overrides declare it."""
    return {**pyproject_run_config(), "num-sites": num_sites, **overrides}


def simulate(num_sites: int, overrides: dict[str, Any], *, cpus_per_site: float = 1.0) -> Path:
    """Run the ServerApp and ``num_sites`` ClientApps in Flower's simulation engine.

    Choosing ``num_sites`` (``--num-sites``) is the operator's declaration of the public number
    of sites K: unless ``overrides`` set ``num-sites`` themselves, the run declares
    ``num-sites = num_sites``, which a private LoRA run needs (its denominator q*K is never
    read from who connected). Overrides may declare a larger K (sites that may join); a
    smaller one stops a private LoRA run before its first release."""
    from flwr.simulation import run_simulation

    from client.app import build_client_app
    from server.app import build_server_app

    config = declared_config(num_sites, overrides)
    cfg = RunConfig.from_run_config(config)  # fail here, before Ray starts, on a bad config
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    run_simulation(
        server_app=build_server_app(config),
        client_app=build_client_app(config),
        num_supernodes=num_sites,
        backend_config={"client_resources": {"num_cpus": cpus_per_site, "num_gpus": 0.0},
                        "init_args": {"include_dashboard": False, "log_to_driver": True}},
    )
    return resolve(cfg.output_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run a privadapt Flower simulation.")
    parser.add_argument("--num-sites", type=int, default=4, help="simulated sites (SuperNodes)")
    parser.add_argument("--run-config", default="", help='overrides, e.g. "target-epsilon=1 ti-steps=50"')
    parser.add_argument("--cpus-per-site", type=float, default=1.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = simulate(args.num_sites, parse_overrides(args.run_config), cpus_per_site=args.cpus_per_site)
    print(f"privadapt: outputs in {out}")
    if (out / "privacy.json").exists():
        print((out / "privacy.json").read_text()[:600])


if __name__ == "__main__":
    main()
