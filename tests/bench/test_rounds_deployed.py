"""The deployment benchmark's timeline: where a round's wall time goes, from its records."""

from __future__ import annotations

import importlib.util

import pytest

from common.paths import REPO_ROOT
from deploy.local import RunResult


@pytest.fixture(scope="module")
def bench_rounds():
    spec = importlib.util.spec_from_file_location("bench_rounds", REPO_ROOT / "bench" / "rounds_deployed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_timeline_splits_each_round_into_its_parts(bench_rounds):
    lines = [(100.0, "INFO : [ROUND 1/2]"), (112.0, "INFO : [ROUND 2/2]"), (120.5, "Strategy execution finished in 20s")]
    result = RunResult(run_id=1, status="finished:completed", returncode=0, seconds=21.0, lines=lines)
    tasks = {  # out of order on purpose: the k-th task by start time is round k's
        "a": [{"started": 113.0, "seconds": 3.0, "pull_seconds": 1.0, "app_seconds": 1.5},
              {"started": 101.0, "seconds": 4.0, "pull_seconds": 0.5, "app_seconds": 3.0}],
        "b": [{"started": 102.0, "seconds": 6.0, "pull_seconds": 2.0, "app_seconds": 3.5},
              {"started": 114.0, "seconds": 2.0, "pull_seconds": 0.5, "app_seconds": 1.0}],
    }
    rows = bench_rounds.timeline(result, tasks, rounds=2)
    assert [r["seconds"] for r in rows] == [12.0, 8.5]
    assert rows[0]["sites"]["a"] == {"to_task": 1.0, "pull": 0.5, "app": 3.0, "reply": 0.5}
    assert rows[0]["sites"]["b"] == {"to_task": 2.0, "pull": 2.0, "app": 3.5, "reply": 0.5}
    assert rows[0]["after_last_task"] == 4.0  # b ends at 108, round 2 starts at 112
    assert rows[1]["after_last_task"] == 4.5  # a ends at 116, the run finishes at 120.5


def test_timeline_skips_a_round_whose_lines_are_missing(bench_rounds):
    result = RunResult(run_id=1, status="failed", returncode=1, seconds=5.0, lines=[(10.0, "[ROUND 1/2]")])
    assert bench_rounds.timeline(result, {"a": []}, rounds=2) == []
