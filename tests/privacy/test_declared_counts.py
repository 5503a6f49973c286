"""Red-team tests: every public quantity a release depends on is declared before the run,
never read from the data or from who connected (issue 21, findings 2 and 7a).

Attacks, each run against the real code path:

- The number of sites from the update norm (finding 2). DP-FedAvg divides the noisy sum by
  q*K (McMahan et al. 2018); when zero deltas arrive the update is pure noise of norm about
  zC*sqrt(d)/(qK), so a K taken from the connected sites shows in every release (4 vs 5
  sites: 15.97-16.60 against 12.79-13.39 over 200 releases in the issue's run). A private run
  must refuse without a declared K, use it whatever connects, and stop before any release
  when more sites connect than declared.
- A site's image count from what DP-SGD publishes (finding 7a). Opacus' convention
  q = B / n_site, with z calibrated at that q, puts n_site into the site's reply and into
  privacy.json. With the declared site size D they are B / D and z(B / D) whatever the site
  holds (Abadi et al. 2016: Poisson batches, the clipped sum divided by the expected batch
  q*D), and a site holding more than D images refuses before it spends anything.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

import client.dpsgd_lora
from client.app import handle_train
from client.dpsgd_lora import dpsgd_lora_round
from client.site_accountant import load_history
from common import keys
from common.config import RunConfig
from common.data import SiteImages
from common.dp import GaussianSumMechanism, NoiseSource, PrivacyLedger
from common.dp.dpsgd import DeclaredSizeExceeded
from common.dp.plan import plan_dpsgd, plan_fedavg
from common.dp.sampling import sampling_generator
from common.lora import LoRASpec, attach_lora
from common.models import load_pipeline
from common.paths import REPO_ROOT
from server.dpsgd_strategy import run_dpsgd_baseline
from server.lora_strategy import DPFedAvgLoRA
from server.strategy_base import reliability_report
from tests.server.grids import PushPullGrid
from tests.server.test_lora_strategy import reply

SHAPES = {"unet.up.lora_A.weight": (64, 32), "unet.up.lora_B.weight": (32, 64)}  # d = 4096: norms concentrate
RELEASES = 200
SPEC = LoRASpec(rank=2, alpha=2.0)


# ---- K from the update norm ---------------------------------------------------------------

class ZeroDeltaSites(PushPullGrid):
    """``n`` connected sites; each answers with a zero delta, so only the noise moves the adapter."""

    def __init__(self, n: int) -> None:
        super().__init__(range(1, n + 1))

    def answer(self, message: Message) -> Message:
        return reply({k: torch.zeros(s, dtype=torch.float64) for k, s in SHAPES.items()}, message.metadata.dst_node_id)


def lora_config(declared: int, **extra) -> RunConfig:
    return RunConfig.from_run_config({"adapter": "lora", "num-sites": declared, "rounds": RELEASES,
                                      "noise-multiplier": 2.0, "target-epsilon": 1e4, "lora-clip-norm": 0.1,
                                      "privacy-randomness": "seeded-insecure", **extra})


def lora_strategy(cfg: RunConfig) -> DPFedAvgLoRA:
    """The run's DP-FedAvg strategy as ``server.lora_run`` builds it, with seeded noise (the
    same draws for both runs compared) and no budget to stop it."""
    plan = plan_fedavg(cfg)
    return DPFedAvgLoRA(plan=plan, mechanism=GaussianSumMechanism(clip_norm=cfg.lora_clip_norm,
                                                                  noise_multiplier=plan.noise_multiplier),
                        noise=NoiseSource.seeded(7), sampling=sampling_generator(8), ledger=PrivacyLedger(delta=1e-5),
                        initial={k: torch.zeros(s) for k, s in SHAPES.items()}, defense="none", private=cfg.private,
                        num_sites=cfg.num_sites)


def update_norms(cfg: RunConfig, connected: int) -> list[float]:
    strategy = lora_strategy(cfg)
    strategy.start(grid=ZeroDeltaSites(connected), initial_arrays=strategy.current_arrays(), num_rounds=cfg.rounds,
                   timeout=5.0, train_config=ConfigRecord())
    assert strategy.stopped is None and len(strategy.ledger.events) == cfg.rounds
    return [r.update_norm for r in strategy.rounds]


def test_a_private_lora_run_refuses_to_start_without_a_declared_k():
    with pytest.raises(ValueError, match="num-sites"):
        RunConfig.from_run_config({"adapter": "lora", "target-epsilon": 1.0})
    cfg = lora_config(1)
    with pytest.raises(ValueError, match="declared public number of sites K"):
        DPFedAvgLoRA(plan=plan_fedavg(cfg), mechanism=GaussianSumMechanism(clip_norm=0.1, noise_multiplier=2.0),
                     noise=NoiseSource.seeded(0), sampling=sampling_generator(0), ledger=PrivacyLedger(delta=1e-5),
                     initial={k: torch.zeros(s) for k, s in SHAPES.items()}, defense="none", private=True, num_sites=0)


def test_the_update_norm_cannot_tell_k_from_k_plus_one_connected_sites():
    """K = 5 declared; 4 or 5 sites connect and send zero deltas for 200 releases. The norm
    distributions coincide (with the same noise draws, release for release), centred on
    zC*sqrt(d)/(qK) of the DECLARED K."""
    cfg = lora_config(5)
    four, five = update_norms(cfg, 4), update_norms(cfg, 5)
    assert four == five, (f"K=4 connected: {min(four):.2f}-{max(four):.2f}, "
                          f"K=5 connected: {min(five):.2f}-{max(five):.2f}")
    d = sum(math.prod(s) for s in SHAPES.values())
    expected = 2.0 * 0.1 * math.sqrt(d) / (1.0 * 5)
    assert abs(sum(five) / len(five) / expected - 1) < 0.02


def test_more_connected_sites_than_declared_stop_the_run_before_any_release():
    strategy = lora_strategy(lora_config(4, rounds=3))
    grid = ZeroDeltaSites(5)
    strategy.start(grid=grid, initial_arrays=strategy.current_arrays(), num_rounds=3, timeout=5.0,
                   train_config=ConfigRecord())
    assert strategy.ledger.events == [] and strategy.rounds == [] and grid.sent == []
    assert all(torch.count_nonzero(v) == 0 for v in strategy.global_state.values())  # the initial adapter
    stopped = reliability_report(strategy)["stopped_early"]  # what privacy.json says
    assert "5 sites are connected but num-sites declares 4" in stopped and "before any release" in stopped


# ---- a site's image count from its DP-SGD --------------------------------------------------

def demo_site(folder, count: int):
    """A site folder with the first ``count`` images of data/demo/site-0 (and their captions)."""
    source = REPO_ROOT / "data/demo/site-0"
    names = sorted(p.name for p in source.glob("*.png"))[:count]
    folder.mkdir(parents=True)
    for name in names:
        shutil.copyfile(source / name, folder / name)
    captions = json.loads((source / "captions.json").read_text())
    (folder / "captions.json").write_text(json.dumps({n: captions[n] for n in names if n in captions}))
    return folder


class ClientAppSites(PushPullGrid):
    """Sites answering with the real ClientApp code (``client.app.handle_train``)."""

    def __init__(self, contexts: dict[int, Context]) -> None:
        super().__init__(contexts)
        self.contexts = contexts

    def answer(self, message: Message) -> Message:
        return handle_train(message, self.contexts[message.metadata.dst_node_id])


def test_dpsgd_baseline_replies_and_privacy_json_do_not_reveal_a_sites_image_count(tiny_sd_path, tmp_path):
    """Site 0 holds 6 images, site 1 holds 9; the declared site size is 12. Both report the
    same q = 4/12 and the same z, the server's plan, and privacy.json shows nothing else."""
    cfg = RunConfig(ti_method="dp-sgd", model_path=str(tiny_sd_path), device="cpu", target_epsilon=8.0,
                    dpsgd_rounds=1, dpsgd_local_steps=1, dpsgd_batch_size=4, site_dataset_size=12,
                    output_dir=str(tmp_path / "out"))
    contexts = {100 + i: Context(run_id=1, node_id=100 + i, state=RecordDict(), run_config=cfg.to_run_config(),
                                 node_config={"partition-id": i, "data-path": str(demo_site(tmp_path / f"s{i}", n))})
                for i, n in enumerate((6, 9))}
    result = run_dpsgd_baseline(ClientAppSites(contexts), cfg, tmp_path / "out", load_pipeline(tiny_sd_path, device="cpu"))
    privacy, plan = result["privacy"], plan_dpsgd(cfg)
    assert privacy["rejected_replies"] == [] and privacy["sites_per_release"] == [2]
    assert privacy["site_sample_rates"] == {"site-0": 4 / 12, "site-1": 4 / 12} == {
        "site-0": plan.sample_rate, "site-1": plan.sample_rate}
    assert privacy["site_noise_multipliers"]["site-0"] == privacy["site_noise_multipliers"]["site-1"] == plan.noise_multiplier
    assert (privacy["sample_rate"], privacy["noise_multiplier"], privacy["denominator"]) == (4 / 12, plan.noise_multiplier, 4.0)
    assert 0.95 * 8.0 < privacy["epsilon"]["prv"] <= 8.0  # calibrated for the run at the declared q


