"""privadapt ServerApp: plan the privacy, run the rounds, keep the ledger, export.

Order of work: read and validate the run config; fix the privacy plan (refuse to start if
the target epsilon cannot be met, or if the planned noise drowns the largest possible signal:
:func:`server.statement.checked_signal`); run the strategy (DPAgg-TI releases, or the DP-SGD
baseline's rounds) with the ledger saved after every release; export the adapter,
privacy.json, metrics, samples and the model card into ``output-dir``.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from common.config import RunConfig
from common.dp import GaussianSumMechanism, NoiseSource, PrivacyLedger
from common.dp.noise import privacy_noise
from common.dp.plan import plan_dpagg, plan_record
from common.lora import LORA_FILE, save_lora
from common.models import load_pipeline
from common.paths import resolve
from common.settings import model_dir, ti_settings
from common.textual_inversion import initializer_vector
from server.dpagg_strategy import DPAggTIStrategy
from server.export import (
    embedding_metrics,
    export_embedding,
    generate_samples,
    lora_model_card,
    model_card,
    sample_pairs,
    write_json,
)
from server.statement import (
    checked_signal,
    log_line,
    privacy_statement,
    release_noise_description,
    run_facts,
    sampling_description,
    seeded_insecure,
)
from server.strategy_base import reliability_report, run_control

log = logging.getLogger("privadapt.server")

def noise_source(cfg: RunConfig) -> NoiseSource:
    """The server's noise: the OS CSPRNG unless ``privacy-randomness = "seeded-insecure"``."""
    return privacy_noise(cfg.secret_randomness, cfg.seed, "server-noise")


def postprocess(release: torch.Tensor, init: torch.Tensor, cfg: RunConfig) -> tuple[torch.Tensor, list[str]]:
    """Turn the mean release into the published vector; every step is recorded."""
    steps: list[str] = []
    vector = release.double()
    if cfg.num_releases > 1:
        steps.append(f"averaged the {cfg.num_releases} releases")
    if cfg.center:
        vector = vector + init.double()
        steps.append("added back the initializer token's embedding (the records were centred on it)")
    if cfg.rescale == "initializer-norm":
        norm = torch.linalg.vector_norm(vector)
        if norm > 0:
            vector = vector * (torch.linalg.vector_norm(init.double()) / norm)
        steps.append(f"rescaled to the L2 norm of the initializer token '{cfg.initializer_token}'")
    return vector.float(), steps


def run_dpagg(grid: Grid, cfg: RunConfig, out: Path, pipe) -> dict:
    plan = plan_dpagg(cfg)
    settings = ti_settings(cfg)
    init = initializer_vector(pipe, settings)
    signal = checked_signal(cfg, plan, init.numel())  # refuses a release that cannot carry signal: nothing sent yet
    ledger = PrivacyLedger(delta=cfg.target_delta)
    noise = noise_source(cfg)
    mechanism = GaussianSumMechanism(clip_norm=cfg.clip_norm, noise_multiplier=plan.noise_multiplier, bound_mode=cfg.bound)
    strategy = DPAggTIStrategy(plan=plan, mechanism=mechanism, noise=noise, ledger=ledger, dim=init.numel(),
                               ledger_path=out / "ledger.json", aggregation=cfg.aggregation,
                               max_site_norm=cfg.dataset_size * cfg.clip_norm, timeout=cfg.round_timeout,
                               control=run_control(cfg, out, unit="record", plan={
                                   "noise_multiplier": plan.noise_multiplier, "sample_rate": plan.sample_rate}))
    plan_sent = plan_record(cfg, plan)  # exactly what the ledger is charged
    strategy.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=cfg.num_releases, timeout=cfg.round_timeout,
                   train_config=ConfigRecord(plan_sent))
    vector, post = postprocess(strategy.mean_release(), init, cfg)
    eps = ledger.summary().get("record", {"prv": 0.0, "rdp": 0.0})
    privacy = {
        "method": "dpagg-ti",
        "unit": "record",
        "private": cfg.private,
        "mechanism": "DPAgg-TI (Peetathawatchai et al. 2024): "
                     + ("Poisson-subsampled " if plan.sample_rate < 1 else "")
                     + "Gaussian sum of bounded per-image textual-inversion embeddings, divided by the public "
                     + ("expected count" if plan.sample_rate < 1 else "declared count"),
        "epsilon": eps,
        "headline_accountant": "prv",
        "delta": cfg.target_delta,
        "target_epsilon": None if math.isinf(cfg.target_epsilon) else cfg.target_epsilon,
        "sample_rate": plan.sample_rate,
        "noise_multiplier": plan.noise_multiplier,
        "clip_norm": cfg.clip_norm,
        "bound": cfg.bound,
        "centered": cfg.center,
        "declared_num_images": cfg.dataset_size,
        "denominator": plan.denominator,
        "num_sites": len({n for used in strategy.contributors for n in used}),
        "sites_per_release": [len(used) for used in strategy.contributors],
        "num_releases": len(strategy.releases),
        "sampling": "poisson" if plan.sample_rate < 1 else "none (every image used)",
        "adjacency": "add/remove one image",
        "accountants": {"prv": "opacus PRVAccountant (eps_error 0.01)", "rdp": "opacus RDPAccountant"},
        "post_processing": post,
        "aggregation": cfg.aggregation,
        "achieved_noise_multipliers": strategy.achieved_noise_multipliers,
        "noise_source": release_noise_description(cfg),
        "sampling_source": sampling_description("Poisson sampling of images on each site", cfg.secret_randomness),
        # DPAgg-TI sites send their sum alone, never diagnostics (client.app.dpagg_reply)
        **privacy_statement(run_facts(
            cfg, units=("record",), epsilon={"record": eps}, adjacency={"record": "add/remove one image"},
            contribution="sum of bounded embeddings", achieved=strategy.achieved_noise_multipliers,
            planned_noise_multiplier=plan.noise_multiplier),
            "This embedding"),
        "rejected_replies": strategy.rejected,
        **reliability_report(strategy),
        "plan": plan.to_dict(),
        "signal_to_noise": signal,
        "events": [e.to_dict() for e in ledger.events],
        "adapter": {"type": "textual-inversion", "token": cfg.placeholder_token, "dim": init.numel()},
    }
    metrics = {
        **embedding_metrics(vector, init),
        "noise_std_per_coordinate_of_mean": mechanism.noise_std / plan.denominator,
    }
    return {"vector": vector, "privacy": privacy, "metrics": metrics}


