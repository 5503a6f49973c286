"""Fault injection across real Flower processes (deploy/local.py: SuperLink with TLS and
node authentication, three SuperNodes with long-lived ClientApps on 127.0.0.1).

- The ServerApp is killed (SIGKILL) once round 1 is checkpointed; the same job started again
  on the same output-dir resumes and ends with the adapter and ledger of an uninterrupted run,
  bit for bit (seeded noise and sampling, deterministic sites).
- A SuperNode is killed (SIGKILL, with its ClientApp) once round 1 is checkpointed (round 2
  starting); the run goes on with the other sites, every round keeps the planned noise and
  denominator (the ledger equals the uninterrupted run's), and round 1, which all sites
  answered, equals the uninterrupted round 1.

Slow (several minutes): marked ``slow``, kept out of the default run."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from common.reasons import REJECTION_REASONS
from deploy.flower import CONNECTION
from deploy.processes import leftovers
from server.checkpoint import CHECKPOINT_FILE
from tests.deploy.conftest import DATA, federation

pytestmark = pytest.mark.slow

LORA = {"adapter": "lora", "num-sites": 3, "rounds": 3, "local-steps": 2, "lora-batch-size": 2, "lora-rank": 2, "lora-alpha": 2.0,
        "sample-steps": 1, "sample-prompts": "an emoji of a cat", "noise-multiplier": 8.0, "seed": 5,
        "round-timeout": 150.0, "num-sites": 3,
        # fault handling, not utility: site-level DP over 3 sites carries no signal (common.dp.plan.signal_to_noise)
        "max-noise-to-signal": "inf",
        # bit-for-bit comparisons need replayable noise: a test-only mode that claims no DP
        "privacy-randomness": "seeded-insecure"}


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    with federation(tmp_path_factory, "faults", 3) as dep:
        yield dep


def launch(dep, model, name: str):
    out = dep.root / "outputs" / name
    return out, dep.run({**LORA, "model-path": str(model), "data-path": str(DATA), "output-dir": str(out)}, timeout=900)


def outputs(out):
    privacy = json.loads((out / "privacy.json").read_text())
    ledger = json.loads((out / "ledger.json").read_text())["events"]
    rounds = json.loads((out / "round_metrics.json").read_text())
    return privacy, ledger, rounds, load_file(out / "pytorch_lora_weights.safetensors")


@pytest.fixture(scope="module")
def reference(deployment, tiny_sd_path):
    started = time.time()
    out, result = launch(deployment, tiny_sd_path, "uninterrupted")
    assert result.completed, result.text()[-4000:]
    print(f"uninterrupted 3-round LoRA job: {time.time() - started:.0f} s")
    return outputs(out)


def in_background(fn):
    box: dict = {}
    thread = threading.Thread(target=lambda: box.setdefault("result", fn()), daemon=True)
    thread.start()
    return thread, box


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise TimeoutError(f"waited {timeout:.0f} s for {what}")
        time.sleep(0.5)


def checkpointed_round(out) -> int:
    try:
        return int(torch.load(out / CHECKPOINT_FILE, weights_only=True)["completed_round"])
    except Exception:  # absent, or being replaced right now
        return 0


def serverapps(dep) -> list[psutil.Process]:
    found = []
    for proc in leftovers(dep.root):
        try:
            if "flwr-serverapp" in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            pass
    return found


def test_serverapp_killed_between_rounds_resumes_to_the_uninterrupted_result(deployment, tiny_sd_path, reference):
    dep = deployment
    out = dep.root / "outputs" / "server-killed"
    started = time.time()
    thread, box = in_background(lambda: launch(dep, tiny_sd_path, "server-killed"))
    wait_for(lambda: checkpointed_round(out) >= 1, 600, "round 1's checkpoint")
    victims = serverapps(dep)
    assert victims, "no flwr-serverapp process found"
    for proc in victims:
        proc.send_signal(signal.SIGKILL)
    killed_after = checkpointed_round(out)
    run_log = (dep.group.log_dir / f"run-{dep.runs}.log").read_text()
    run_id = run_log.split("Successfully started run ")[1].split()[0]
    dep.flwr("stop", run_id, CONNECTION, check=False)
    thread.join(timeout=900)
    _, first = box["result"]
    assert not first.completed
    assert killed_after < 3
    # A site that had pulled the killed run's next message stays busy with it until Flower's
    # object pulls give up (~6 min seen under load); an operator restarting the server sooner
    # gets rounds those sites miss (released as pure noise, accounted: correct, but no longer
    # comparable bit for bit). Wait until every site is done with the killed run.
    time.sleep(15)  # longer than the sites' poll interval: a message pulled before the stop shows up
    wait_for(lambda: not any(site.busy_with(first.run_id) for site in dep.sites.values()), 600,
             "the sites to finish the killed run's last message")
    second_started = time.time()
    _, second = launch(dep, tiny_sd_path, "server-killed")
    assert second.completed, second.text()[-4000:]
    print(f"server killed after round {killed_after} ({second_started - started:.0f} s); "
          f"resumed run: {time.time() - second_started:.0f} s")
    privacy, ledger, rounds, adapter = outputs(out)
    ref_privacy, ref_ledger, ref_rounds, ref_adapter = reference
    assert privacy["resumed_after_round"] == killed_after
    assert ledger == ref_ledger and privacy["epsilon"] == ref_privacy["epsilon"]
    assert rounds == ref_rounds
    assert adapter.keys() == ref_adapter.keys() and all(torch.equal(adapter[k], ref_adapter[k]) for k in adapter)


def test_supernode_killed_mid_round_the_run_goes_on_with_the_planned_noise(deployment, tiny_sd_path, reference):
    dep = deployment
    victim = dep.sites["site-2"]
    out = dep.root / "outputs" / "node-killed"
    started = time.time()
    thread, box = in_background(lambda: launch(dep, tiny_sd_path, "node-killed"))
    wait_for(lambda: checkpointed_round(out) >= 1, 600, "round 1's checkpoint (round 2 starts right after)")
    for process in (victim.supernode, victim.clientapp):
        if process is not None:
            os.killpg(process.popen.pid, signal.SIGKILL)
    thread.join(timeout=900)
    out, result = box["result"]
    assert result.completed, result.text()[-4000:]
    print(f"SuperNode killed in round 2: run completed in {time.time() - started:.0f} s")
    privacy, ledger, rounds, adapter = outputs(out)
    ref_privacy, ref_ledger, ref_rounds, _ = reference
    # the noise, the denominator and the spend are the plan's whoever answered
    assert ledger == ref_ledger and privacy["epsilon"] == ref_privacy["epsilon"]
    assert privacy["denominator"] == ref_privacy["denominator"] and privacy["num_sites_declared"] == 3
    assert rounds[0] == ref_rounds[0]  # every site answered round 1: identical
    assert rounds[2]["sites_used"] == 2 and rounds[1]["sites_used"] in (2, 3)
    # whatever the lost site's reply became, the outputs hold only a generic reason
    assert all(r["reason"] in REJECTION_REASONS for rnd in rounds for r in rnd["rejected"])
    assert all(torch.isfinite(v).all() for v in adapter.values())
