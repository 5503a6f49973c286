"""The DP-SGD textual-inversion baseline on Flower's Message API.

Peetathawatchai et al. 2024 (arXiv 2411.14639) compare DPAgg-TI with DP-SGD on ONE shared
textual-inversion embedding. Federated, a round is: the server sends the global embedding
to every site; each site runs ``dpsgd-local-steps`` steps of DP-SGD (Opacus) on its own
images (:mod:`client.dpsgd_ti`) and returns its embedding together with the public
parameters of what it spent (z, q, steps, its index); the server checks every reply and
takes the UNIFORM mean of the valid embeddings (never weighted by example counts: that
weighting would be data-dependent and is not needed for the guarantee).

Privacy: the noise is added on each site, so every update the server sees is already
record-level DP; the mean is post-processing. Each site's rounds compose (scope
``site-<index>``); sites hold disjoint images, so the run's epsilon is the worst site's
(parallel composition), which is what :class:`~common.dp.PrivacyLedger` reports. The ledger
holds one event per site reply whose privacy report could be read, including replies whose
embedding was then rejected (the server saw them), and is saved after every round.

Every site's (z, q, steps) are public and known to the server beforehand
(:class:`~common.dp.plan.DPSGDPlan`: q = dpsgd-batch-size / the declared ``site-dataset-size``,
z calibrated for the whole run at that q, as each site calibrates it), so nothing the sites
report reveals their image counts. The server sends that plan with every round (a site
refuses a different one), rejects a report that differs from it, and stops the run before a
round would take the most-spent site past ``target-epsilon``.
"""

from __future__ import annotations

import logging
import math
from array import array
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from common import keys
from common.config import RunConfig
from common.dp import PrivacyEvent, PrivacyLedger, epsilon
from common.dp.plan import EACH_SITE, DPSGDPlan, plan_dpsgd, plan_record
from common.reasons import public_rejections
from common.settings import sends_diagnostics, ti_settings
from common.textual_inversion import initializer_vector
from server.export import embedding_metrics
from server.replies import ReplyError, read_diagnostics, read_site_report, read_vector
from server.sites import NODE_ARRAY, Instructions, SiteDiagnostics
from server.statement import noise_description, privacy_statement, run_facts, sampling_description
from server.strategy_base import LedgerStrategy, RunControl, reliability_report, run_control

log = logging.getLogger("privadapt.server")

METHOD = "dp-sgd"


def embedding_record(vector: torch.Tensor) -> ArrayRecord:
    return ArrayRecord(array_dict={keys.EMBEDDING: Array(vector.detach().cpu().numpy().astype(np.float32).reshape(-1))})


