"""Benchmark: one DPAgg-TI release and one LoRA round with many sites; the server's memory.

Two measurements, reported separately:

1. ``driver`` (10, 100, 1,000 sites, and more): the real strategies
   (:class:`server.dpagg_strategy.DPAggTIStrategy`, :class:`server.lora_strategy.DPFedAvgLoRA`)
   run one round through :class:`ReplayGrid`, a ``flwr.serverapp.Grid`` whose n sites answer
   every message with a real reply ``Message`` (the tiny model's embedding sum, or a clipped
   LoRA delta of the tiny model's shapes) built when the server pulls it. No site computes, so
   the wall time is the server's own (plus building the replies, which stands in for
   receiving them), and the process holds nothing but the server. Its peak memory is measured
   two ways: the peak of Python and numpy allocations
   during the round (``tracemalloc``, exact, in a second, untimed pass; torch's own allocator
   is not traced, but the server's float64 running sum is one adapter whatever n is) and the
   peak RSS increase (sampled every millisecond; freed memory that the allocator keeps
   makes later rounds in the same process read low). The same round through Flower's
   ``send_and_receive`` (every reply held at once: privadapt's loop before streaming) is the
   comparison arm.
2. ``simulation`` (see :mod:`bench.rounds_sim`): a real Flower simulation, where
   the ServerApp shares its process with the simulation engine and the link state.

    .venv/bin/python -m bench.scale --sites 10 100 1000
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import threading
import time
import tracemalloc

import torch
from flwr.app import ArrayRecord, Message, RecordDict

from tests.server.grids import ReplayGrid, dpagg_answer, lora_answer, set_task_identity


class PeakRSS:
    """Peak resident set size of this process while the block runs (sampled every ms)."""

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.start = self.peak = 0
        self._stop = threading.Event()

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRSS":
        gc.collect()
        self.start = self.peak = self.rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def build_strategy(method: str, receive: str, sites: int):
    """A real strategy of the tiny model's sizes for ``sites`` sites (the declared K of the
    LoRA strategy), and the reply builder for its sites."""
    from bench.shapes import lora_shapes, tiny_unet_config
    from common.dp import GaussianSumMechanism, NoiseSource, PrivacyLedger
    from common.dp.sampling import sampling_generator
    from server.dpagg_strategy import DPAggTIStrategy
    from server.lora_strategy import DPFedAvgLoRA
    from common.dp.plan import DPAggPlan, FedAvgPlan

    clip, z = 1.0, 1.0
    mechanism = GaussianSumMechanism(clip_norm=clip, noise_multiplier=z)
    ledger = PrivacyLedger(delta=1e-5)
    if method == "dpagg-ti":
        dim = 32  # the tiny model's text-encoder width (common.tiny_sd)
        base, answer = DPAggTIStrategy, dpagg_answer(dim, clip)
        kwargs = dict(plan=DPAggPlan(noise_multiplier=z, sample_rate=1.0, releases=1, denominator=1.0,
                                     planned_epsilon_prv=0.0, planned_epsilon_rdp=0.0), dim=dim)
        initial = ArrayRecord()
    elif method == "lora":
        shapes = lora_shapes(tiny_unet_config(), 4)
        base, answer = DPFedAvgLoRA, lora_answer(shapes, clip)
        kwargs = dict(plan=FedAvgPlan(noise_multiplier=z, sample_rate=1.0, rounds=1, planned_epsilon_prv=0.0,
                                      planned_epsilon_rdp=0.0),
                      sampling=sampling_generator(0), initial={k: torch.zeros(s) for k, s in shapes.items()},
                      defense="none", private=True, num_sites=sites)
        initial = ArrayRecord()
    else:
        raise ValueError(f"method must be 'dpagg-ti' or 'lora', got {method!r}")
    if receive == "stream":
        cls = base
    elif receive == "keep-all":
        class KeepAll(base):  # the loop before streaming: Flower's send_and_receive, every reply in one list
            def receive(self, grid, messages, timeout):
                return grid.send_and_receive(messages=messages, timeout=timeout)
        cls = KeepAll
    else:
        raise ValueError(f"receive must be 'stream' or 'keep-all', got {receive!r}")
    strategy = cls(mechanism=mechanism, noise=NoiseSource.seeded(0), ledger=ledger, **kwargs)
    return strategy, answer, initial


def one_round(method: str, sites: int, receive: str, traced: bool) -> dict:
    """One round of ``method`` with ``sites`` replying sites, in this process. ``traced``:
    measure the peak of Python and numpy allocations (tracemalloc; slows the round down),
    else the wall time and the peak RSS increase."""
    strategy, answer, initial = build_strategy(method, receive, sites)
    grid = ReplayGrid(sites, answer)
    answer(Message(RecordDict(), dst_node_id=1, message_type="train"))  # warm-up of the reply builder
    gc.collect()
    if traced:
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=1, timeout=3600.0)
        peak = tracemalloc.get_traced_memory()[1] - before
        tracemalloc.stop()
        row = {"server_peak_traced_mb": round(peak / 1e6, 3)}
    else:
        with PeakRSS() as mem:
            start = time.perf_counter()
            result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=1, timeout=3600.0)
            wall = time.perf_counter() - start
        row = {"wall_s": round(wall, 4), "server_peak_rss_increase_mb": round((mem.peak - mem.start) / 1e6, 2)}
    metrics = result.train_metrics_clientapp.get(1)
    used = int(metrics["sites"]) if metrics is not None else 0
    if used != sites:
        raise RuntimeError(f"{method}: {used} of {sites} replies entered the aggregate")
    return {**row, "replies_alive_at_once": grid.max_live}


def series(method: str, sites: list[int], receive: str) -> list[dict]:
    """:func:`one_round` for each site count, in increasing order, timed then traced."""
    import logging

    logging.getLogger("privadapt.server").setLevel(logging.ERROR)  # no per-round log lines in the timing
    set_task_identity()
    rows = []
    for n in sorted(sites):
        row = {"method": method, "sites": n, "receive": receive, **one_round(method, n, receive, traced=False)}
        row.update(one_round(method, n, receive, traced=True))
        rows.append(row)
    return rows


def measure(method: str, sites: list[int], receive: str) -> list[dict]:
    """:func:`series` in a fresh Python process per method and receive mode."""
    cmd = [sys.executable, "-m", "bench.scale", "--one", method, receive, "--sites", *map(str, sites)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if out.returncode != 0:
        raise RuntimeError(f"bench_scale {method} {receive} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(sites: list[int], methods: tuple[str, ...] = ("dpagg-ti", "lora"),
        receives: tuple[str, ...] = ("stream", "keep-all")) -> list[dict]:
    return [row for m in methods for r in receives for row in measure(m, sites, r)]


def flatness(rows: list[dict]) -> list[dict]:
    """Per method and receive mode: peak-memory increase at the most sites over that at the fewest."""
    out = []
    for method in sorted({r["method"] for r in rows}):
        for receive in sorted({r["receive"] for r in rows}):
            sel = sorted((r for r in rows if r["method"] == method and r["receive"] == receive), key=lambda r: r["sites"])
            if len(sel) >= 2:
                lo, hi = sel[0], sel[-1]
                out.append({"method": method, "receive": receive, "sites": f"{lo['sites']} -> {hi['sites']}",
                            "peak_traced_mb": f"{lo['server_peak_traced_mb']} -> {hi['server_peak_traced_mb']}",
                            "ratio": round(hi["server_peak_traced_mb"] / lo["server_peak_traced_mb"], 3),
                            "wall_s": f"{lo['wall_s']} -> {hi['wall_s']}"})
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "RECEIVE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        rows = series(args.one[0], args.sites, args.one[1])
        print(json.dumps(rows))
        return rows
    rows = run(args.sites)
    print(json.dumps({"rows": rows, "flatness": flatness(rows)}, indent=2))
    return rows


if __name__ == "__main__":
    main()
