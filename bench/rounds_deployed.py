"""Benchmark: per-round overhead of a real deployment, Flower's default ClientApp vs a long-lived one.

For each mode it starts a fresh federation on 127.0.0.1 (SuperLink with TLS and node
authentication, two sites on data/demo/site-0 and site-1, one thread each), runs one LoRA job of
``--rounds`` rounds on the tiny model, and prints JSON:

- ``round_seconds``: wall time of each round, between the ServerApp's ``[ROUND k/N]`` lines as they
  reach ``flwr run --stream`` (the last round ends at "Strategy execution finished");
- long-lived mode only, per round and site (from the ClientApp process's task records):
  ``app_seconds`` (the ClientApp's own call: the site's work), ``pull_seconds`` (waiting for the
  message) and ``task_seconds`` (the whole task);
- ``overhead_seconds`` per round: round wall time minus the slowest site's work. The default mode's
  site work is not observable from outside its short-lived processes; it is taken as the
  long-lived mode's work in the same round (same code, data and seeds), so its overhead includes
  the re-import of torch/diffusers and the model reload that every default round pays.

    .venv/bin/python bench/rounds_deployed.py --rounds 4 --local-steps 10 --out outputs/bench-rounds
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from common.tiny_sd import tiny_sd_dir  # noqa: E402
from deploy.local import LocalDeployment, RunResult  # noqa: E402

DATA = REPO_ROOT / "data" / "demo"


def round_seconds(result: RunResult, rounds: int) -> list[float]:
    starts = result.round_starts()
    finished = result.first_time("Strategy execution finished")
    ends = [starts.get(k + 1) for k in range(1, rounds)] + [finished]
    return [round(end - starts[k], 2) for k, end in zip(range(1, rounds + 1), ends)]


def timeline(result: RunResult, tasks: dict[str, list[dict]], rounds: int) -> list[dict]:
    """Where each round's wall time goes (long-lived mode: the task records carry wall-clock starts).

    Per round and site: ``to_task`` from the ServerApp's ``[ROUND k/N]`` line to the site's task
    start (the message's trip: ServerApp push, SuperLink, the SuperNode's poll), ``pull`` (the task's
    input fetch from the SuperNode), ``app`` (the site's own work) and ``reply`` (the rest of the task:
    pushing the reply to the SuperNode). Per round: ``after_last_task`` from the end of the last
    site's task to the next round's line (the reply's trip back, the server's aggregation and
    checkpoint, the next round's push). The round lines reach us through ``flwr run --stream``
    (log upload every 0.2 s, stream every 0.5 s), so each figure carries up to ~1 s of that latency."""
    starts = result.round_starts()
    ends = [starts.get(k + 1) for k in range(1, rounds)] + [result.first_time("Strategy execution finished")]
    ordered = {site: sorted(site_tasks, key=lambda t: t["started"]) for site, site_tasks in tasks.items()}
    rows = []
    for k in range(1, rounds + 1):
        start, end = starts.get(k), ends[k - 1]
        if start is None or end is None:
            continue
        row: dict = {"round": k, "seconds": round(end - start, 2), "sites": {}}
        last_end = start
        for site, site_tasks in ordered.items():
            if len(site_tasks) < k:
                continue
            t = site_tasks[k - 1]
            pull, app = t.get("pull_seconds") or 0.0, t.get("app_seconds") or 0.0
            row["sites"][site] = {"to_task": round(t["started"] - start, 2), "pull": pull, "app": app,
                                  "reply": round(t["seconds"] - pull - app, 2)}
            last_end = max(last_end, t["started"] + t["seconds"])
        row["after_last_task"] = round(end - last_end, 2)
        rows.append(row)
    return rows


def bench_mode(mode: str, root: Path, config: dict, rounds: int) -> dict:
    with LocalDeployment(root / mode, clientapp=mode, threads_per_site=1) as deployment:
        sites = deployment.start_federation(DATA, 2)
        result = deployment.run({**config, "output-dir": str(root / mode / "output")})
        if not result.completed:
            raise RuntimeError(f"{mode}: run {result.run_id} {result.status}\n{result.text()[-3000:]}")
        tasks = {site.name: [t for t in site.tasks() if t["run_id"] == result.run_id] for site in sites}
    out = {"job_seconds": round(result.seconds, 1), "round_seconds": round_seconds(result, rounds)}
    if mode == "warm":
        for name, key in (("app_seconds", "app_seconds"), ("pull_seconds", "pull_seconds"), ("task_seconds", "seconds")):
            out[name] = {site: [t.get(key) for t in site_tasks] for site, site_tasks in tasks.items()}
        out["pids"] = {name: sorted({t["pid"] for t in site_tasks}) for name, site_tasks in tasks.items()}
        out["timeline"] = timeline(result, tasks, rounds)
    return out


def overheads(walls: list[float], work: dict[str, list[float]]) -> list[float]:
    slowest = [max(per_site[k] for per_site in work.values()) for k in range(len(walls))]
    return [round(wall - busy, 2) for wall, busy in zip(walls, slowest)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--modes", nargs="+", default=["flower", "warm"], choices=["flower", "warm"])
    parser.add_argument("--out", type=Path, default=None, help="keep the deployments' folders and logs here")
    args = parser.parse_args(argv)
    root = args.out.resolve() if args.out else Path(tempfile.mkdtemp(prefix="privadapt-bench-rounds-"))
    config = {"adapter": "lora", "num-sites": 2, "rounds": args.rounds, "local-steps": args.local_steps, "lora-batch-size": 2,
              "model-path": str(tiny_sd_dir()), "data-path": str(DATA), "sample-steps": 2,
              "sample-prompts": "an emoji of a cat",
              # it times rounds, not utility: site-level DP over 2 sites carries no signal (common.dp.plan.signal_to_noise)
              "max-noise-to-signal": "inf"}
    report = {"benchmark": "deployment round overhead", "machine": f"{platform.machine()}, {platform.node()}",
              "sites": 2, "rounds": args.rounds, "local_steps": args.local_steps, "folder": str(root), "modes": {}}
    for mode in args.modes:
        report["modes"][mode] = bench_mode(mode, root, config, args.rounds)
    warm = report["modes"].get("warm")
    if warm:
        for mode, figures in report["modes"].items():
            figures["overhead_seconds"] = overheads(figures["round_seconds"], warm["app_seconds"])
            later = figures["overhead_seconds"][1:] or figures["overhead_seconds"]
            figures["median_overhead_after_round_1"] = round(statistics.median(later), 2)
            figures["median_round_seconds_after_round_1"] = round(statistics.median(figures["round_seconds"][1:]
                                                                                    or figures["round_seconds"]), 2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
