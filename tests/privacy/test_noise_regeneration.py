"""Red team, issue 21 finding 1: regenerate the privacy noise from what a run publishes.

The attacker holds a run's output folder (privacy.json, the model card, metrics, ledger,
checkpoint, the adapter) and its run config, and knows the public base model. Under the old
default the server's noise was ``NoiseSource.seeded(derive_seed(run seed, "server-noise"))``,
privacy.json printed that seed and run_config.json held the run seed: the attacker regenerated
the noise, subtracted it from the release and recovered the exact clipped sum (error ~1e-16);
in ``distributed`` mode the server rebuilt every site's noise share the same way.

Each test runs the attack on the real path: :func:`server.app.run_server` with in-process sites
that answer through :func:`client.app.handle_train` (only the site's TI training is replaced by
a sum the test chooses, so the true clipped sum is known). It tries every integer found in
any output file and in the run config, raw and through :func:`common.paths.derive_seed` with
every label the code uses (and every site and round), and passes only if the attack fails:
the best recovered sum stays at least half the noise's expected norm z*C*sqrt(d) away from
the true sum. For d = 32 and even ~10^5 tries, an honest miss below that has probability
~5e-5 (P(chi2_32 < 4) ~ 5e-10 per try).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

import client.app
import client.secagg
from client.app import handle_train
from common import keys
from common.config import RunConfig, pyproject_run_config
from common.dp.noise import NoiseSource
from common.models import load_pipeline
from common.paths import REPO_ROOT, derive_seed, resolve
from common.reasons import SITE_REFUSALS, SiteRefusal
from common.secagg import protocol as P
from common.settings import ti_settings
from common.textual_inversion import EMBEDS_FILE, initializer_vector, load_embedding
from server.app import run_server
from server.checkpoint import CHECKPOINT_FILE
from tests.server.grids import PushPullGrid

# Every label the code passes to derive_seed (test_the_labels_cover_the_code keeps this complete).
LABELS = ("server-noise", "site-sampling", "secagg-noise", "sample", "train", "lora-init", "lora-train",
          "member-split", "dpsgd", "dpsgd-sample", "dpsgd-train", "lora-dpsgd", "lora-dpsgd-sample",
          "lora-dpsgd-train")
NUM_SITES = 3
ROUNDS = (0, 1, 2)  # round / release ids a label may be derived with (a default run has one release, id 1)


# ---- the run under attack ---------------------------------------------------------------

class SiteAppGrid(PushPullGrid):
    """Sites that answer every message through the real ClientApp handler (policy, secure
    aggregation, noise shares), each with its own Context; node ids 101.. hold partitions 0.."""

    def __init__(self, run_config: dict[str, Any]) -> None:
        super().__init__(range(101, 101 + NUM_SITES))
        self.contexts = {node: Context(run_id=1, node_id=node, node_config={"partition-id": node - 101},
                                       state=RecordDict(), run_config=dict(run_config)) for node in self.node_ids}

    def answer(self, message: Message) -> Message:
        return handle_train(message, self.contexts[message.metadata.dst_node_id])


def site_sums(dim: int, clip_norm: float) -> list[torch.Tensor]:
    """What each site sends: a sum of a few bounded embeddings (norm 3C, within the N*C bound)."""
    gen = torch.Generator().manual_seed(2024)
    sums = [torch.randn(dim, generator=gen, dtype=torch.float64) for _ in range(NUM_SITES)]
    return [s * (3 * clip_norm / float(torch.linalg.vector_norm(s))) for s in sums]


def run_default(tmp_path: Path, model: Path, monkeypatch, **overrides) -> tuple[Path, dict, torch.Tensor]:
    """A run with the project's default config (pyproject.toml) plus ``overrides``; returns its
    output folder, its run config and the true clipped sum over the sites."""
    config = {**pyproject_run_config(), "model-path": str(model), "output-dir": str(tmp_path / "out"),
              "sample-steps": 1, "sample-prompts": "an emoji of a cat", **overrides}
    cfg = RunConfig.from_run_config(config)
    dim = initializer_vector(load_pipeline(str(model), device="cpu"), ti_settings(cfg)).numel()
    sums = site_sums(dim, cfg.clip_norm)
    # the sites' TI training is replaced by the chosen sums; everything else is the real ClientApp
    monkeypatch.setattr(client.app, "dpagg_contribution", lambda msg, cfg, index, name, folder: sums[index].clone())
    run_server(SiteAppGrid(config), cfg)
    return resolve(cfg.output_dir), config, torch.stack(sums).sum(0)


# ---- what the attacker gathers from the outputs -----------------------------------------

def integers_in(value: Any) -> set[int]:
    """Every integer in a JSON-like value: numbers, integral floats, and digit runs in strings."""
    if isinstance(value, bool):
        return set()
    if isinstance(value, int):
        return {value}
    if isinstance(value, float):
        return {int(value)} if math.isfinite(value) and value.is_integer() else set()
    if isinstance(value, str):
        return {int(m) for m in re.findall(r"\d+", value)}
    if isinstance(value, dict):
        return set().union(*(integers_in(k) | integers_in(v) for k, v in value.items())) if value else set()
    if isinstance(value, (list, tuple)):
        return set().union(*(integers_in(v) for v in value)) if value else set()
    return set()  # tensors (adapter weights, a generator's state bytes) carry no seed to read


def candidate_seeds(out: Path, run_config: dict) -> set[int]:
    """Every integer that could be a seed: in every output file and in the run config."""
    found = integers_in(run_config)
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        if path.suffix == ".json":
            found |= integers_in(json.loads(path.read_text()))
        elif path.suffix in (".md", ".txt", ".log", ".csv"):
            found |= integers_in(path.read_text())
        elif path.name == CHECKPOINT_FILE:
            found |= integers_in(torch.load(path, weights_only=True))
    return found


def derived_seeds(candidate: int) -> Iterator[int]:
    """The candidate itself and every seed the code could derive from it."""
    yield candidate
    for label in LABELS:
        yield derive_seed(candidate, label)
        for site in range(NUM_SITES):
            yield derive_seed(candidate, label, site)
            for r in ROUNDS:
                yield derive_seed(candidate, label, site, r)


def noisy_sums(out: Path, model: Path, run_config: dict) -> list[torch.Tensor]:
    """The released noisy sum, read back as an attacker would: from the published embedding
    (minus the public initializer, times the public denominator) and, more precisely, from the
    float64 release in the checkpoint."""
    privacy = json.loads((out / "privacy.json").read_text())
    cfg = RunConfig.from_run_config(run_config)
    init = initializer_vector(load_pipeline(str(model), device="cpu"), ti_settings(cfg)).double()
    _, published = load_embedding(out / EMBEDS_FILE)
    sums = [(published.double() - (init if privacy["centered"] else 0)) * privacy["denominator"]]
    if (out / CHECKPOINT_FILE).exists():
        sums += [r.double() * privacy["denominator"] for r in torch.load(out / CHECKPOINT_FILE, weights_only=True)
                 ["strategy"]["releases"]]
    return sums


def best_recovery_error(noisy: list[torch.Tensor], true_sum: torch.Tensor, std: float, seeds: set[int]) -> float:
    """The smallest ||noisy - regenerated noise - true sum|| over every seed (and no subtraction)."""
    best = min(float(torch.linalg.vector_norm(n - true_sum)) for n in noisy)
    for seed in seeds:
        regenerated = NoiseSource.seeded(seed).normal(true_sum.shape, std)
        best = min(best, *(float(torch.linalg.vector_norm(n - regenerated - true_sum)) for n in noisy))
    return best


# ---- the attacks --------------------------------------------------------------------------

def attack_central(out: Path, run_config: dict, true_sum: torch.Tensor, model: Path) -> tuple[float, float]:
    """Regenerate the server's noise from every seed candidate; return the best recovered
    error and the expected noise norm z*C*sqrt(d) of the sum."""
    privacy = json.loads((out / "privacy.json").read_text())
    std = privacy["noise_multiplier"] * privacy["clip_norm"]
    seeds = {s for c in candidate_seeds(out, run_config) for s in derived_seeds(c)}
    error = best_recovery_error(noisy_sums(out, model, run_config), true_sum, std, seeds)
    expected_noise = std * math.sqrt(true_sum.numel())
    print(f"central: best recovered error {error:.3g}, expected noise norm {expected_noise:.3g}, "
          f"{len(seeds)} seeds tried")
    return error, expected_noise


def test_a_default_run_s_noise_cannot_be_regenerated_from_its_outputs(tmp_path, tiny_sd_path, monkeypatch):
    out, run_config, true_sum = run_default(tmp_path, tiny_sd_path, monkeypatch)
    error, expected_noise = attack_central(out, run_config, true_sum, tiny_sd_path)
    assert error >= 0.5 * expected_noise
    # and the release says where its noise came from, with no seed in it
    privacy = json.loads((out / "privacy.json").read_text())
    assert privacy["privacy_randomness"] == "os" and "os.urandom" in privacy["noise_source"]
    assert "os.urandom" in privacy["sampling_source"]


def test_the_same_attack_breaks_a_seeded_insecure_run_which_says_so(tmp_path, tiny_sd_path, monkeypatch, caplog):
    """The control: the attack above is not blind. With seeded-insecure randomness it recovers
    the exact clipped sum from the run seed alone, and the run says it is not private."""
    with caplog.at_level("WARNING", logger="privadapt.server"):
        out, run_config, true_sum = run_default(tmp_path, tiny_sd_path, monkeypatch,
                                                **{"privacy-randomness": "seeded-insecure"})
    error, expected_noise = attack_central(out, run_config, true_sum, tiny_sd_path)
    assert error < 1e-9 * expected_noise
    privacy = json.loads((out / "privacy.json").read_text())
    assert privacy["privacy_randomness"] == "seeded-insecure"
    for source in (privacy["noise_source"], privacy["sampling_source"]):
        assert "run_config.json" in source and "NOT differentially private" in source
    claim = (out / "README.md").read_text().split("\n")[2]
    assert claim.startswith("**Not differentially private.**") and "not a guarantee" in claim
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "NOT differentially private" in warnings[0]  # at the start of the run...
    assert "NOT a guarantee" in warnings[-1]  # ...and in its summary line


def test_the_server_cannot_rebuild_any_site_s_distributed_noise_share(tmp_path, tiny_sd_path, monkeypatch):
    shares: list[tuple[np.ndarray, float]] = []  # (share, its std): what each site really added
    real_add = client.secagg.add_noise_share

    def recording_add(vector, total_std, num_shares, noise):
        noised = real_add(vector, total_std, num_shares, noise)
        shares.append((noised - np.asarray(vector, dtype=np.float64), total_std / math.sqrt(num_shares)))
        return noised

    monkeypatch.setattr(client.secagg, "add_noise_share", recording_add)
    out, run_config, true_sum = run_default(tmp_path, tiny_sd_path, monkeypatch, aggregation="distributed")
    assert len(shares) == NUM_SITES
    dim, share_std = true_sum.numel(), shares[0][1]
    candidates = candidate_seeds(out, run_config) | {101, 102, 103}  # node ids are in the server's view too
    # 1. no seed regenerates any site's share
    closest = math.inf
    for seed in {s for c in candidates for s in derived_seeds(c)}:
        regenerated = NoiseSource.seeded(seed).normal((dim,), share_std).numpy()
        closest = min(closest, *(float(np.linalg.norm(share - regenerated)) for share, _ in shares))
    # 2. no seed family rebuilds the sum of the shares and recovers the clipped sum
    noisy = noisy_sums(out, tiny_sd_path, run_config)
    best = min(float(torch.linalg.vector_norm(n - true_sum)) for n in noisy)
    for candidate in candidates:
        for label in LABELS:
            for r in ROUNDS:
                rebuilt = sum(NoiseSource.seeded(derive_seed(candidate, label, site, r)).normal((dim,), share_std)
                              for site in range(NUM_SITES))
                best = min(best, *(float(torch.linalg.vector_norm(n - rebuilt - true_sum)) for n in noisy))
    share_noise, total_noise = share_std * math.sqrt(dim), share_std * math.sqrt(NUM_SITES * dim)
    print(f"distributed: closest share {closest:.3g} (share noise norm {share_noise:.3g}); "
          f"best recovered sum error {best:.3g} (noise norm {total_noise:.3g})")
    assert closest >= 0.5 * share_noise
    assert best >= 0.5 * total_noise


# ---- the refusals and the sources behind them -------------------------------------------

def test_distributed_aggregation_refuses_seeded_randomness_in_the_config():
    with pytest.raises(ValueError, match="privacy-randomness: distributed aggregation needs secret noise shares"):
        RunConfig(aggregation="distributed", privacy_randomness="seeded-insecure")


def test_a_site_refuses_seeded_noise_shares_even_if_the_config_check_is_bypassed(monkeypatch, caplog):
    monkeypatch.setattr(RunConfig, "__post_init__", lambda self: None)  # the config check, bypassed
    run_config = {**pyproject_run_config(), "aggregation": "distributed", "privacy-randomness": "seeded-insecure"}
    context = Context(run_id=1, node_id=101, node_config={"partition-id": 0}, state=RecordDict(), run_config=run_config)
    setup = Message(content=RecordDict({keys.CONFIG: ConfigRecord({P.STAGE: P.SETUP, keys.METHOD: "dpagg"})}),
                    dst_node_id=101, message_type="train")
    with caplog.at_level("ERROR", logger="privadapt.client"), pytest.raises(SiteRefusal) as refused:
        handle_train(setup, context)
    assert refused.value.reason in SITE_REFUSALS  # the server sees only a fixed text...
    assert "refuses seeded noise shares" in caplog.text  # ...the site's own log says why
    assert not context.state  # refused before any protocol state (or data) was touched


def test_every_privacy_source_of_a_default_config_is_the_os_csprng(monkeypatch):
    from client.site_accountant import dpsgd_draws
    from server.app import noise_source
    from server.lora_run import server_noise

    cfg = RunConfig.from_run_config(pyproject_run_config())
    assert cfg.privacy_randomness == "os" and cfg.secret_randomness
    assert noise_source(cfg).secure_mode
    lora_noise, site_sampling = server_noise(cfg)
    assert lora_noise.secure_mode and site_sampling is None  # None: every Poisson draw reads os.urandom
    for label in ("dpsgd", "lora-dpsgd"):
        _, batches, dp_noise = dpsgd_draws(cfg.seed, label, "cpu", 0, 1, secret=cfg.secret_randomness)
        assert batches is None and dp_noise.secure_mode
    # the image sampling of a DPAgg-TI site, as the ClientApp passes it
    seen: dict[str, Any] = {}
    monkeypatch.setattr(client.app, "load_images", lambda *a: SimpleNamespace(names=()))
    monkeypatch.setattr(client.app, "get_pipeline", lambda cfg: SimpleNamespace(unet=SimpleNamespace(device="cpu")))
    monkeypatch.setattr(client.app, "site_contribution", lambda *a, **kw: seen.update(kw) or SimpleNamespace(
        num_sampled=0, num_clipped=0, total=torch.zeros(1)))
    msg = Message(content=RecordDict({keys.CONFIG: ConfigRecord({keys.ROUND: 1})}), dst_node_id=1, message_type="train")
    client.app.dpagg_contribution(msg, cfg, 0, "site-0", "unused")
    assert seen["sampling"] is None


def test_the_labels_cover_the_code():
    """Every derive_seed label in the code is in LABELS, so the attacks try them all."""
    source = "\n".join(p.read_text() for d in ("server", "client", "common") for p in (REPO_ROOT / d).rglob("*.py"))
    literal = set(re.findall(r'derive_seed\([^()]*?"([a-z-]+)"', source))
    drawn = set(re.findall(r'dpsgd_draws\([^,]+,\s*"([a-z-]+)"', source))
    suffixes = set(re.findall(r'f"\{label\}-([a-z]+)"', source))
    used = literal | drawn | {f"{label}-{suffix}" for label in drawn for suffix in suffixes}
    assert literal and drawn and suffixes
    assert used <= set(LABELS), sorted(used - set(LABELS))
