"""Benchmark: Flower's overhead per round in simulation, and rounds with many simulated sites.

A real Flower simulation (``flwr.simulation.run_simulation``, Ray backend) of privadapt's
ServerApp and ClientApp on the random tiny model, each site holding ONE image (a copy of
one demo image), for one DPAgg-TI release or one LoRA round. Two clocks:

- the round's wall time, on the server: from pushing the round's messages to handing the last
  reply to the aggregation (:class:`server.streaming.ReceiveStats`, read from its log record);
- each site's local compute: the wall time of privadapt's ClientApp function
  (:func:`client.app.handle_train`) around each message, written by the site to a file.

Overhead = round wall time / (sum of the sites' compute / parallel actors): 1.0 means Flower
adds nothing beyond running the sites on the actors it has. Memory: peak RSS of this
process, which holds the ServerApp, the SuperLink's in-memory link state and Ray's driver;
the sites run in Ray actor processes (not counted).

    .venv/bin/python -m bench.rounds_sim --method dpagg-ti --sites 10
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from bench.scale import PeakRSS
from common.paths import REPO_ROOT

IMAGE = REPO_ROOT / "data" / "demo" / "site-0" / "avocado.png"
TIMINGS_ENV = "PRIVADAPT_BENCH_TIMINGS"
ROUNDS = 2  # round 1 is cold (each Ray actor imports privadapt and loads the model); round 2 is warm


def one_image_sites(root: Path, sites: int) -> Path:
    """``root/site-k/`` for k < sites, each holding one image."""
    for k in range(sites):
        folder = root / f"site-{k}"
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(IMAGE, folder / IMAGE.name)  # a copy: sites refuse links leading out of their folder
    return root


def timed_client_app(overrides: dict):
    """privadapt's ClientApp, with the wall time of each message's handling appended to
    ``$PRIVADAPT_BENCH_TIMINGS/<pid>.jsonl`` (one file per actor process)."""
    from flwr.app import Context, Message
    from flwr.clientapp import ClientApp

    from client.app import handle_train

    app = ClientApp()
    folder = os.environ[TIMINGS_ENV]

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        start = time.perf_counter()
        reply = handle_train(msg, context, overrides)
        seconds = time.perf_counter() - start
        with open(Path(folder) / f"{os.getpid()}.jsonl", "a") as f:
            f.write(json.dumps({"node": msg.metadata.dst_node_id, "round": int(msg.content["config"]["round"]),
                                "seconds": seconds}) + "\n")
        return reply

    return app


class ReceiveLog(logging.Handler):
    """Collects the :class:`server.streaming.ReceiveStats` of every round the server runs."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.rounds: list = []

    def emit(self, record: logging.LogRecord) -> None:
        stats = getattr(record, "receive_stats", None)
        if stats is not None:
            self.rounds.append(stats)


def overrides_for(method: str, sites: int, data: Path, out: Path) -> dict:
    common = {"data-path": str(data), "output-dir": str(out), "resolution": 64, "sample-steps": 1,
              "sample-prompts": "an emoji of a cat", "target-epsilon": 1.0,
              # it times rounds, not utility: few sites (or one image each) carry no signal at epsilon = 1
              # (common.dp.plan.signal_to_noise)
              "max-noise-to-signal": "inf"}
    if method == "dpagg-ti":
        return {**common, "ti-steps": 2, "batch-size": 1, "sampling-rate": 1.0, "dataset-size": sites,
                "num-releases": ROUNDS}
    if method == "lora":
        return {**common, "adapter": "lora", "num-sites": sites, "rounds": ROUNDS, "local-steps": 2, "lora-batch-size": 1}
    raise ValueError(f"method must be 'dpagg-ti' or 'lora', got {method!r}")


def simulate_rounds(method: str, sites: int, actors: int = 2) -> list[dict]:
    """Two releases / rounds of ``method`` with ``sites`` simulated sites on ``actors`` Ray
    actors; one row per round."""
    from flwr.simulation import run_simulation

    from common.config import RunConfig, pyproject_run_config
    from server.app import build_server_app

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    with tempfile.TemporaryDirectory(prefix="privadapt-bench-") as tmp:
        tmp_path = Path(tmp)
        timings = tmp_path / "timings"
        timings.mkdir()
        os.environ[TIMINGS_ENV] = str(timings)
        overrides = overrides_for(method, sites, one_image_sites(tmp_path / "data", sites), tmp_path / "out")
        config = {**pyproject_run_config(), **overrides}
        RunConfig.from_run_config(config)  # fail before Ray starts on a bad config
        handler = ReceiveLog()
        logger = logging.getLogger("privadapt.server")
        logger.addHandler(handler)
        old_level = logger.level
        logger.setLevel(logging.INFO)
        try:
            with PeakRSS(interval=0.01) as mem:
                start = time.perf_counter()
                run_simulation(server_app=build_server_app(config), client_app=timed_client_app(config),
                               num_supernodes=sites,
                               backend_config={"client_resources": {"num_cpus": 2 / actors, "num_gpus": 0.0},
                                               "init_args": {"include_dashboard": False, "log_to_driver": False,
                                                             "num_cpus": 2}})
                total = time.perf_counter() - start
        finally:
            logger.removeHandler(handler)
            logger.setLevel(old_level)
        site_times = [json.loads(line) for f in timings.glob("*.jsonl") for line in f.read_text().splitlines()]
    if not handler.rounds:
        raise RuntimeError("the server logged no round: did the run fail? (see the log above)")
    rows = []
    for index, stats in enumerate(handler.rounds, start=1):
        compute = [t["seconds"] for t in site_times if t["round"] == index]
        rows.append({
            "method": method, "sites": sites, "actors": actors, "round": index, "replies": stats.received,
            "round_wall_s": round(stats.seconds, 3), "sites_compute_sum_s": round(sum(compute), 3),
            "site_compute_max_s": round(max(compute), 3),
            "overhead_vs_compute_per_actor": round(stats.seconds / (sum(compute) / actors), 3),
            "overhead_vs_compute_sum": round(stats.seconds / sum(compute), 3),
            "whole_simulation_s": round(total, 1), "driver_peak_rss_gb": round(mem.peak / 1e9, 3),
            "driver_peak_rss_increase_gb": round((mem.peak - mem.start) / 1e9, 3),
        })
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=("dpagg-ti", "lora"), default="dpagg-ti")
    parser.add_argument("--sites", type=int, nargs="+", default=[10])
    parser.add_argument("--actors", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    rows = [row for n in args.sites for row in simulate_rounds(args.method, n, args.actors)]
    print(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
