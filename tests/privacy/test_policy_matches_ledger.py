"""Red-team tests: what a site is told is exactly what the server charges (issue 21, finding 6),
and a round whose outcome depends on participation is charged (finding 7b).

Attacks, each run against the real code path:

- Under-counting by a site's policy. Every round carries the run's plan; a site's policy
  (client/policy.py) recomputes the epsilon from it, refuses a run above its limits and
  reserves the run's spend in its lifetime ledger. Distributed LoRA told the sites q = 0.5
  while the ledger charged q = 1 (no amplification claimed): a site computed 0.486 where the
  run was charged 0.999, and so accepted a run above its 0.5 limit. For every aggregation mode
  and privacy unit, a whole run with the real ServerApp and ClientApp code: the epsilon each
  site reserved equals the server ledger's after the run, and the plan's, to 1e-9.
- A free secure round. In ``secure`` and ``distributed`` modes a round whose secure sum cannot
  form (fewer than 2 sampled) released nothing and charged nothing, although whether it
  formed depends on who took part; and ``min-sites`` was not applied to the survivors.
"""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from common.config import AGGREGATIONS, RunConfig
from common.dp import GaussianSumMechanism, NoiseSource, PrivacyLedger, epsilon
from common.dp.plan import plan_dpagg, plan_fedavg
from common.dp.sampling import sampling_generator
from common.models import load_pipeline
from server.app import run_dpagg
from server.dpagg_strategy import DPAggTIStrategy
from server.dpsgd_strategy import run_dpsgd_baseline
from server.lora_run import run_lora
from server.lora_strategy import DPFedAvgLoRA
from server.strategy_base import RunControl
from tests.privacy.test_declared_counts import ClientAppSites, demo_site
from tests.server.test_secagg import SHAPES as SECAGG_SHAPES
from tests.server.test_secagg import FakeGrid as SecAggGrid
from tests.server.test_secagg import Site, contribution

DELTA = 1e-5
FAST = {"ti-steps": 1, "dataset-size": 6, "sampling-rate": 0.5, "num-releases": 2,
        "rounds": 2, "local-steps": 1, "lora-batch-size": 1, "lora-rank": 1, "lora-alpha": 1.0,
        "dpsgd-rounds": 2, "dpsgd-local-steps": 1, "dpsgd-batch-size": 2, "site-dataset-size": 3,
        # the accounting, not utility: site-level DP over 2-4 sites carries no signal (common.dp.plan.signal_to_noise)
        "max-noise-to-signal": "inf"}
# name -> (run config, the server's entry point). LoRA draws its 4 sites at q = 0.9 (so a secure
# sum forms in some round but for about 1e-5 of runs: 2 of 4 sites sampled at least once); with
# DP-SGD every site takes part in every round, so that each spends the whole record-level plan.
RUNS = {
    "dpagg-ti": ({}, run_dpagg),
    "lora": ({"adapter": "lora", "num-sites": 4, "site-sampling-rate": 0.9}, run_lora),
    "dp-sgd-ti": ({"ti-method": "dp-sgd"}, run_dpsgd_baseline),
    "lora-dp-sgd": ({"adapter": "lora", "defense": "dp-sgd", "num-sites": 2, "record-target-epsilon": 4.0}, run_lora),
}
CASES = [(run, mode) for run in ("dpagg-ti", "lora") for mode in AGGREGATIONS] + [("dp-sgd-ti", "central"),
                                                                           ("lora-dp-sgd", "central")]



def run_config(name: str, mode: str, tiny_sd_path, out) -> RunConfig:
    # distributed noise shares must be secret: only "os" randomness is allowed there
    randomness = "os" if mode == "distributed" else "seeded-insecure"
    return RunConfig.from_run_config({**FAST, **RUNS[name][0], "aggregation": mode, "privacy-randomness": randomness,
                                      "model-path": str(tiny_sd_path), "device": "cpu", "output-dir": str(out)})


def policy_sites(tmp_path, cfg: RunConfig, count: int) -> dict[int, Context]:
    """``count`` sites with 3 images each and a policy that keeps a lifetime ledger: at its
    first round each reserves the run's spend as its policy recomputes it from the plan."""
    return {100 + i: Context(run_id=1, node_id=100 + i, state=RecordDict(), run_config=cfg.to_run_config(),
                             node_config={"partition-id": i, "data-path": str(demo_site(tmp_path / f"site-{i}", 3)),
                                          "policy-ledger": str(tmp_path / f"site-{i}-ledger.json")})
            for i in range(count)}


def unit_epsilons(ledger: PrivacyLedger) -> dict[str, float]:
    return {unit: ledger.epsilon(unit, "prv") for unit in ledger.units()}


def assert_sites_took_part(result: dict) -> None:
    """The sites answered with real contributions (none rejected): the run was a real one."""
    if "rounds" in result:  # LoRA: per-round logs
        assert sum(r["sites_used"] for r in result["rounds"]) > 0
        assert all(not r["rejected"] or r["rejected"][0]["node"] is None for r in result["rounds"]), result["rounds"]
    else:
        assert result["privacy"]["rejected_replies"] == [] and result["privacy"]["num_sites"] == 2


