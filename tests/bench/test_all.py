"""Smoke test of bench/all.py: one real section, written to JSON and Markdown.

Timings are not checked (they belong in BENCHMARKS.md, not in tests); the test checks that the
command runs a section, records where and when, and regenerates only its own part of the file.
"""

from __future__ import annotations

import json

from bench import all as bench_all

HAND_WRITTEN = "# Benchmarks\n\nHand-written analysis that must survive.\n"


def test_one_quick_section_writes_json_and_only_the_generated_block(tmp_path):
    md, js = tmp_path / "BENCHMARKS.md", tmp_path / "benchmarks.json"
    md.write_text(HAND_WRITTEN + "\n" + bench_all.BEGIN + "\nstale figures\n" + bench_all.END + "\n\nMore analysis.\n")
    other = {"section": "ti", "command": "earlier run", "quick": True, "date": "2026-01-01 00:00 UTC",
             "machine": {"cpu": "x", "cores": 2, "torch_threads": 2, "gpu": None}, "load_before": "1", "load_after": "1",
             "seconds": 1.0, "result": {"images": 4, "steps": 5, "batched_s": 1.0, "one_run_per_image_s": 2.0,
                                        "speedup": 2.0}}
    js.write_text(json.dumps({"ti": other}))  # another section's earlier entry stays, with its own date
    entries = bench_all.main(["--quick", "--sections", "aggregation", "--json", str(js), "--markdown", str(md)])

    saved = json.loads(js.read_text())
    assert saved["ti"] == other and set(saved) == {"ti", "aggregation"}
    entry = saved["aggregation"]
    assert entry == json.loads(json.dumps(entries["aggregation"]))
    # one BLAS and torch thread: a CPU-time clock would count a second thread's time
    assert entry["command"].startswith("OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 "
                                       ".venv/bin/python -m bench.aggregation")
    assert entry["quick"] and entry["machine"]["cores"] >= 1 and entry["date"].endswith("UTC")
    assert entry["machine"]["torch_threads"] == 1
    adapters = [row["adapter"] for row in entry["result"]["rows"]]
    assert any("tiny" in a for a in adapters) and any("r64" in a for a in adapters) and any("TI" in a for a in adapters)
    for row in entry["result"]["rows"]:
        assert row["validate_clip_sum_gb_s"] > 0 and row["copy_gb_s"] > 0 and row["ratio_validate_clip_sum_to_copy"] > 0
    assert entry["result"]["passes"]["ceiling_two_reads"] > 0

    text = md.read_text()
    assert text.startswith(HAND_WRITTEN) and text.rstrip().endswith("More analysis.")
    assert "stale figures" not in text and text.count(bench_all.BEGIN) == 1
    assert "3. Server aggregation vs memcpy" in text and "| SD 1.5 LoRA r64" in text
    assert "| passes on one array of |" in text and "copy / two plain reads (ceiling)" in text
    assert "2026-01-01 00:00 UTC" in text and "| 4 | 5 | 1.0 | 2.0 | 2.0x |" in text


def test_deployment_rounds_render_as_a_table_with_their_ratios():
    result = {"sites": 2, "local_steps": 10, "modes": {
        "flower": {"round_seconds": [20.0, 19.0], "overhead_seconds": [13.0, 18.0]},
        "warm": {"round_seconds": [18.0, 6.0], "overhead_seconds": [11.0, 5.0],
                 "app_seconds": {"site-0": [6.0, 1.0], "site-1": [5.0, 2.0]}}}}
    lines = bench_all.RENDER["rounds_deploy"](result).splitlines()
    assert lines[0].startswith("| mode | round | wall (s) |") and len(lines) == 2 + 4 + 2
    assert lines[2] == "| flower | 1 | 20.0 | not observable | 13.0 | - | - |"
    assert lines[5] == "| warm | 2 | 6.0 | 2.0 | 5.0 | 3.00x | 2.00x |"  # 6 / max(1, 2), 6 / (1 + 2)


def test_aggregation_entries_from_before_the_passes_still_render():
    row = {"adapter": "tiny", "adapter_mb": 0.04, "replies": 16, "validate_clip_sum_gb_s": 1.0, "with_release_gb_s": 0.2,
           "copy_gb_s": 6.0, "ratio_validate_clip_sum_to_copy": 0.17, "ratio_with_release_to_copy": 0.03,
           "noise_ns_per_parameter": 261.3}
    lines = bench_all.RENDER["aggregation"]([row]).splitlines()
    assert len(lines) == 3 and lines[2].startswith("| tiny | tensors | 0.04 | 16 | 1.0 |")
