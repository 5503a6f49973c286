"""Red team, issue 21 finding 4: no side channel in what a site sends.

Under record-level DP "without trusting the server" the server is the adversary, and it
reads every field of every reply. Before this test existed, a DP-SGD site sent its
non-private mean training loss every round and a LoRA site its unclipped delta norm (the
default was ``site-diagnostics = true``). The attack: run each method's real server code
against two sites that answer with the real ClientApp handler
(:func:`client.app.handle_train`, on the Messages the strategy builds), keep every reply
the server receives, and enumerate every record and every key in it against an allow-list:
the privatised contribution, plus, for DP-SGD, the public parameters of the site's spend
(z, q, steps, index and the epsilon they give; ``keys.SITE_SPEND``). With the operator's
opt-in (``site-diagnostics = true``) the diagnostics appear, and privacy.json says that
the server must be trusted with them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict

from client.app import handle_train
from common import keys
from common.config import RunConfig
from common.models import load_pipeline
from tests.server.grids import PushPullGrid

SITES = (101, 102)
# DP-SGD at q = dpsgd-batch-size / site-dataset-size = 1: the one local step never draws an empty
# Poisson batch, so an opted-in loss is always there to see
LORA = {"adapter": "lora", "rounds": 1, "local-steps": 1, "lora-batch-size": 2, "dpsgd-batch-size": 12,
        "site-dataset-size": 12, "lora-rank": 2, "lora-alpha": 2.0, "num-sites": len(SITES),
        # what the sites send, not utility: site-level DP over 2 sites carries no signal (common.dp.plan.signal_to_noise)
        "max-noise-to-signal": "inf"}
ADAPTER = None  # a LoRA delta travels packed under the layout key of the server's own adapter message
RUNS = {  # name: (run config, the ArrayRecord key of a site's contribution, the diagnostics it adds when opted in)
    "dpagg-ti": ({"ti-steps": 1, "dataset-size": 24}, keys.EMBEDDING_SUM, ()),
    "lora-none": ({**LORA, "defense": "none"}, ADAPTER, (keys.DIAG_LOSS, keys.DIAG_DELTA_NORM, keys.DIAG_CLIPPED)),
    "lora-smp-lora": ({**LORA, "defense": "smp-lora"}, ADAPTER, keys.DIAGNOSTICS),
    "lora-dp-sgd": ({**LORA, "defense": "dp-sgd"}, ADAPTER, (keys.DIAG_LOSS, keys.DIAG_DELTA_NORM, keys.DIAG_CLIPPED)),
    "lora-smp-dp-sgd": ({**LORA, "defense": "smp-dp-sgd"}, ADAPTER, keys.DIAGNOSTICS),
    "lora-ffa": ({**LORA, "defense": "none", "lora-variant": "ffa"}, ADAPTER,
                 (keys.DIAG_LOSS, keys.DIAG_DELTA_NORM, keys.DIAG_CLIPPED)),
    "dp-sgd-ti": ({"ti-method": "dp-sgd", "dpsgd-rounds": 1, "dpsgd-local-steps": 1, "dpsgd-batch-size": 4,
                   "noise-multiplier": 1.0, "target-epsilon": 50.0}, keys.EMBEDDING, (keys.DIAG_LOSS,)),
}
SPENDS = {"lora-dp-sgd", "lora-smp-dp-sgd", "dp-sgd-ti"}  # the DP-SGD sites, which report the public parameters of their spend
ROUND_DIAGNOSTICS = {"adaptation_loss", "attacker_accuracy", "fraction_clipped", "delta_norm_before_clipping"}


class ClientAppGrid(PushPullGrid):
    """Sites that answer with the real ClientApp handler; every reply the server gets is kept."""

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(SITES)
        self.contexts = {node: Context(run_id=1, node_id=node, node_config={"partition-id": i}, state=RecordDict(),
                                       run_config=cfg.to_run_config()) for i, node in enumerate(SITES)}
        self.sent_to_sites: list[Message] = []
        self.replies: list[Message] = []

    def answer(self, message: Message) -> Message:
        self.sent_to_sites.append(message)
        reply = handle_train(message, self.contexts[message.metadata.dst_node_id])
        self.replies.append(reply)
        return reply


def run_method(name: str, cfg: RunConfig, grid: ClientAppGrid, out: Path) -> dict:
    """The method's real server code, as run_server calls it (without sample generation)."""
    pipe = load_pipeline(cfg.model_path, device="cpu")
    if name.startswith("lora"):
        from server.lora_run import run_lora

        return run_lora(grid, cfg, out, pipe)
    if name == "dp-sgd-ti":
        from server.dpsgd_strategy import run_dpsgd_baseline

        return run_dpsgd_baseline(grid, cfg, out, pipe)
    from server.app import run_dpagg

    return run_dpagg(grid, cfg, out, pipe)


