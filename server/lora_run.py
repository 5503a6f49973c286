"""A LoRA run on the server: plan, DP-FedAvg rounds, the published adapter and its report.

The initial adapter is public (drawn from the run seed, B = 0 so it leaves the model
unchanged; under FFA-LoRA its A stays frozen there, drawn the same way by every site, and only
B is aggregated and released); the plan fixes the site-level noise multiplier for ``rounds`` rounds at
``site-sampling-rate`` before any site is contacted, and refuses a target it cannot meet, or
a plan whose noise drowns the largest possible signal (:func:`server.statement.checked_signal`).
"""

from __future__ import annotations

import math
from pathlib import Path

from flwr.app import ConfigRecord
from flwr.serverapp import Grid

from common import keys
from common.config import RunConfig
from common.dp import GaussianSumMechanism, NoiseSource, PrivacyLedger
from common.dp.noise import privacy_noise
from common.dp.plan import DPSGDPlan, FedAvgPlan, plan_dpsgd, plan_fedavg, plan_record
from common.dp.sampling import SamplingSource, privacy_sampling
from common.lora import LoRASpec, attach_lora, flat_norm, frozen_state, load_lora_state, lora_state, tree_digest
from common.settings import lora_init_seed, lora_spec, sends_diagnostics
from common.wire import tree_record
from server.lora_strategy import DPFedAvgLoRA
from server.statement import (
    checked_signal,
    privacy_statement,
    release_noise_description,
    run_facts,
    sampling_description,
)
from server.strategy_base import reliability_report, run_control

DEFENSES = {
    "none": "plain LoRA (AdamW on the denoising loss)",
    "mp-lora": "MP-LoRA (Luo et al., arXiv 2402.11989): L_ada - lambda*CE against a proxy membership attacker "
               "trained alongside on the site's member / non-member split",
    "smp-lora": "SMP-LoRA (Luo et al., arXiv 2402.11989): L_ada / (1 + lambda*CE + 1e-5) against a proxy membership "
                "attacker trained alongside on the site's member / non-member split",
    "dp-sgd": "Opacus DP-SGD on each site (per-image gradients clipped and noised; record-level DP)",
    "smp-dp-sgd": "SMP-LoRA inside DP-SGD on each site: per member, the gradient of L_ada / (1 + lambda*CE + 1e-5) "
                  "(through both terms) clipped and noised; the proxy attacker, kept on the site, trained with DP-SGD "
                  "too on the site's member / non-member split (record-level DP for every image of the site)",
}

# which images the record-level epsilon covers, per defense that runs DP-SGD on the sites
RECORD_COVERS = {
    "dp-sgd": "every image of every site (each may train the adapter)",
    "smp-dp-sgd": "every image of every site: the members that train the adapter AND the images the proxy attacker "
                  "learns from (its members and its non-members), because the attacker's steps are clipped per image "
                  "and noised as well and each site's accountant composes both steps (2 x local-steps DP-SGD steps per "
                  "round); the images held out to score the attacker train nothing",
}
EMPIRICAL_NAMES = {"mp-lora": "MP-LoRA", "smp-lora": "SMP-LoRA", "smp-dp-sgd": "SMP-LoRA (inside DP-SGD)"}

NOT_COVERED = ("round_metrics.json (per round: how many sites were sampled and answered, the expected noise norm and "
               "the update's norm) is the server's own log, not a release: do not publish it with the adapter.")
DIAGNOSTIC_FIGURES = ("its mean training loss, the proxy attacker's accuracy (MP-/SMP-LoRA), its delta's L2 norm before "
                      "clipping and whether it was clipped")


def server_noise(cfg: RunConfig) -> tuple[NoiseSource, SamplingSource]:
    """The server's noise source and site-sampling source: both draw from the OS CSPRNG unless
    ``privacy-randomness = "seeded-insecure"`` (then both replay from the run seed: not private)."""
    return (privacy_noise(cfg.secret_randomness, cfg.seed, "server-noise"),
            privacy_sampling(cfg.secret_randomness, cfg.seed, "site-sampling"))


