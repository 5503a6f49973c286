"""Flower simulations for the tests, each in its own Python process with a hang guard.

The tests call :func:`simulate` exactly as a user calls ``simulations.run.simulate``; only the
process boundary and the guard are added here. A run that hangs (a ServerApp waiting out its
round-timeout for a reply that never comes, a library stuck in a thread) would otherwise hold
the whole suite until CI's limit; here it is killed with its process group (Ray's raylet and
workers included) after ``timeout`` seconds, and the test fails with the run's output and the
stack dump the run writes 30 s before it is killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

SIMULATION_TIMEOUT = 480.0  # seconds; the tests' tiny simulations take ~20-90 s on 2 cores
_CHILD = """
import faulthandler, json, sys
faulthandler.dump_traceback_later(float(sys.argv[3]), exit=False)  # a hung run says where it waits
from simulations.run import simulate
print("SIMULATED", simulate(int(sys.argv[1]), json.loads(sys.argv[2])), flush=True)
"""


def simulate(num_sites: int, overrides: dict, *, timeout: float = SIMULATION_TIMEOUT) -> Path:
    """``simulations.run.simulate(num_sites, overrides)`` in a fresh Python process; returns the
    run's output folder. Fails the calling test if the run exits non-zero or outlasts ``timeout``."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(num_sites), json.dumps(overrides), str(max(1.0, timeout - 30))],
        cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"simulation hung (> {timeout:.0f} s) and was killed; its output:\n{output}", pytrace=False)
    if proc.returncode != 0:
        pytest.fail(f"simulation exited with {proc.returncode}; its output:\n{output}", pytrace=False)
    return Path(output.rsplit("SIMULATED ", 1)[1].splitlines()[0].strip())