class DPSGDTIStrategy(LedgerStrategy):
    """Federated DP-SGD textual inversion: broadcast, collect, check, uniform mean, account."""

    def __init__(self, *, ledger: PrivacyLedger, initial: torch.Tensor, ledger_path: Path | None = None,
                 control: RunControl | None = None, plan: DPSGDPlan | None = None) -> None:
        initial = initial.detach().reshape(-1).to(torch.float32).cpu()
        if not torch.isfinite(initial).all():
            raise ValueError("the initial embedding has NaN or infinite entries")
        super().__init__(ledger=ledger, ledger_path=ledger_path, control=control)
        self.dim = initial.numel()
        self.global_embedding = initial.clone()
        self.contributors: list[array] = []  # per round: nodes whose embedding entered the mean (8 B each)
        self.reported_epsilons: dict[str, float] = {}  # scope -> the latest epsilon the site reported
        self.rejected: list[dict] = []  # {"round", "node", "reason"}: reasons from common.reasons only
        self.plan = plan  # the sites' record-level plan (None: non-private, nothing to charge)

    def next_event(self, server_round: int) -> PrivacyEvent | None:
        """One round of the plan on each site (scope :data:`~common.dp.plan.EACH_SITE`): the budget
        check composes it with the most-spent site's rounds."""
        if self.plan is None or self.plan.noise_multiplier == 0:
            return None
        return self.plan.charged_event(label=f"dp-sgd round {server_round}", scope=EACH_SITE)

    def charged_though_lost(self, lost: list[PrivacyEvent]) -> list[PrivacyEvent]:
        """The sites added the noise and the server saw their updates: every lost spend stays charged."""
        return lost

    def state_dict(self) -> dict:
        return {"global_embedding": self.global_embedding.clone(), "contributors": [list(c) for c in self.contributors],
                "reported_epsilons": dict(self.reported_epsilons), "rejected": [dict(r) for r in self.rejected]}

    def load_state_dict(self, state: dict) -> None:
        embedding = state["global_embedding"].to(torch.float32).reshape(-1)
        if embedding.numel() != self.dim:
            raise ValueError(f"the checkpointed embedding has {embedding.numel()} entries, expected {self.dim}")
        self.global_embedding = embedding
        self.contributors = [array(NODE_ARRAY, c) for c in state["contributors"]]
        self.reported_epsilons = dict(state["reported_epsilons"])
        self.rejected = public_rejections(state["rejected"])

    def current_arrays(self) -> ArrayRecord:
        return embedding_record(self.global_embedding)

    def summary(self) -> None:
        log.info("DP-SGD TI baseline: %d-dim shared embedding, uniform mean of site updates, noise added on the sites",
                 self.dim)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        if keys.EMBEDDING in arrays:
            current = torch.from_numpy(np.asarray(arrays[keys.EMBEDDING].numpy(), dtype=np.float32).copy()).reshape(-1)
            if current.numel() != self.dim:
                raise ValueError(f"the global embedding has {current.numel()} entries, expected {self.dim}")
        else:
            current = self.global_embedding
        cfg = ConfigRecord({**dict(config), keys.ROUND: server_round, keys.METHOD: METHOD})
        # one content for every site, messages built while pushed (server.sites)
        return Instructions(array(NODE_ARRAY, grid.get_node_ids()), RecordDict({keys.ARRAYS: embedding_record(current),
                                                                     keys.CONFIG: cfg}))

    def _reject(self, server_round: int, node: int, err: ReplyError) -> None:
        """Log why a reply is left out (server log) and keep its public reason only."""
        log.warning("round %d: node %s left out: %s", server_round, node, err)
        self.rejected.append({"round": server_round, "node": node, "reason": err.public})

    def _take(self, server_round: int, scopes: dict[str, int], reply: Message) -> tuple[int, torch.Tensor | None]:
        """Record one site's reported spend and read its embedding: (its node, the embedding,
        or None when the reply is left out)."""
        node = reply.metadata.src_node_id
        try:
            report = read_site_report(reply)
        except ReplyError as err:
            self._reject(server_round, node, err)
            return node, None
        # the site spent this whether or not its embedding is usable: the server saw it
        event = report.event(server_round, node)
        if event.scope in scopes:
            log.warning("round %d: nodes %s and %s both report %s; their spends compose in one scope",
                        server_round, scopes[event.scope], node, event.scope)
        scopes[event.scope] = node
        self.ledger.record(event)
        self.reported_epsilons[event.scope] = report.epsilon
        try:
            if self.plan is not None:
                report.check_planned(self.plan.charged_event())
            return node, read_vector(reply, keys.EMBEDDING, self.dim)
        except ReplyError as err:
            self._reject(server_round, node, err)
            return node, None

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        total: torch.Tensor | None = None  # running sum: replies are streamed, never kept
        used = array(NODE_ARRAY)
        scopes: dict[str, int] = {}
        diagnostics = SiteDiagnostics((keys.DIAG_LOSS,))  # only sites that opted in send any
        for reply in replies:
            node, vector = self._take(server_round, scopes, reply)
            if vector is not None:
                total = vector if total is None else total + vector
                used.append(node)
                diagnostics.add(read_diagnostics(reply, (keys.DIAG_LOSS,)))
            del reply  # before the stream's next pull (server.streaming): the running sum keeps no reply
        if scopes:
            self.save_ledger()
        self.contributors.append(used)
        if total is None:
            log.warning("round %d: no valid site embedding; the global embedding is unchanged", server_round)
            return None, None
        # uniform: each site counts once, whatever its number of images
        self.global_embedding = (total / len(used)).to(torch.float32)
        metrics = MetricRecord({"sites": len(used), "rejected": len(scopes) - len(used)})
        loss = diagnostics.mean(keys.DIAG_LOSS)
        if loss is not None:  # logged with the round (not private: site-diagnostics = true)
            metrics[keys.DIAG_LOSS] = loss
        return embedding_record(self.global_embedding), metrics

    def site_epsilons(self, accountant: str = "prv") -> dict[str, float | None]:
        """Each site's record-level epsilon recomputed from the ledger (None for infinity)."""
        out: dict[str, float | None] = {}
        for scope in sorted({e.scope for e in self.ledger.events}):
            events = [e for e in self.ledger.events if e.scope == scope]
            eps = epsilon(events, self.ledger.delta, accountant)  # type: ignore[arg-type]
            out[scope] = None if math.isinf(eps) else round(eps, 6)
        return out


def _none_if_inf(x: float) -> float | None:
    return None if math.isinf(x) else x


def noise_source_description(cfg: RunConfig) -> str:
    """Where the sites' DP-SGD noise and Poisson batches come from, in words; never a seed."""
    if not cfg.private:
        return "none (non-private run: no noise, no clipping)"
    return (noise_description("on each site, inside Opacus' DPOptimizer", cfg.secret_randomness) + "; "
            + sampling_description("its Poisson batches", cfg.secret_randomness))


