"""A site's own privacy policy and lifetime ledger: what the site accepts, not the server.

A site declares its limits in its SuperNode's node config, either as keys prefixed with
``policy-`` (``--node-config "policy-max-epsilon-record=2 policy-max-rounds=10"``) or in a
TOML file named by ``policy-file`` (keys without the prefix); the server cannot change
either. Before it touches its images for a round, the site checks the privacy plan the
server sent with the round (unit, z, q, number of rounds/releases, delta, aggregation mode)
against the policy, recomputing every epsilon with its own accountant rather than trusting
a number from the server. A round that would break the policy is refused with an error that
names the site, the rule and the figures; the site logs it, and what reaches the server (as
the site's error reply) is only the fixed text :data:`common.reasons.SITE_POLICY` (see
:func:`client.app.handle_train`), and the server leaves the site out.

The plan is built from the same plan objects the server's ledger is charged with
(:func:`common.dp.plan.plan_record`): the accounted sampling rate (1 where no amplification by
sampling is claimed), every attempt the plan pays for, and, where the sites run DP-SGD, the
record-level (z, q, steps) the server computes from public settings. The site compares that
DP-SGD plan with its own and refuses a different one, so what it reserves is what is charged.

The lifetime ledger (``ledger`` in the policy) records, at the first round of every run the
site joins, the whole planned spend of that run (every round of the plan, as the accountant
must count them whether or not this site is sampled), and refuses a run whose plan would
take the site's composed epsilon, over all its runs, past ``max-lifetime-epsilon-<unit>``.

What a policy can and cannot enforce: with central noise the site checks the server's
declared plan but cannot see the noise being added (it must trust the server for that, as
for the guarantee itself); with distributed noise (secure aggregation) the site adds its own
share and so enforces ``min-noise-multiplier`` itself.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from common import keys
from common.config import ADAPTERS, METHODS
from common.dp import BudgetCheck, PrivacyEvent, PrivacyLedger


class PolicyError(ValueError):
    """A run or round this site's policy does not allow."""


@dataclass(frozen=True)
class SitePolicy:
    """Limits a site accepts. ``inf``/empty means no limit; every field is optional."""

    max_epsilon_record: float = math.inf  # per run, record-level (one image)
    max_epsilon_site: float = math.inf  # per run, site-level (all of the site's images)
    max_delta: float = 1e-5
    min_noise_multiplier: float = 0.0
    max_rounds: int = 0  # 0: no limit (rounds of LoRA, releases of DPAgg-TI)
    allowed_adapters: tuple[str, ...] = ADAPTERS
    allowed_methods: tuple[str, ...] = METHODS
    allow_non_private: bool = False
    require_secure_aggregation: bool = False
    ledger: str = ""  # path of the site's lifetime ledger ("" = none kept)
    max_lifetime_epsilon_record: float = math.inf
    max_lifetime_epsilon_site: float = math.inf

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str) -> "SitePolicy":
        by_key = {f.name.replace("_", "-"): f for f in fields(cls)}
        unknown = sorted(set(values) - set(by_key))
        if unknown:
            raise ValueError(f"{source}: unknown policy key(s) {unknown}; known: {sorted(by_key)}")
        out: dict[str, Any] = {}
        for key, raw in values.items():
            f = by_key[key]
            try:
                if isinstance(f.default, tuple):
                    items = raw if isinstance(raw, (list, tuple)) else str(raw).split(",")
                    out[f.name] = tuple(str(i).strip() for i in items if str(i).strip())
                elif isinstance(f.default, bool):
                    if str(raw).lower() not in ("true", "false", "1", "0"):
                        raise ValueError("expected true or false")
                    out[f.name] = str(raw).lower() in ("true", "1")
                elif isinstance(f.default, int):
                    out[f.name] = int(raw)
                elif isinstance(f.default, float):
                    out[f.name] = float(raw)
                else:
                    out[f.name] = str(raw)
            except (TypeError, ValueError) as err:
                raise ValueError(f"{source}: policy key {key!r}: cannot read {raw!r}: {err}") from None
        return cls(**out)


def load_policy(node_config: Mapping[str, Any]) -> SitePolicy | None:
    """The site's policy from its node config (``policy-file`` and/or ``policy-*`` keys);
    None when the site declared none (it then accepts any run, as before)."""
    values: dict[str, Any] = {}
    if node_config.get("policy-file"):
        path = Path(str(node_config["policy-file"])).expanduser()
        try:
            values.update(tomllib.loads(path.read_text()))
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise ValueError(f"policy-file {path}: cannot read it: {err}") from None
    values.update({k[len("policy-"):]: v for k, v in node_config.items() if k.startswith("policy-") and k != "policy-file"})
    if not values:
        return None
    return SitePolicy.from_mapping(values, str(node_config.get("policy-file") or "node config"))


@dataclass(frozen=True)
class RoundPlan:
    """The privacy plan of the run as the server declares it with every round.

    ``events`` are the planned privacy events of the whole run, per unit, as the site
    recomputes them (for DP-SGD the record-level event is the site's own).
    """

    run_id: int
    round: int
    adapter: str
    method: str
    aggregation: str
    delta: float
    rounds: int
    events: tuple[PrivacyEvent, ...]

    @property
    def private(self) -> bool:
        return all(e.noise_multiplier > 0 for e in self.events) and bool(self.events)


