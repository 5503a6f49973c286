"""Tests of client/policy.py: a site's own privacy policy and lifetime ledger."""

from __future__ import annotations

import logging
import math
import re

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client.app import handle_train
from client.policy import PolicyError, RoundPlan, SitePolicy, check_round, load_policy, plan_from_message, reserve_run
from common import keys
from common.config import RunConfig
from common.dp import PrivacyEvent, PrivacyLedger, epsilon
from common.dp.plan import plan_dpagg, plan_record
from common.paths import REPO_ROOT
from common.reasons import SITE_POLICY, SiteRefusal


def plan(z=1.0, q=0.5, steps=1, unit="record", adapter="ti", method="dpagg", aggregation="central", rnd=1,
         run_id=7, delta=1e-5, extra=()) -> RoundPlan:
    events = (PrivacyEvent(z, q, steps, unit=unit), *extra)
    return RoundPlan(run_id=run_id, round=rnd, adapter=adapter, method=method, aggregation=aggregation, delta=delta,
                     rounds=steps, events=events)


def test_no_policy_declared_means_none():
    assert load_policy({"partition-id": 0}) is None


def test_policy_from_node_config_keys_and_from_a_file(tmp_path):
    p = load_policy({"policy-max-epsilon-record": "2.5", "policy-allowed-adapters": "ti",
                     "policy-require-secure-aggregation": "true"})
    assert p.max_epsilon_record == 2.5 and p.allowed_adapters == ("ti",) and p.require_secure_aggregation
    f = tmp_path / "policy.toml"
    f.write_text('max-epsilon-site = 4.0\nallowed-methods = ["smp-lora", "dp-sgd"]\nmax-rounds = 20\n')
    p = load_policy({"policy-file": str(f), "policy-max-rounds": "5"})  # node-config keys override the file
    assert p.max_epsilon_site == 4.0 and p.allowed_methods == ("smp-lora", "dp-sgd") and p.max_rounds == 5
    with pytest.raises(ValueError, match="unknown policy key.*max-epsilon"):
        load_policy({"policy-max-epsilon": "1"})
    with pytest.raises(ValueError, match="cannot read"):
        load_policy({"policy-max-rounds": "many"})
    with pytest.raises(ValueError, match="policy-file"):
        load_policy({"policy-file": str(tmp_path / "missing.toml")})


def test_a_compliant_round_passes():
    eps = epsilon([PrivacyEvent(1.0, 0.5, 1)], 1e-5)
    check_round(SitePolicy(max_epsilon_record=eps + 0.01, min_noise_multiplier=1.0), plan(), "site-0")


@pytest.mark.parametrize("policy, the_plan, reason", [
    (SitePolicy(allowed_adapters=("ti",)), plan(adapter="lora", unit="site"), "adapter 'lora'"),
    (SitePolicy(allowed_methods=("dpagg",)), plan(method="smp-lora"), "method 'smp-lora'"),
    (SitePolicy(require_secure_aggregation=True), plan(), "require-secure-aggregation"),
    (SitePolicy(), plan(z=0.0), "non-private"),
    (SitePolicy(min_noise_multiplier=2.0), plan(z=1.0), "below min-noise-multiplier 2"),
    (SitePolicy(max_epsilon_record=1.0), plan(z=1.0), "record-level epsilon is .* above max-epsilon-record 1"),
    (SitePolicy(max_epsilon_site=1.0), plan(z=1.0, unit="site", q=1.0, steps=3), "site-level epsilon"),
    (SitePolicy(max_rounds=2), plan(z=5.0, steps=3), "plans 3 rounds, above max-rounds 2"),
    (SitePolicy(max_delta=1e-6), plan(z=5.0), "delta 1e-05 is above max-delta"),
    (SitePolicy(), plan(z=5.0, steps=2, rnd=3), "round 3 is beyond"),
])
def test_each_rule_refuses_with_its_reason(policy, the_plan, reason):
    with pytest.raises(PolicyError, match=f"site-3: refused by the site's privacy policy: .*{reason}"):
        check_round(policy, the_plan, "site-3")


def test_the_record_level_dp_sgd_plan_counts_too():
    own = PrivacyEvent(0.5, 0.5, 100, unit="record")  # the site's own DP-SGD: a large epsilon
    with pytest.raises(PolicyError, match="record-level epsilon"):
        check_round(SitePolicy(max_epsilon_record=2.0), plan(z=5.0, unit="site", q=1.0, extra=(own,)), "s")