@pytest.fixture(scope="module")
def lora_pipe(tiny_sd_path):
    p = load_pipeline(tiny_sd_path, device="cpu")
    attach_lora(p, SPEC, seed=0)
    return p


def random_images(n: int) -> SiteImages:
    pixels = torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(n)) * 2 - 1
    return SiteImages(tuple(f"{i}.png" for i in range(n)), pixels, tuple([None] * n), "site-x")


def dpsgd_lora_config(**extra) -> RunConfig:
    return RunConfig.from_run_config({"adapter": "lora", "defense": "dp-sgd", "num-sites": 2, "site-dataset-size": 12,
                                      "rounds": 2, "local-steps": 1, "dpsgd-batch-size": 4, "lora-rank": 2,
                                      "lora-alpha": 2.0, "target-epsilon": 8.0, **extra})


def test_lora_dpsgd_reply_and_denominator_do_not_depend_on_the_sites_image_count(lora_pipe, monkeypatch):
    expected_batches = []
    real = client.dpsgd_lora.NoiseSourceDPOptimizer

    def recording(*args, **kwargs):
        expected_batches.append(kwargs["expected_batch_size"])
        return real(*args, **kwargs)

    monkeypatch.setattr(client.dpsgd_lora, "NoiseSourceDPOptimizer", recording)
    cfg = dpsgd_lora_config()
    replies = [dpsgd_lora_round(lora_pipe, SPEC, random_images(n), cfg, state=RecordDict(), site_index=0, round_index=1)
               for n in (6, 9)]
    public = [(r[keys.SITE_SAMPLE_RATE], r[keys.SITE_NOISE_MULTIPLIER], r[keys.SITE_STEPS], r[keys.SITE_EPSILON])
              for r in replies]
    plan = plan_dpsgd(cfg)
    assert public[0] == public[1] and public[0][:2] == (plan.sample_rate, plan.noise_multiplier) == (4 / 12, public[1][1])
    assert expected_batches == [4.0, 4.0] == [plan.expected_batch_size] * 2  # q*D, never a count of the images


def test_a_site_holding_more_images_than_declared_refuses_every_round_before_spending(lora_pipe):
    state = RecordDict()
    for round_index in (1, 2):
        with pytest.raises(DeclaredSizeExceeded, match="site 1: holds more images than the declared site-dataset-size"):
            dpsgd_lora_round(lora_pipe, SPEC, random_images(13), dpsgd_lora_config(), state=state, site_index=1,
                             round_index=round_index)
    assert load_history(state) == []  # nothing spent
