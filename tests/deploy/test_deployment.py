"""privadapt across real Flower processes on 127.0.0.1: one SuperLink (TLS, node authentication),
two SuperNodes on data/demo/site-0 and site-1, each with a long-lived ClientApp process, and
``flwr run`` of a DPAgg-TI job and a LoRA job. Intruders are refused: a node whose key was never
registered, SuperNodes that do not trust the federation's CA, a CLI without the CA.
Every process is stopped at the end, also when a test fails."""

from __future__ import annotations

import json

import pytest

from deploy.certs import Credentials, make_credentials, make_node_key
from deploy.flower import CONNECTION, connection_toml
from tests.deploy.conftest import DATA, federation

FAST = {"sample-steps": 2, "sample-prompts": "an emoji of a cat"}
TI = {**FAST, "ti-steps": 2, "dataset-size": 24}
LORA = {**FAST, "adapter": "lora", "rounds": 2, "local-steps": 2, "lora-batch-size": 2, "lora-rank": 2,
        "lora-alpha": 2.0, "num-sites": 2,  # K is declared, never read from who connected
        # the deployment's mechanics, not utility: site-level DP over 2 sites carries no signal
        # (common.dp.plan.signal_to_noise)
        "max-noise-to-signal": "inf"}


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    with federation(tmp_path_factory, "deploy", 2) as dep:
        yield dep


def job(dep, model, name: str, config: dict):
    out = dep.root / "outputs" / name
    result = dep.run({**config, "model-path": str(model), "data-path": str(DATA), "output-dir": str(out)})
    assert result.completed, f"run {result.run_id}: {result.status}\n{result.text()[-4000:]}"
    return out, json.loads((out / "privacy.json").read_text())


def test_intruders_are_refused(deployment):
    dep = deployment
    other_ca = Credentials(dep.root / "other-ca")
    make_credentials(other_ca.root, [])
    make_node_key(dep.creds, "intruder")
    intruders = {  # a key nobody registered; registered keys but a CA that did not sign the SuperLink, or none
        "unregistered": dep.start_site("intruder", DATA / "site-0", 0, 2, register=False),
        "other-ca": dep.start_site("intruder-other-ca", DATA / "site-1", 1, 2, register=False,
                                   key=dep.creds.node_key("site-1"), root_certificates=other_ca.ca_cert),
        "no-ca": dep.start_site("intruder-no-ca", DATA / "site-0", 0, 2, register=False,
                                key=dep.creds.node_key("site-0"), root_certificates=None),
    }
    for site in intruders.values():
        assert site.supernode.popen.wait(timeout=180) != 0, site.supernode.tail()
    unregistered = intruders["unregistered"].supernode.text()
    assert "Failed to activate SuperNode" in unregistered, unregistered
    assert "No SuperNode found with the given public key" in dep.superlink.text()
    for name in ("other-ca", "no-ca"):
        log = intruders[name].supernode.text()
        assert "CERTIFICATE_VERIFY_FAILED" in log, log
    # only the two registered sites are known, and they are online
    assert dep.nodes() == {dep.sites[name].node_id: "online" for name in ("site-0", "site-1")}
    # the flwr CLI without the CA cannot talk to the SuperLink either (with it, dep.nodes() just did)
    home = dep.root / "cli-without-ca"
    home.mkdir()
    (home / "config.toml").write_text(connection_toml(dep.address, dep.creds.ca_cert).replace(
        f'root-certificates = "{dep.creds.ca_cert}"\n', ""))
    refused = dep.flwr("supernode", "list", CONNECTION, check=False, home=home)
    assert refused.returncode != 0 and "Connection to the SuperLink is unavailable" in refused.stderr, refused


def test_dpagg_ti_job(deployment, tiny_sd_path):
    out, privacy = job(deployment, tiny_sd_path, "ti", TI)
    assert (out / "learned_embeds.safetensors").exists() and (out / "samples" / "grid.png").exists()
    assert privacy["method"] == "dpagg-ti" and privacy["private"]
    assert privacy["num_sites"] == 2 and privacy["num_releases"] == 1 and not privacy["rejected_replies"]
    assert 0 < privacy["epsilon"]["prv"] <= 1.0


def test_lora_job(deployment, tiny_sd_path):
    out, privacy = job(deployment, tiny_sd_path, "lora", LORA)
    assert (out / "pytorch_lora_weights.safetensors").exists()
    assert privacy["num_rounds"] == 2 and privacy["num_sites_declared"] == 2
    assert 0 < privacy["epsilon"]["site"]["prv"] <= 1.0
    rounds = json.loads((out / "round_metrics.json").read_text())
    assert [r["sites_used"] for r in rounds] == [2, 2]


def test_site_pipelines_stay_resident(deployment):
    """Each site served every message of both jobs from ONE process; a LoRA round after the first
    imported nothing and loaded no pipeline."""
    for name in ("site-0", "site-1"):
        site = deployment.sites[name]
        tasks = site.tasks()
        assert len(tasks) == 3 and all(t["status"] == "completed" for t in tasks), tasks  # 1 TI release + 2 LoRA rounds
        assert {t["pid"] for t in tasks} == {site.clientapp.popen.pid}
        last = tasks[-1]
        assert last["app_loaded_before"] and last["new_modules"] == 0, last
        segments = site.clientapp.text().split('{"event": "task"')
        assert "Loading pipeline components" not in segments[-2], "the last LoRA round reloaded the model"