@pytest.mark.parametrize("name, mode", CASES, ids=[f"{n}-{m}" for n, m in CASES])
def test_the_epsilon_a_site_reserves_is_the_one_the_server_charges(name, mode, tiny_sd_path, tmp_path):
    cfg = run_config(name, mode, tiny_sd_path, tmp_path / "out")
    contexts = policy_sites(tmp_path, cfg, max(cfg.num_sites, 2))
    result = RUNS[name][1](ClientAppSites(contexts), cfg, tmp_path / "out", load_pipeline(tiny_sd_path, device="cpu"))
    charged = unit_epsilons(PrivacyLedger.load(tmp_path / "out" / "ledger.json"))
    assert charged and all(math.isfinite(eps) for eps in charged.values())
    told_sites = sorted(tmp_path.glob("site-*-ledger.json"))  # a site never sampled was never told
    assert told_sites
    for path in told_sites:
        told = unit_epsilons(PrivacyLedger.load(path))
        assert told.keys() == charged.keys()
        for unit in charged:
            assert told[unit] == pytest.approx(charged[unit], abs=1e-9), (f"{name} {mode} {unit}: the site reserved "
                                                                          f"{told[unit]:.6f}, the run is charged "
                                                                          f"{charged[unit]:.6f}")
    assert_sites_took_part(result)
    plan = result["privacy"].get("record_plan") or result["privacy"]["plan"]
    if name != "lora-dp-sgd":
        assert charged[min(charged)] == pytest.approx(plan["planned_epsilon_prv"], abs=1e-9)


# ---- a secure round that cannot form ------------------------------------------------------

class OneSite:
    def get_node_ids(self):
        return [1]


def test_a_secure_dpagg_release_that_cannot_form_is_charged():
    cfg = RunConfig(aggregation="secure", privacy_randomness="seeded-insecure", num_releases=1)
    plan = plan_dpagg(cfg)
    s = DPAggTIStrategy(plan=plan, mechanism=GaussianSumMechanism(clip_norm=cfg.clip_norm,
                                                                  noise_multiplier=plan.noise_multiplier),
                        noise=NoiseSource.seeded(0), ledger=PrivacyLedger(delta=DELTA), dim=4, aggregation="secure")
    assert list(s.configure_train(1, ArrayRecord(), ConfigRecord(), OneSite())) == []  # one site: no secure sum
    assert s.aggregate_train(1, []) == (None, None) and s.short and s.releases == []
    (event,) = s.ledger.events
    assert (event.noise_multiplier, event.sample_rate) == (plan.noise_multiplier, plan.sample_rate)
    assert epsilon(s.ledger.events, DELTA) == pytest.approx(plan.planned_epsilon_prv, abs=1e-9)


def lora_secure(*, declared: int, min_sites: int = 0) -> DPFedAvgLoRA:
    plan = plan_fedavg(RunConfig(adapter="lora", num_sites=declared, aggregation="secure", rounds=1,
                                 privacy_randomness="seeded-insecure"))
    return DPFedAvgLoRA(plan=plan, mechanism=GaussianSumMechanism(clip_norm=1.0, noise_multiplier=plan.noise_multiplier),
                        noise=NoiseSource.seeded(0), sampling=sampling_generator(0), ledger=PrivacyLedger(delta=DELTA),
                        initial={k: torch.zeros(s) for k, s in SECAGG_SHAPES.items()}, defense="none", private=True,
                        num_sites=declared, aggregation="secure", timeout=5.0, control=RunControl(min_sites=min_sites))


def assert_charged_not_applied(s: DPFedAvgLoRA, arrays) -> None:
    assert arrays is None and s.short and s.rounds[-1].short
    assert all(torch.count_nonzero(v) == 0 for v in s.global_state.values())  # the update was not applied
    (event,) = s.ledger.events
    assert (event.unit, event.noise_multiplier, event.sample_rate) == ("site", s.plan.noise_multiplier,
                                                                       s.plan.accounting_sample_rate)
    assert "charged, not applied" in event.label


def test_a_secure_lora_round_that_cannot_form_is_charged_not_applied():
    s = lora_secure(declared=1)
    assert list(s.configure_train(1, ArrayRecord(), ConfigRecord(), OneSite())) == []  # one site: no secure sum
    arrays, _ = s.aggregate_train(1, [])
    assert_charged_not_applied(s, arrays)


class SecAggSites(SecAggGrid):
    """Sites running the real secure-aggregation client (client/secagg.py) on fixed contributions."""

    def get_node_ids(self):
        return list(self.sites)


def test_min_sites_applies_to_the_survivors_of_a_secure_round():
    grid = SecAggSites({n: Site(n, contribution(n)) for n in (1, 2)})
    s = lora_secure(declared=2, min_sites=3)
    assert list(s.configure_train(1, ArrayRecord(), ConfigRecord(), grid)) == []
    arrays, _ = s.aggregate_train(1, [])
    assert list(s.rounds[-1].used) == [1, 2]  # the secure sum formed, with 2 survivors < min-sites 3
    assert_charged_not_applied(s, arrays)