def run_dpsgd_baseline(grid: Grid, cfg: RunConfig, out: Path, pipe) -> dict:
    """Run ``dpsgd-rounds`` rounds of federated DP-SGD textual inversion from the initializer
    token's embedding; return the published vector, the privacy report and metrics."""
    settings = ti_settings(cfg)
    init = initializer_vector(pipe, settings)
    ledger = PrivacyLedger(delta=cfg.target_delta)
    plan = plan_dpsgd(cfg)  # every site's (z, q, steps), from public settings: the server checks and charges it
    pinned = {"noise_multiplier": plan.noise_multiplier, "sample_rate": plan.sample_rate}
    strategy = DPSGDTIStrategy(ledger=ledger, initial=init, ledger_path=out / "ledger.json", plan=plan,
                               control=run_control(cfg, out, unit="record", plan=pinned))
    strategy.start(grid=grid, initial_arrays=embedding_record(init), num_rounds=cfg.dpsgd_rounds, timeout=cfg.round_timeout,
                   train_config=ConfigRecord(plan_record(cfg, None, dpsgd=plan)))
    if not any(strategy.contributors):
        raise RuntimeError("no DP-SGD round produced a valid site embedding: nothing to publish")
    vector = strategy.global_embedding.clone()

    eps = ledger.summary().get("record", {"prv": 0.0, "rdp": 0.0})
    site_prv, site_rdp = strategy.site_epsilons("prv"), strategy.site_epsilons("rdp")
    rates = {e.scope: e.sample_rate for e in ledger.events}
    noises = {e.scope: e.noise_multiplier for e in ledger.events}
    if cfg.private and eps.get("prv") is not None and eps["prv"] > cfg.target_epsilon:
        log.warning("DP-SGD baseline: the ledger's epsilon %.4f exceeds target-epsilon %g", eps["prv"], cfg.target_epsilon)
    privacy = {
        "method": "dp-sgd-ti",
        "unit": "record",
        "private": cfg.private,
        "mechanism": "DP-SGD textual inversion (the baseline of Peetathawatchai et al. 2024): one shared embedding, "
                     "trained on each site with Opacus DP-SGD (each sampled image's gradient clipped to L2 norm C, "
                     "N(0, (zC)^2) noise added to the sum, divided by the public expected batch size q*D, Poisson "
                     "batches at rate q = batch size / D, D = the declared site-dataset-size), averaged uniformly over "
                     "the sites every round",
        "epsilon": eps,
        "headline_accountant": "prv",
        "delta": cfg.target_delta,
        "target_epsilon": None if math.isinf(cfg.target_epsilon) else cfg.target_epsilon,
        "sample_rate": plan.sample_rate,  # public: every site's (per site below, as reported)
        "noise_multiplier": plan.noise_multiplier,
        "site_sample_rates": rates,
        "site_noise_multipliers": noises,
        "declared_site_size": plan.declared_site_size,
        "clip_norm": cfg.dpsgd_max_grad_norm,
        "bound": "clip",
        "centered": False,
        "declared_num_images": cfg.dataset_size,
        "denominator": plan.expected_batch_size,  # q*D: the public expected batch size
        "num_sites": len({n for used in strategy.contributors for n in used}),
        "sites_per_release": [len(used) for used in strategy.contributors],
        "num_releases": len(strategy.contributors),
        "sampling": "poisson" if plan.sample_rate < 1 else "none (every image used)",
        "adjacency": "add/remove one image",
        "accountants": {"prv": "opacus PRVAccountant (eps_error 0.01)", "rdp": "opacus RDPAccountant"},
        "composition": "each site's rounds compose (scope site-<index>); sites hold disjoint images, so the run's "
                       "epsilon is the largest site's (parallel composition)",
        "site_epsilon": {"prv": site_prv, "rdp": site_rdp},
        "post_processing": ["uniform average of the sites' DP-SGD embeddings (post-processing)"],
        "noise_source": noise_source_description(cfg),
        **privacy_statement(run_facts(
            cfg, units=("record",), epsilon={"record": eps}, adjacency={"record": "add/remove one image"},
            contribution="DP-SGD embedding", noise_by="sites",
            diagnostics="its mean DP-SGD training loss" if sends_diagnostics(cfg) else None), "This embedding"),
        **reliability_report(strategy),
        "rejected_replies": strategy.rejected,
        "plan": {
            "rounds": cfg.dpsgd_rounds,
            "local_steps_per_round": cfg.dpsgd_local_steps,
            "batch_size": cfg.dpsgd_batch_size,
            "max_grad_norm": cfg.dpsgd_max_grad_norm,
            "learning_rate": cfg.learning_rate,
            "optimizer": "Adam",
            "noise_multiplier": plan.noise_multiplier,
            "noise_multiplier_source": ("none (non-private)" if not cfg.private else "fixed by noise-multiplier"
                                        if cfg.noise_multiplier >= 0 else
                                        "calibrated (PRV) for rounds x local steps at the declared q, by the server "
                                        "and by each site alike"),
            "sample_rate": plan.sample_rate,
            "declared_site_size": plan.declared_site_size,
            "planned_epsilon_prv": _none_if_inf(plan.planned_epsilon_prv),
            "planned_epsilon_rdp": _none_if_inf(plan.planned_epsilon_rdp),
        },
        "events": [e.to_dict() for e in ledger.events],
        "adapter": {"type": "textual-inversion", "token": cfg.placeholder_token, "dim": init.numel()},
    }
    metrics = {
        **embedding_metrics(vector, init),
        "site_record_epsilon_prv": site_prv,
        "site_record_epsilon_reported": {k: _none_if_inf(v) for k, v in sorted(strategy.reported_epsilons.items())},
    }
    return {"vector": vector, "privacy": privacy, "metrics": metrics}
