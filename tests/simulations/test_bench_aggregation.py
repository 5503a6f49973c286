"""Smoke test of simulations/bench_aggregation.py: its arms run and report every ratio.

Timings are not checked (they belong in BENCHMARKS.md, not in tests).
"""

from __future__ import annotations

from simulations import bench_aggregation
from simulations.bench_shapes import lora_shapes, tiny_unet_config


def test_every_arm_runs_and_the_server_sum_is_the_strategies_sum():
    row = bench_aggregation.measure("tiny", lora_shapes(tiny_unet_config(), 4), n=3, repeats=1, ti=False, clock="cpu")
    assert row["clock"] == "cpu" and row["replies"] == 3
    for key in ("ratio_validate_clip_sum_to_copy", "ratio_validate_only_to_copy", "ratio_add_only_to_copy",
                "ratio_with_release_to_copy"):
        assert row[key] > 0
    ti = bench_aggregation.measure("ti", {"v": (8,)}, n=2, repeats=1, ti=True)
    assert ti["server_path"].startswith("read_vector_view + add_block")


def test_the_passes_are_timed_against_a_copy():
    out = bench_aggregation.passes(200_000, repeats=1)
    assert set(out["ns_per_parameter"]) == {"copy", "cast", "dot", "add", "mixed_add"}
    assert 0 < out["best_ratio_two_passes"]