def lora_facts(cfg: RunConfig, epsilon: dict, strategy: DPFedAvgLoRA, planned_z: float):
    """The facts the adapter's privacy statement follows from (:mod:`server.statement`)."""
    record = cfg.site_dpsgd and cfg.private
    return run_facts(
        cfg, units=("site", "record") if record else ("site",), epsilon=epsilon,
        adjacency={"site": ("zero-out one site (no amplification by site sampling claimed)"
                            if cfg.aggregation == "distributed" else "add/remove one site"),
                   "record": "add/remove one image"},
        contribution="clipped delta",
        diagnostics=DIAGNOSTIC_FIGURES if sends_diagnostics(cfg) else None,
        achieved=[r.achieved_noise_multiplier for r in strategy.rounds if r.achieved_noise_multiplier is not None],
        planned_noise_multiplier=planned_z,
        empirical_defense=EMPIRICAL_NAMES.get(cfg.defense),
        not_covered=(NOT_COVERED,), record_noise_on_sites=record,
        record_covers=RECORD_COVERS[cfg.defense] if record else None)


VARIANTS = {
    "lora": "LoRA (Hu et al. 2022): A and B trained, clipped, noised and released",
    "ffa": "FFA-LoRA (Sun et al., ICLR 2024, arXiv 2403.12313): every A frozen at a public initialisation drawn from "
           "the run seed (identical on every site and the server, independent of any data); only B trained, clipped, "
           "noised and released",
}


def adapter_report(spec: LoRASpec, released: dict, frozen: dict) -> dict:
    """privacy.json's ``adapter``: the shape, the variant, and how many parameters were released
    (d, public: a function of the config's rank, targets and variant and the base model's shapes)."""
    return {"type": "lora", "variant": spec.variant, "variant_description": VARIANTS[spec.variant], "rank": spec.rank,
            "alpha": spec.alpha, "targets": list(spec.targets), "text_encoder": spec.text_encoder,
            "parameters": sum(v.numel() for v in released.values()),
            "frozen_parameters": sum(v.numel() for v in frozen.values())}


def checkpoint_plan(plan: FedAvgPlan, dpsgd: DPSGDPlan | None) -> dict[str, float]:
    """The (z, q) a resumed run must share with its checkpoint: the site-level ones and, with
    DP-SGD sites, the record-level ones (both change with the number of rounds when calibrated)."""
    pinned = {"noise_multiplier": plan.noise_multiplier, "sample_rate": plan.sample_rate}
    if dpsgd is not None:
        pinned.update(record_noise_multiplier=dpsgd.noise_multiplier, record_sample_rate=dpsgd.sample_rate)
    return pinned


