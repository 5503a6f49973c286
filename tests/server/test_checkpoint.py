"""Tests of server/checkpoint.py and the round loop's reliability seams (server/strategy_base.py):
resume bit-identical to an uninterrupted run, a crash between a release and its checkpoint,
refused checkpoints, the budget stop, and short rounds (skip / retry)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message

from common import keys
from common.dp import GaussianSumMechanism, PrivacyEvent, PrivacyLedger, epsilon
from common.dp.noise import privacy_noise
from common.dp.plan import DPAggPlan, FedAvgPlan
from common.dp.sampling import privacy_sampling
from common.wire import record_tree
from server.checkpoint import CHECKPOINT_FILE, CheckpointError, CheckpointStore, config_fingerprint
from server.dpagg_strategy import DPAggTIStrategy
from server.lora_strategy import DPFedAvgLoRA
from server.strategy_base import RunControl
from tests.server.grids import PushPullGrid
from tests.server.test_dpagg_strategy import reply_with
from tests.server.test_lora_strategy import SHAPES, reply, zeros

DELTA = 1e-5
PLAN = {"noise_multiplier": 1.5, "sample_rate": 0.7}


class ReplyingGrid(PushPullGrid):
    """Sites 1..n answer every train message with a delta that depends on the adapter they got
    (so a wrong resumed adapter shows), except the ``silent`` ones and any in ``bad``."""

    def __init__(self, n: int = 4, silent: tuple[int, ...] = (), bad: tuple[int, ...] = ()) -> None:
        super().__init__(range(1, n + 1))
        self.silent, self.bad = set(silent), set(bad)
        self.asked: list[list[int]] = []

    def push_messages(self, messages):
        messages = list(messages)
        self.asked.append([m.metadata.dst_node_id for m in messages])
        return super().push_messages(messages)

    def answer(self, m: Message) -> Message | None:
        node = m.metadata.dst_node_id
        if node in self.silent:
            return None
        state = record_tree(m.content[keys.ARRAYS], SHAPES)  # packed, in the strategy's key order
        delta = {k: 0.05 * node * torch.ones(s, dtype=torch.float64) - 0.5 * state[k].double()
                 for k, s in SHAPES.items()}
        if node in self.bad:
            delta = {k: v * np.nan for k, v in delta.items()}
        return reply(delta, node)


def strategy(out, *, control_kw=None, fingerprint="f", z=PLAN["noise_multiplier"], q=PLAN["sample_rate"], resume="auto",
             randomness="seeded-insecure"):
    """A LoRA strategy; ``randomness`` as the run-config key privacy-randomness (seeded: bit-identical resumes)."""
    plan = FedAvgPlan(noise_multiplier=z, sample_rate=q, rounds=3, planned_epsilon_prv=0.0, planned_epsilon_rdp=0.0)
    store = CheckpointStore(out, fingerprint=fingerprint, plan={"noise_multiplier": z, "sample_rate": q}, resume=resume)
    control = RunControl(checkpoint=store, delta=DELTA, unit="site", **(control_kw or {}))
    return DPFedAvgLoRA(plan=plan, mechanism=GaussianSumMechanism(clip_norm=1.0, noise_multiplier=z),
                        noise=privacy_noise(randomness == "os", 11, "server-noise"),
                        sampling=privacy_sampling(randomness == "os", 12, "site-sampling"),
                        ledger=PrivacyLedger(delta=DELTA), initial=zeros(), defense="none", private=True,
                        num_sites=4, ledger_path=out / "ledger.json", control=control)


def run(s, rounds, grid=None):
    return s.start(grid=grid or ReplyingGrid(), initial_arrays=s.current_arrays(), num_rounds=rounds, timeout=1.0,
                   train_config=ConfigRecord())


def assert_same_run(a, b):
    for k in a.global_state:
        assert torch.equal(a.global_state[k], b.global_state[k]), k
    assert a.ledger.events == b.ledger.events
    assert [r.summary() for r in a.rounds] == [r.summary() for r in b.rounds]


def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(tmp_path):
    whole = strategy(tmp_path / "whole")
    run(whole, 3)
    first = strategy(tmp_path / "split")
    run(first, 2)
    assert len(first.ledger.events) == 2 and (tmp_path / "split" / CHECKPOINT_FILE).exists()
    resumed = strategy(tmp_path / "split")  # a fresh process: nothing but the output folder
    grid = ReplyingGrid()
    run(resumed, 3, grid)
    assert resumed.resumed_from == 2 and len(grid.asked) == 1  # only round 3 was run again
    assert_same_run(whole, resumed)
    assert PrivacyLedger.load(tmp_path / "split" / "ledger.json").events == whole.ledger.events


def test_a_crash_after_a_release_before_its_checkpoint_counts_the_round_once(tmp_path):
    whole = strategy(tmp_path / "whole")
    run(whole, 3)
    crashing = strategy(tmp_path / "crash")
    crash_after_release(crashing, 3, snapshot=lambda: None)
    with pytest.raises(KeyboardInterrupt):
        run(crashing, 3)
    assert len(PrivacyLedger.load(tmp_path / "crash" / "ledger.json").events) == 3  # saved at the release
    resumed = strategy(tmp_path / "crash")
    run(resumed, 3)
    assert len(resumed.ledger.events) == 3  # not 4: the redone round replaced the unpublished one
    assert_same_run(whole, resumed)


def test_a_finished_run_resumed_runs_no_round(tmp_path):
    s = strategy(tmp_path)
    run(s, 2)
    again = strategy(tmp_path)
    grid = ReplyingGrid()
    run(again, 2, grid)
    assert grid.asked == [] and again.ledger.events == s.ledger.events


def test_checkpoints_of_another_run_are_refused(tmp_path):
    run(strategy(tmp_path), 1)
    with pytest.raises(CheckpointError, match="another config"):
        run(strategy(tmp_path, fingerprint="other"), 2)
    with pytest.raises(CheckpointError, match="noise-multiplier to 1.5"):
        run(strategy(tmp_path, z=2.0), 2)
    with pytest.raises(CheckpointError, match="resume = 'never'"):
        run(strategy(tmp_path, resume="never"), 2)
    (tmp_path / CHECKPOINT_FILE).write_bytes((tmp_path / CHECKPOINT_FILE).read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cannot read"):
        run(strategy(tmp_path), 2)


def test_the_fingerprint_ignores_only_keys_that_do_not_change_the_rounds():
    base = {"rounds": 3, "seed": 0, "output-dir": "a", "lora-clip-norm": 0.1}
    assert config_fingerprint(base) == config_fingerprint({**base, "rounds": 5, "output-dir": "b"})
    assert config_fingerprint(base) != config_fingerprint({**base, "seed": 1})
    assert config_fingerprint(base) != config_fingerprint({**base, "lora-clip-norm": 0.2})
    # the sites calibrate their own DP-SGD for dpsgd-rounds: it decides what they spend
    assert config_fingerprint({**base, "dpsgd-rounds": 3}) != config_fingerprint({**base, "dpsgd-rounds": 4})
    # the signal-to-noise threshold only gates the start (checked again on resume); a checkpoint
    # written before the key existed keeps its fingerprint
    assert config_fingerprint(base) == config_fingerprint({**base, "max-noise-to-signal": "inf"})


def crash_after_release(s, crash_round: int, snapshot) -> list:
    """Make ``s`` die after computing and recording round ``crash_round``'s release, before its
    checkpoint; return the list that receives ``snapshot()`` of the lost release."""
    lost: list = []
    original_end = s.end_round

    def end_round(server_round, arrays):
        if server_round == crash_round:
            lost.append(snapshot())
            raise KeyboardInterrupt(f"killed after the release of round {crash_round}, before its checkpoint")
        original_end(server_round, arrays)

    s.end_round = end_round
    return lost


def test_os_randomness_redoes_a_lost_round_with_fresh_noise_and_counts_it_once(tmp_path):
    crashing = strategy(tmp_path, randomness="os")
    lost = crash_after_release(crashing, 3, snapshot=lambda: {k: v.clone() for k, v in crashing.global_state.items()})
    with pytest.raises(KeyboardInterrupt):
        run(crashing, 3)
    after_two = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
    assert after_two["completed_round"] == 2
    # nothing in the checkpoint could replay the noise or the site sample: no generator state at all
    assert after_two["strategy"]["noise"] is None and after_two["strategy"]["sampling"] is None
    assert len(PrivacyLedger.load(tmp_path / "ledger.json").events) == 3  # the lost release was recorded...
    resumed = strategy(tmp_path, randomness="os")
    grid = ReplyingGrid()
    run(resumed, 3, grid)
    assert resumed.resumed_from == 2 and len(grid.asked) == 1  # only round 3 was redone
    # ...and is not counted: it never left the crashed process, so only the redone release is charged
    labels = [e.label for e in resumed.ledger.events]
    assert labels == [f"dp-fedavg lora round {r}" for r in (1, 2, 3)]
    assert PrivacyLedger.load(tmp_path / "ledger.json").events == resumed.ledger.events
    # the redone round drew fresh noise: its release differs from the lost one by noise of the plan's scale
    (lost_state,) = lost
    gap = math.sqrt(sum(float(((resumed.global_state[k] - lost_state[k]).double() ** 2).sum()) for k in lost_state))
    dim = sum(v.numel() for v in lost_state.values())
    noise_of_mean = PLAN["noise_multiplier"] * 1.0 * math.sqrt(dim) / resumed.denominator  # z*C*sqrt(d)/(qK)
    # sqrt(2) x noise_of_mean is expected; under 0.1 x has probability P(chi2_12 < 0.06) ~ 1e-12
    assert gap > 0.1 * noise_of_mean


def test_os_randomness_dpagg_redoes_a_lost_release_with_fresh_noise(tmp_path):
    crashing = dpagg(tmp_path, randomness="os")
    lost = crash_after_release(crashing, 2, snapshot=lambda: crashing.releases[-1].clone())
    with pytest.raises(KeyboardInterrupt):
        crashing.start(grid=SumGrid(), initial_arrays=ArrayRecord(), num_rounds=3, timeout=1.0)
    assert torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)["strategy"]["noise"] is None
    first = crashing.releases[0].clone()
    resumed = dpagg(tmp_path, randomness="os")
    resumed.start(grid=SumGrid(), initial_arrays=ArrayRecord(), num_rounds=3, timeout=1.0)
    assert resumed.resumed_from == 1 and len(resumed.releases) == 3
    assert torch.equal(resumed.releases[0], first)  # the checkpointed release is kept as it was
    assert [e.label for e in resumed.ledger.events] == [f"dpagg-ti release {r}" for r in (1, 2, 3)]
    # fresh noise: the redone release 2 is the lost one's sum plus independent N(0, (zC)^2) / denominator
    noise_of_release = 2.0 * 1.0 * math.sqrt(4) / 5.0  # z*C*sqrt(d)/denominator
    # sqrt(2) x that is expected; under 0.01 x has probability P(chi2_4 < 2e-4) ~ 5e-9
    assert float(torch.linalg.vector_norm(resumed.releases[1] - lost[0])) > 0.01 * noise_of_release


def test_the_run_stops_before_the_release_that_would_pass_the_target(tmp_path):
    event = PrivacyEvent(noise_multiplier=PLAN["noise_multiplier"], sample_rate=1.0, unit="site")
    # q = 1 and RDP only to keep the test fast (runs check with PRV, the accountant the plan uses)
    two = epsilon([event] * 2, DELTA, "rdp")
    three = epsilon([event] * 3, DELTA, "rdp")
    target = (two + three) / 2
    s = strategy(tmp_path, control_kw={"target_epsilon": target, "accountant": "rdp"}, q=1.0)
    result = run(s, 5)
    assert len(s.ledger.events) == 2 and s.stopped is not None
    assert "round 3: stopping before it spends" in s.stopped and f"{three:.4f} (RDP" in s.stopped
    assert s.ledger.epsilon("site", "rdp") <= target
    # what was released so far is still there to export, and the checkpoint holds round 2
    assert result.arrays is not None and len(s.rounds) == 2
    assert torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)["completed_round"] == 2
    # resuming with more rounds than the budget allows stops again, spending nothing
    again = strategy(tmp_path, control_kw={"target_epsilon": target, "accountant": "rdp"}, q=1.0)
    run(again, 5)
    assert len(again.ledger.events) == 2 and "round 3" in again.stopped


def test_a_short_round_is_charged_and_not_applied(tmp_path):
    s = strategy(tmp_path, control_kw={"min_sites": 3}, q=1.0)
    grid = ReplyingGrid(silent=(1, 2))  # sites 3 and 4 answer: 2 < 3
    run(s, 1, grid)
    assert all(torch.equal(v, torch.zeros(SHAPES[k])) for k, v in s.global_state.items())
    (event,) = s.ledger.events
    assert "short" in event.label and event.noise_multiplier == PLAN["noise_multiplier"]
    assert s.rounds[0].short and s.round_summaries()[0]["short_round_not_applied"]


def test_a_retried_round_charges_every_attempt_within_the_allowance(tmp_path):
    s = strategy(tmp_path, control_kw={"min_sites": 2, "short_round": "retry", "max_retries": 2})
    grid = ReplyingGrid(bad=(1, 2, 3))  # only site 4 is ever valid: every attempt is short
    run(s, 2, grid)
    assert s.retries_used == 2 and len(grid.asked) == 4  # round 1: 3 attempts, round 2: 1 (allowance spent)
    assert len(s.ledger.events) == 4 and all("short" in e.label for e in s.ledger.events)
    assert [r.round for r in s.rounds] == [1, 1, 1, 2]


def test_sites_that_fail_or_stay_silent_do_not_fail_the_run(tmp_path):
    s = strategy(tmp_path, q=1.0)
    run(s, 2, ReplyingGrid(silent=(2,), bad=(3,)))
    assert len(s.ledger.events) == 2  # the noise and denominator are the plan's whoever answered
    for entry in s.rounds:
        assert sorted(entry.used) == [1, 4] and entry.rejected[0]["node"] == 3
    assert s.denominator == pytest.approx(1.0 * 4)
    assert not math.isnan(s.rounds[-1].expected_noise_norm)


def test_unrequested_replies_are_ignored(tmp_path):
    s = strategy(tmp_path, q=1.0)
    list(s.configure_train(1, ArrayRecord(), ConfigRecord(), ReplyingGrid(n=2)))
    delta = {k: torch.full(v, 0.1) for k, v in SHAPES.items()}
    replies: list[Message] = [reply(delta, 9), reply(delta, 1), reply(delta, 1)]
    s.aggregate_train(1, replies)
    assert s.rounds[0].ignored == [9, 1] and list(s.rounds[0].used) == [1]  # unrequested, then a second answer


class SumGrid(PushPullGrid):
    """DPAgg-TI sites: node k returns the sum k * 0.1 * ones(4); the ``bad`` ones send NaN."""

    def __init__(self, n: int = 3, bad: tuple[int, ...] = ()) -> None:
        super().__init__(range(1, n + 1))
        self.bad = set(bad)

    def answer(self, m: Message) -> Message:
        n = m.metadata.dst_node_id
        return reply_with([math.nan if n in self.bad else 0.1 * n] * 4, node_id=n)


def dpagg(out, z=2.0, randomness="seeded-insecure", **control_kw):
    plan = DPAggPlan(noise_multiplier=z, sample_rate=0.5, releases=3, denominator=5.0,
                     planned_epsilon_prv=0.0, planned_epsilon_rdp=0.0)
    store = CheckpointStore(out, fingerprint="f", plan={"noise_multiplier": z, "sample_rate": 0.5})
    return DPAggTIStrategy(plan=plan, mechanism=GaussianSumMechanism(clip_norm=1.0, noise_multiplier=z),
                           noise=privacy_noise(randomness == "os", 3, "server-noise"),
                           ledger=PrivacyLedger(delta=DELTA), dim=4,
                           ledger_path=out / "ledger.json", max_site_norm=10.0,
                           control=RunControl(checkpoint=store, delta=DELTA, unit="record", **control_kw))


def test_dpagg_resumed_releases_are_bit_identical(tmp_path):
    whole = dpagg(tmp_path / "whole")
    whole.start(grid=SumGrid(), initial_arrays=ArrayRecord(), num_rounds=3, timeout=1.0)
    first = dpagg(tmp_path / "split")
    first.start(grid=SumGrid(), initial_arrays=ArrayRecord(), num_rounds=1, timeout=1.0)
    resumed = dpagg(tmp_path / "split")
    resumed.start(grid=SumGrid(), initial_arrays=ArrayRecord(), num_rounds=3, timeout=1.0)
    assert resumed.resumed_from == 1
    assert all(torch.equal(a, b) for a, b in zip(whole.releases, resumed.releases, strict=True))
    assert torch.equal(whole.mean_release(), resumed.mean_release())
    assert whole.ledger.events == resumed.ledger.events and whole.contributors == resumed.contributors


def test_dpagg_release_without_a_valid_site_is_charged_not_released(tmp_path):
    s = dpagg(tmp_path)
    assert s.aggregate_train(1, SumGrid(bad=(1, 2, 3)).send_and_receive(
        list(s.configure_train(1, ArrayRecord(), ConfigRecord(), SumGrid())), 1.0)) == (None, None)
    (event,) = s.ledger.events
    assert "short" in event.label and event.unit == "record" and not s.releases and s.short


def test_dpagg_ignores_unrequested_and_second_replies(tmp_path):
    s = dpagg(tmp_path, z=0.0)
    list(s.configure_train(1, ArrayRecord(), ConfigRecord(), SumGrid(n=2)))
    arrays, _ = s.aggregate_train(1, [reply_with([1.0] * 4, node_id=1), reply_with([1.0] * 4, node_id=1),
                                      reply_with([1.0] * 4, node_id=9)])
    np.testing.assert_allclose(arrays[keys.EMBEDDING].numpy(), np.full(4, 1.0 / 5.0))
    assert [r["node"] for r in s.rejected] == [1, 9] and [list(c) for c in s.contributors] == [[1]]


@pytest.mark.parametrize("aggregation, charged", [("central", False), ("secure", False), ("distributed", True)])
def test_a_lost_release_stays_charged_only_where_an_untrusted_server_saw_it(tmp_path, aggregation, charged):
    """Noise added by the server: the lost release never left the crashed process (not counted).
    Noise added by the sites (distributed shares): the server, which the guarantee does not
    trust, saw the noised sum before the crash, so the redone round is a second release."""
    crashing = dpagg(tmp_path, randomness="os")
    crash_after_release(crashing, 2, snapshot=lambda: None)
    with pytest.raises(KeyboardInterrupt):
        crashing.start(grid=SumGrid(), initial_arrays=ArrayRecord(), num_rounds=3, timeout=1.0)
    assert len(PrivacyLedger.load(tmp_path / "ledger.json").events) == 2  # release 2 recorded, not checkpointed
    resumed = dpagg(tmp_path, randomness="os")
    resumed.aggregation = aggregation  # only the restore rule is exercised here
    assert resumed.restore() == 1
    labels = [e.label for e in resumed.ledger.events]
    assert labels[0] == "dpagg-ti release 1"
    assert labels[1:] == (["dpagg-ti release 2 (lost in a crash, seen by an untrusted server: charged)"] if charged else [])
    assert PrivacyLedger.load(tmp_path / "ledger.json").events == resumed.ledger.events