def reply_fields(reply: Message) -> dict[str, tuple[type, frozenset[str]]]:
    """Every record of a reply: its type and all of its keys."""
    return {name: (type(record), frozenset(record.keys())) for name, record in reply.content.items()}


def allowed_fields(name: str, grid: ClientAppGrid, diagnostics: tuple[str, ...]) -> dict[str, tuple[type, frozenset[str]]]:
    """The allow-list: the contribution and, for DP-SGD, the public spend; ``diagnostics``
    only where the site opted in."""
    _, contribution, _ = RUNS[name]
    arrays = (frozenset(grid.sent_to_sites[0].content[keys.ARRAYS].keys()) if contribution is ADAPTER
              else frozenset({contribution}))
    fields = {keys.ARRAYS: (ArrayRecord, arrays)}
    metrics = (set(keys.SITE_SPEND) if name in SPENDS else set()) | set(diagnostics)
    if metrics:
        fields[keys.METRICS] = (MetricRecord, frozenset(metrics))
    return fields


def run_and_collect(tmp_path, tiny_sd_path, name: str, opt_in: bool) -> tuple[ClientAppGrid, dict]:
    overrides, _, _ = RUNS[name]
    opted = {"site-diagnostics": True} if opt_in else {}  # else the default, whatever it is
    cfg = RunConfig.from_run_config({**overrides, "model-path": str(tiny_sd_path), "output-dir": str(tmp_path), **opted})
    grid = ClientAppGrid(cfg)
    result = run_method(name, cfg, grid, tmp_path)
    assert len(grid.replies) == len(grid.sent_to_sites) == len(SITES)  # every site answered, none failed
    return grid, result


@pytest.mark.parametrize("name", list(RUNS))
def test_a_default_reply_holds_the_contribution_and_protocol_fields_only(tmp_path, tiny_sd_path, name):
    grid, result = run_and_collect(tmp_path, tiny_sd_path, name, opt_in=False)
    allowed = allowed_fields(name, grid, ())
    for reply in grid.replies:
        assert reply_fields(reply) == allowed
    assert result["privacy"]["site_diagnostics"] is False
    for summary in result.get("rounds", []):  # round_metrics.json: nothing the sites did not send
        assert not ROUND_DIAGNOSTICS & set(summary)


@pytest.mark.parametrize("name", ["lora-smp-lora", "lora-dp-sgd", "dp-sgd-ti", "dpagg-ti"])
def test_opted_in_diagnostics_appear_and_privacy_json_says_the_server_is_trusted(tmp_path,
                                                                                  tiny_sd_path, name):
    grid, result = run_and_collect(tmp_path, tiny_sd_path, name, opt_in=True)
    _, _, diagnostics = RUNS[name]
    for reply in grid.replies:
        assert reply_fields(reply) == allowed_fields(name, grid, diagnostics)
    privacy = result["privacy"]
    if not diagnostics:  # DPAgg-TI sites send their sum alone, opted in or not
        assert privacy["site_diagnostics"] is False and privacy["not_covered"] is None
        return
    assert privacy["site_diagnostics"] is True
    assert "NOT covered by the DP guarantee" in privacy["not_covered"] and "trusted" in privacy["not_covered"]
    for summary in result.get("rounds", []):
        assert ROUND_DIAGNOSTICS <= set(summary) and summary["adaptation_loss"] is not None