def test_a_sent_dp_sgd_plan_that_differs_from_the_sites_own_is_refused():
    own = PrivacyEvent(1.0, 0.25, 20, unit="record")
    sent = {keys.PLAN_UNIT: "", keys.PLAN_DPSGD_NOISE_MULTIPLIER: 1.0, keys.PLAN_DPSGD_SAMPLE_RATE: 0.25,
            keys.PLAN_DPSGD_STEPS: 20, keys.METHOD: "dp-sgd"}
    assert plan_from_message(sent, 1, own).events == (own,)
    assert plan_from_message(sent, 1, None).events == (own,)  # the sent plan alone, as the site reads it
    with pytest.raises(PolicyError, match="differs from this site's own"):
        plan_from_message({**sent, keys.PLAN_DPSGD_SAMPLE_RATE: 0.5}, 1, own)


def test_lifetime_ledger_composes_runs_and_refuses_past_its_limit(tmp_path):
    path = tmp_path / "site-ledger.json"
    one = epsilon([PrivacyEvent(2.0, 0.5, 4)], 1e-5)
    two = epsilon([PrivacyEvent(2.0, 0.5, 8)], 1e-5)
    policy = SitePolicy(ledger=str(path), max_lifetime_epsilon_record=(one + two) / 2)
    reserve_run(policy, plan(z=2.0, steps=4, run_id=1), "site-0")
    reserve_run(policy, plan(z=2.0, steps=4, run_id=1, rnd=2), "site-0")  # same run: reserved once
    ledger = PrivacyLedger.load(path)
    assert [e.label for e in ledger.events] == ["run 1"] and ledger.events[0].steps == 4
    with pytest.raises(PolicyError, match="lifetime record-level epsilon would be .* 1 earlier run"):
        reserve_run(policy, plan(z=2.0, steps=4, run_id=2), "site-0")
    assert len(PrivacyLedger.load(path).events) == 1  # the refused run reserved nothing
    assert PrivacyLedger.load(path).epsilon("record") == pytest.approx(one, rel=1e-6)


def test_plan_from_message_reads_what_the_server_sends():
    cfg = RunConfig()
    p = plan_dpagg(cfg)
    sent = {**plan_record(cfg, p), keys.ROUND: 1, keys.METHOD: "dpagg"}
    got = plan_from_message(sent, 3, None)
    assert got.events == (PrivacyEvent(p.noise_multiplier, p.sample_rate, 1, unit="record"),)
    assert got.method == "dpagg" and got.adapter == "ti" and got.aggregation == "central" and got.private


def test_the_client_app_refuses_before_touching_the_images(task_identity, tiny_sd_path, tmp_path, caplog):
    """The refusal reaches the server as the site's error reply with a fixed text; the rule
    and the figures stay in the site's own log."""
    cfg = RunConfig.from_run_config({"model-path": str(tiny_sd_path), "ti-steps": 1})
    p = plan_dpagg(cfg)
    config = ConfigRecord({**plan_record(cfg, p), keys.ROUND: 1, keys.METHOD: "dpagg"})
    msg = Message(content=RecordDict({keys.CONFIG: config}), dst_node_id=1, message_type="train")
    node = {"partition-id": 0, "data-path": str(tmp_path / "does-not-exist"),  # never read: refused first
            "policy-max-epsilon-record": 0.5, "site-name": "clinic-a"}
    context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config=cfg.to_run_config())
    with caplog.at_level(logging.ERROR, logger="privadapt.client"), pytest.raises(SiteRefusal) as refused:
        handle_train(msg, context)
    assert str(refused.value) == SITE_POLICY and refused.value.__context__ is None
    assert re.search("clinic-a: refused .* above max-epsilon-record 0.5", caplog.text)
    # within its policy, the same site trains and answers
    node = {**node, "policy-max-epsilon-record": 1.0, "data-path": str(REPO_ROOT / "data/demo/site-0"),
            "policy-ledger": str(tmp_path / "ledger.json")}
    context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config=cfg.to_run_config())
    reply = handle_train(msg, context)
    assert keys.ARRAYS in reply.content
    assert PrivacyLedger.load(tmp_path / "ledger.json").epsilon("record") <= 1.0
    assert not math.isinf(PrivacyLedger.load(tmp_path / "ledger.json").epsilon("record"))