def run_lora(grid: Grid, cfg: RunConfig, out: Path, pipe) -> dict:
    """Run ``rounds`` rounds of DP-FedAvg; leave the final global adapter loaded in ``pipe``
    and return the privacy report, public metrics and per-round diagnostics."""
    plan = plan_fedavg(cfg)
    dpsgd = plan_dpsgd(cfg) if cfg.private else None  # the sites' record-level DP-SGD (defense dp-sgd, smp-dp-sgd)
    spec = lora_spec(cfg)
    attach_lora(pipe, spec, seed=lora_init_seed(cfg))
    initial = lora_state(pipe, spec)  # what is trained and released: B only under FFA-LoRA
    frozen = frozen_state(pipe, spec)  # FFA-LoRA's public A (never sent: each site draws it), else empty
    parameters = sum(v.numel() for v in initial.values())  # d, the released dimension: public, known before any release
    signal = checked_signal(cfg, plan, parameters)  # refuses a release that cannot carry signal: nothing sent yet
    noise, sampling = server_noise(cfg)
    ledger = PrivacyLedger(delta=cfg.target_delta)
    mechanism = GaussianSumMechanism(clip_norm=cfg.lora_clip_norm, noise_multiplier=plan.noise_multiplier)
    strategy = DPFedAvgLoRA(
        plan=plan, mechanism=mechanism, noise=noise, sampling=sampling, ledger=ledger, initial=initial,
        defense=cfg.defense, private=cfg.private, server_learning_rate=cfg.server_learning_rate,
        num_sites=cfg.num_sites, ledger_path=out / "ledger.json", aggregation=cfg.aggregation, timeout=cfg.round_timeout,
        control=run_control(cfg, out, unit="site", plan=checkpoint_plan(plan, dpsgd),
                            other_targets={"record": cfg.record_epsilon_target} if dpsgd else None),
        dpsgd=dpsgd,
    )
    plan_sent = plan_record(cfg, plan, dpsgd=dpsgd)  # exactly what the ledger is charged
    if spec.frozen_a:  # each site checks that its own A is the server's
        plan_sent[keys.LORA_FROZEN_A] = tree_digest(frozen)
    strategy.start(grid=grid, initial_arrays=tree_record(initial), num_rounds=cfg.rounds, timeout=cfg.round_timeout,
                   train_config=ConfigRecord(plan_sent))
    load_lora_state(pipe, spec, strategy.global_state)
    private = cfg.private
    released = "B (released) " if spec.frozen_a else ""  # FFA-LoRA: A is frozen and public, never clipped or sent
    # a run stopped before its first release (too many sites, no budget) spent nothing
    epsilon = {"site": {"prv": 0.0, "rdp": 0.0}, **ledger.summary()} if private else {"site": {"prv": None, "rdp": None}}
    privacy = {
        "method": "dp-fedavg-lora",
        "defense": cfg.defense,
        "defense_description": DEFENSES[cfg.defense],
        "unit": "site" + (" and record" if cfg.site_dpsgd and private else ""),
        "private": private,
        "mechanism": "DP-FedAvg (McMahan et al. 2018): Poisson-subsampled sites, each site's LoRA delta clipped to "
                     f"L2 norm C over all {released}adapter tensors, Gaussian noise N(0, (zC)^2) added once to the "
                     "sum, divided by the public expected count q*K",
        "epsilon": epsilon,
        "headline_accountant": "prv",
        "delta": cfg.target_delta,
        "target_epsilon": None if math.isinf(cfg.target_epsilon) else cfg.target_epsilon,
        "record_target_epsilon": (cfg.record_epsilon_target if cfg.site_dpsgd and private else None),
        "sample_rate": plan.sample_rate,
        "noise_multiplier": plan.noise_multiplier,
        "achieved_noise_multipliers": [r.achieved_noise_multiplier for r in strategy.rounds
                                       if r.achieved_noise_multiplier is not None],
        "clip_norm": cfg.lora_clip_norm if private else None,
        "num_sites_declared": strategy.num_sites,
        "denominator": strategy.denominator if private else "number of sites that answered (plain mean)",
        "num_rounds": len(strategy.rounds),
        "sampling": "poisson over sites" if plan.sample_rate < 1 else "none (every site every round)",
        "adjacency": ("zero-out one site (its delta replaced by zero, its noise share kept; no amplification by "
                      "site sampling claimed: the server knows who took part)" if cfg.aggregation == "distributed"
                      else "add/remove one site") + ("; add/remove one image (DP-SGD)" if cfg.site_dpsgd else ""),
        "accountants": {"prv": "opacus PRVAccountant (eps_error 0.01)", "rdp": "opacus RDPAccountant"},
        "site_record_epsilon_reported": dict(sorted(strategy.reported_record_epsilons.items())) or None,
        "post_processing": [f"global adapter += {cfg.server_learning_rate:g} x the noisy mean delta, every round"],
        "aggregation": cfg.aggregation,
        "accounted_sample_rate": plan.accounting_sample_rate,
        "noise_source": release_noise_description(cfg) if private else "none (non-private run)",
        "sampling_source": sampling_description("Poisson sampling of sites on the server", cfg.secret_randomness),
        **privacy_statement(lora_facts(cfg, epsilon, strategy, plan.noise_multiplier), "This LoRA adapter"),
        **reliability_report(strategy),
        "plan": {**plan.to_dict(), "local_steps": cfg.local_steps, "lora_learning_rate": cfg.lora_learning_rate,
                 "server_learning_rate": cfg.server_learning_rate},
        "record_plan": dpsgd.to_dict() if dpsgd else None,
        "signal_to_noise": signal,
        "events": [e.to_dict() for e in ledger.events],
        "adapter": adapter_report(spec, initial, frozen),
    }
    final = strategy.global_state
    metrics = {
        "adapter_norm": flat_norm(final),
        "distance_from_initial_adapter": flat_norm({k: final[k] - initial[k] for k in final}),
        "noise_std_per_coordinate_of_mean": (mechanism.noise_std / strategy.denominator) if private else 0.0,
        "rounds": len(strategy.rounds),
    }
    return {"privacy": privacy, "metrics": metrics, "rounds": strategy.round_summaries(), "spec": spec}
