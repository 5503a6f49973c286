"""The tests' simulation runner fails a hung run quickly and leaves none of its processes behind."""

from __future__ import annotations

import time

import pytest

import tests.simulation_process as sp

# a run that starts a process of its own (as Ray starts its raylet and workers), says its pid, then hangs
HANGS = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print("PIDS", child.pid, flush=True)
time.sleep(600)
"""


def running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"  # a zombie waiting for its reaper is not running
    except FileNotFoundError:
        return False


def ended_within(pid: int, seconds: float) -> bool:
    """A killed process may take a moment to finish dying (its pipe closes before it exits)."""
    deadline = time.monotonic() + seconds
    while running(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_hung_run_fails_with_its_output_and_its_process_group_is_killed(monkeypatch):
    monkeypatch.setattr(sp, "_CHILD", HANGS)
    with pytest.raises(pytest.fail.Exception, match=r"hung \(> 5 s\)") as failure:
        sp.simulate(2, {}, timeout=5)
    pids = [int(line.split()[1]) for line in str(failure.value).splitlines() if line.startswith("PIDS")]
    assert len(pids) == 1 and ended_within(pids[0], 10)


def test_a_failing_run_fails_with_its_output(monkeypatch):
    monkeypatch.setattr(sp, "_CHILD", "import sys; print('bad run-config key'); sys.exit(3)")
    with pytest.raises(pytest.fail.Exception, match="exited with 3(.|\n)*bad run-config key"):
        sp.simulate(2, {}, timeout=30)


def test_a_finished_run_gives_its_output_folder(monkeypatch, tmp_path):
    monkeypatch.setattr(sp, "_CHILD", f"print('log line'); print('SIMULATED', {str(tmp_path)!r})")
    assert sp.simulate(2, {}, timeout=30) == tmp_path