def check_round(policy: SitePolicy, plan: RoundPlan, site: str) -> None:
    """Raise :class:`PolicyError` naming the rule if this round breaks the policy."""

    def refuse(what: str) -> None:
        raise PolicyError(f"{site}: refused by the site's privacy policy: {what}")

    if plan.adapter not in policy.allowed_adapters:
        refuse(f"adapter {plan.adapter!r} is not in allowed-adapters {list(policy.allowed_adapters)}")
    if plan.method not in policy.allowed_methods:
        refuse(f"method {plan.method!r} is not in allowed-methods {list(policy.allowed_methods)}")
    if policy.require_secure_aggregation and plan.aggregation == "central":
        refuse("require-secure-aggregation is set, but the run aggregates in the clear (central noise)")
    if not plan.private:
        if not policy.allow_non_private:
            refuse("the run is non-private (no noise) and allow-non-private is false")
        return
    if plan.delta > policy.max_delta:
        refuse(f"delta {plan.delta:g} is above max-delta {policy.max_delta:g}")
    if policy.max_rounds and plan.rounds > policy.max_rounds:
        refuse(f"the run plans {plan.rounds} rounds, above max-rounds {policy.max_rounds}")
    if plan.round > plan.rounds:
        refuse(f"round {plan.round} is beyond the {plan.rounds} round(s) of the declared plan")
    for e in plan.events:
        if e.noise_multiplier < policy.min_noise_multiplier:
            refuse(f"{e.unit}-level noise multiplier {e.noise_multiplier:.4g} is below min-noise-multiplier "
                   f"{policy.min_noise_multiplier:g}")
    for unit, limit in (("record", policy.max_epsilon_record), ("site", policy.max_epsilon_site)):
        check = BudgetCheck((), [e for e in plan.events if e.unit == unit], limit, plan.delta, "prv")
        if check.over:
            refuse(f"the run's {unit}-level epsilon is {check.epsilon:.4f} (PRV, delta {plan.delta:g}, recomputed by "
                   f"the site), above max-epsilon-{unit} {limit:g}")


def reserve_run(policy: SitePolicy, plan: RoundPlan, site: str) -> None:
    """Record the run's planned spend in the site's lifetime ledger at its first round, after
    checking it against the lifetime limits. Idempotent for later rounds of the same run."""
    if not policy.ledger or not plan.private:
        return
    path = Path(policy.ledger).expanduser()
    ledger = PrivacyLedger.load(path) if path.exists() else PrivacyLedger(delta=policy.max_delta)
    label = f"run {plan.run_id}"
    if any(e.label == label for e in ledger.events):
        return
    for unit, limit in (("record", policy.max_lifetime_epsilon_record), ("site", policy.max_lifetime_epsilon_site)):
        check = BudgetCheck([e for e in ledger.events if e.unit == unit], [e for e in plan.events if e.unit == unit],
                            limit, ledger.delta, "prv")
        if check.over:
            raise PolicyError(
                f"{site}: refused by the site's privacy policy: with this run its lifetime {unit}-level epsilon "
                f"would be {check.epsilon:.4f} (PRV, delta {ledger.delta:g}, {len({e.label for e in check.spent})} "
                f"earlier run(s)), above max-lifetime-epsilon-{unit} {limit:g}")
    for e in plan.events:
        ledger.record(PrivacyEvent.planned(e.noise_multiplier, e.sample_rate, e.steps, e.unit, label=label))
    ledger.save(path)


def sent_dpsgd_event(config: Mapping[str, Any]) -> PrivacyEvent | None:
    """The record-level DP-SGD plan the server sent (z, q, steps over the run), if any."""
    if keys.PLAN_DPSGD_NOISE_MULTIPLIER not in config:
        return None
    return PrivacyEvent.dpsgd(float(config[keys.PLAN_DPSGD_NOISE_MULTIPLIER]),
                              float(config[keys.PLAN_DPSGD_SAMPLE_RATE]), int(config[keys.PLAN_DPSGD_STEPS]))


def plan_from_message(config: Mapping[str, Any], run_id: int, record_event: PrivacyEvent | None) -> RoundPlan:
    """The plan the server sent in a round's ConfigRecord, as a :class:`RoundPlan`.

    ``record_event`` is the site's own DP-SGD plan (record-level), when it trains with DP-SGD.
    The server computes the same plan from the same public settings and charges it; a sent
    DP-SGD plan that differs from the site's own is refused (:class:`PolicyError`): the
    server's ledger would not be what the site spends.
    """
    unit = str(config.get(keys.PLAN_UNIT, ""))
    z = float(config.get(keys.PLAN_NOISE_MULTIPLIER, 0.0))
    q = float(config.get(keys.PLAN_SAMPLE_RATE, 1.0))
    steps = int(config.get(keys.PLAN_STEPS, 1))
    events: list[PrivacyEvent] = []
    if unit in ("record", "site") and z >= 0:
        events.append(PrivacyEvent.planned(z, q, steps, unit))  # type: ignore[arg-type]
    sent = sent_dpsgd_event(config)
    if sent is not None and record_event is not None and not sent.spends_as(record_event):
        raise PolicyError(
            f"the server's DP-SGD plan (z={sent.noise_multiplier:.6g}, q={sent.sample_rate:.6g}, {sent.steps} steps) "
            f"differs from this site's own (z={record_event.noise_multiplier:.6g}, q={record_event.sample_rate:.6g}, "
            f"{record_event.steps} steps): refusing before any training")
    if record_event is not None or sent is not None:
        events.append(record_event or sent)  # type: ignore[arg-type]
    method = str(config.get(keys.DEFENSE) or config.get(keys.METHOD, ""))
    return RoundPlan(
        run_id=run_id, round=int(config.get(keys.ROUND, 1)), adapter=str(config.get(keys.ADAPTER, "ti")),
        method=method, aggregation=str(config.get(keys.AGGREGATION, "central")),
        delta=float(config.get(keys.PLAN_DELTA, 1e-5)), rounds=int(config.get(keys.PLAN_ROUNDS, steps)),
        events=tuple(events),
    )
