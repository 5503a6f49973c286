"""Smoke test of bench/aggregation.py: its arms run and report every ratio.

Timings are not checked (they belong in BENCHMARKS.md, not in tests).
"""

from __future__ import annotations

import pytest

from bench import aggregation as bench_aggregation
from bench.shapes import lora_shapes, tiny_unet_config
from common.wire import packed_array_key


@pytest.mark.parametrize("wire", bench_aggregation.WIRES)
def test_every_arm_runs_and_the_server_sum_is_the_strategies_sum(wire):
    row = bench_aggregation.measure("tiny", lora_shapes(tiny_unet_config(), 4), n=3, repeats=1, ti=False, clock="cpu",
                                    wire=wire)
    assert row["clock"] == "cpu" and row["replies"] == 3 and row["wire"] == wire
    for key in ("ratio_validate_clip_sum_to_copy", "ratio_first_round_sum_to_copy", "ratio_validate_only_to_copy",
                "ratio_add_only_to_copy", "ratio_with_release_to_copy"):
        assert row[key] > 0
    assert all(n >= 1 for n in row["calls_per_sample"].values())
    ti = bench_aggregation.measure("ti", {"v": (8,)}, n=2, repeats=1, ti=True)
    assert ti["server_path"].startswith("read_vector_view + add_block")


def test_replies_are_built_in_the_layout_asked_for():
    shapes = lora_shapes(tiny_unet_config(), 4)
    update = bench_aggregation.random_update(shapes, 0, 0.5)
    packed = bench_aggregation.reply_message(update, 1, wire="packed").content["arrays"]
    per_tensor = bench_aggregation.reply_message(update, 1, wire="tensors").content["arrays"]
    assert packed_array_key(packed) is not None and len(packed) == 1
    assert packed_array_key(per_tensor) is None and list(per_tensor) == list(shapes)
    with pytest.raises(ValueError, match="wire must be one of"):
        bench_aggregation.measure("tiny", shapes, n=1, repeats=1, ti=False, wire="zip")


def test_the_passes_are_timed_against_a_copy_and_a_plain_read():
    out = bench_aggregation.passes(200_000, repeats=1, native=False)
    assert set(out["ns_per_parameter"]) == {"copy", "read", "cast", "dot", "add", "mixed_add", "server_norm",
                                            "server_add"}
    ns = out["ns_per_parameter"]
    assert all(0 < t < float("inf") for t in ns.values())
    # the ratios are the timings' (rounded to 3 places, so a loaded machine may print 0.0)
    floor = ns["cast"] + ns["dot"] + min(ns["mixed_add"], ns["cast"] + ns["add"])
    assert out["best_ratio_two_passes"] == round(ns["copy"] / floor, 3)
    assert out["ceiling_two_reads"] == round(ns["copy"] / (2 * ns["read"]), 3)
    assert out["server_ratio_two_passes"] == round(ns["copy"] / (ns["server_norm"] + ns["server_add"]), 3)
    assert out["native"] == "not asked for" and "native_ratio_two_passes" not in out