def run_dpsgd(grid: Grid, cfg: RunConfig, out: Path, pipe) -> dict:
    from server.dpsgd_strategy import run_dpsgd_baseline  # Opacus baseline, imported on demand

    return run_dpsgd_baseline(grid, cfg, out, pipe)


def export_ti_run(grid: Grid, cfg: RunConfig, out: Path, pipe) -> dict:
    result = run_dpagg(grid, cfg, out, pipe) if cfg.ti_method == "dpagg" else run_dpsgd(grid, cfg, out, pipe)
    embeds = export_embedding(out, cfg.placeholder_token, result["vector"])
    write_json(out / "privacy.json", result["privacy"])
    result["samples"] = generate_samples(model_dir(cfg), embeds, cfg.placeholder_token, cfg.prompts, out / "samples",
                                         template=cfg.prompt_template, steps=cfg.sample_steps, guidance=cfg.sample_guidance, seed=cfg.seed,
                                         device=cfg.device)
    return result


def export_lora_run(grid: Grid, cfg: RunConfig, out: Path, pipe) -> dict:
    from server.lora_run import run_lora

    result = run_lora(grid, cfg, out, pipe)
    save_lora(out, pipe, result["spec"])
    write_json(out / "privacy.json", result["privacy"])
    write_json(out / "round_metrics.json", result["rounds"])
    result["samples"] = sample_pairs(model_dir(cfg), cfg.prompts, out / "samples",
                                     adapt=lambda fresh: fresh.load_lora_weights(str(out), weight_name=LORA_FILE),
                                     adapted_prompt=lambda prompt: prompt, steps=cfg.sample_steps,
                                     guidance=cfg.sample_guidance, seed=cfg.seed, device=cfg.device)
    return result


def run_server(grid: Grid, cfg: RunConfig) -> Path:
    """Run one privadapt job against the sites reachable through ``grid``."""
    started = time.time()
    if not cfg.secret_randomness:
        log.warning("privadapt: privacy noise and sampling are %s (tests and replayable research only)",
                    seeded_insecure("them"))
    out = resolve(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "run_config.json", cfg.to_run_config())
    pipe = load_pipeline(model_dir(cfg), device=cfg.device)
    if cfg.adapter == "lora":
        result = export_lora_run(grid, cfg, out, pipe)
    else:
        result = export_ti_run(grid, cfg, out, pipe)
    # the wall time stays in the server's log: it grows with the sites' (secret) sample counts
    log.info("privadapt: the run took %.1f s", time.time() - started)
    write_json(out / "metrics.json", result["metrics"])
    card = lora_model_card if cfg.adapter == "lora" else model_card
    (out / "README.md").write_text(card(result["privacy"], result["metrics"], result["samples"]))
    log_summary(out, result["privacy"])
    return out


def log_summary(out: Path, privacy: Mapping[str, Any]) -> None:
    """The run's last log line (:func:`server.statement.log_line`); a run that claims no DP says
    so at WARNING level."""
    level = logging.INFO if privacy.get("dp_guarantee") or not privacy.get("private") else logging.WARNING
    log.log(level, "privadapt: wrote %s: %s", out, log_line(privacy))


def build_server_app(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp whose run config is Flower's run config updated with ``overrides``."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, RunConfig.from_run_config({**context.run_config, **(overrides or {})}))

    return server_app


app = build_server_app()
