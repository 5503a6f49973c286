"""The run configuration: kebab-case Flower run-config keys -> one typed, validated dataclass.

Flower passes ``[tool.flwr.app.config]`` (overridable with ``--run-config``) to both apps as
a flat dict of scalars. :func:`RunConfig.from_run_config` reads it once, converts and
validates every value, and rejects unknown keys, so a typo fails at start-up with the key's
name instead of silently falling back to a default.
"""

from __future__ import annotations

import math
import shlex
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from common.paths import REPO_ROOT

ADAPTERS = ("ti", "lora")
TI_METHODS = ("dpagg", "dp-sgd")
ADVERSARIAL_DEFENSES = ("mp-lora", "smp-lora")  # empirical membership-inference defences: no formal guarantee
# LoRA defenses that run Opacus-style DP-SGD on every site (record-level DP), each with the number of
# DP-SGD mechanisms one local step runs on the site's images, which the accountant composes:
# "smp-dp-sgd" (client.smp_dpsgd) runs SMP-LoRA inside DP-SGD, the proxy attacker's step and the
# adapter's step both clipped per image and noised
DPSGD_MECHANISMS_PER_STEP = {"dp-sgd": 1, "smp-dp-sgd": 2}
RECORD_DP_DEFENSES = tuple(DPSGD_MECHANISMS_PER_STEP)
# the defenses that train a proxy membership attacker on the site's member / non-member split
PROXY_ATTACKER_DEFENSES = (*ADVERSARIAL_DEFENSES, "smp-dp-sgd")
DEFENSES = ("none", *ADVERSARIAL_DEFENSES, *RECORD_DP_DEFENSES)
# "lora": A and B train (Hu et al. 2022); "ffa": FFA-LoRA (Sun et al., ICLR 2024, arXiv 2403.12313),
# A frozen at a public seeded initialisation and only B trained, clipped, noised and released
LORA_VARIANTS = ("lora", "ffa")
# The method a round's plan names (a TI method or a LoRA defense), each once: what a site's
# policy allows by default (client.policy.SitePolicy.allowed_methods).
METHODS = tuple(dict.fromkeys(TI_METHODS + DEFENSES))
AGGREGATIONS = ("central", "secure", "distributed")
BOUND_MODES = ("clip", "normalize")
RESCALE_MODES = ("none", "initializer-norm")
PREDICTION_TYPES = ("epsilon", "v_prediction")
RESUME_MODES = ("auto", "never")
SHORT_ROUND_POLICIES = ("skip", "retry")
# Where privacy noise and privacy sampling come from: the OS CSPRNG ("os", the only private
# choice), or generators seeded from the run seed ("seeded-insecure": tests and replayable
# research; anyone who knows the seed can regenerate the noise, so such a run claims no DP).
PRIVACY_RANDOMNESS = ("os", "seeded-insecure")


@dataclass(frozen=True)
class RunConfig:
    """Every setting of a privadapt run. Field ``foo_bar`` is run-config key ``foo-bar``."""

    # what to adapt and how
    adapter: str = "ti"
    ti_method: str = "dpagg"
    # privacy
    target_epsilon: float = 1.0
    target_delta: float = 1e-5
    noise_multiplier: float = -1.0  # < 0: calibrate to target-epsilon
    sampling_rate: float = 0.5
    clip_norm: float = 0.05
    bound: str = "clip"
    center: bool = True
    dataset_size: int = 48  # declared PUBLIC total number of images across sites (N)
    num_releases: int = 1
    rescale: str = "none"
    privacy_randomness: str = "os"  # "os": OS CSPRNG (private); "seeded-insecure": replayable, NOT private
    aggregation: str = "central"  # "central", "secure" (SecAgg, server noise), "distributed" (SecAgg, site noise)
    # refuse a private run whose planned noise on the published mean exceeds the largest possible
    # signal (C) by more than this factor (common.dp.plan.signal_to_noise); inf: never (research)
    max_noise_to_signal: float = 10.0
    # textual inversion
    ti_steps: int = 100
    learning_rate: float = 5e-3
    batch_size: int = 16
    initializer_token: str = "emoji"
    placeholder_token: str = "<S*>"
    prompt_template: str = "{caption} in the style of {token}"
    default_caption: str = "an image"
    # DP-SGD baseline (ti-method = "dp-sgd")
    dpsgd_rounds: int = 3
    dpsgd_local_steps: int = 10
    dpsgd_batch_size: int = 4
    dpsgd_max_grad_norm: float = 0.1
    # LoRA with site-level DP-FedAvg (adapter = "lora")
    defense: str = "none"  # local training: plain LoRA, MP-LoRA, SMP-LoRA, or Opacus DP-SGD
    rounds: int = 3  # T federated rounds
    site_sampling_rate: float = 1.0  # q: each site takes part in a round with this probability
    num_sites: int = 0  # declared PUBLIC number of sites K (required by private LoRA runs); 0 = not declared
    lora_clip_norm: float = 0.1  # C: bound on a site's delta, flat L2 norm over all adapter tensors
    server_learning_rate: float = 1.0
    local_steps: int = 10
    lora_batch_size: int = 4
    lora_learning_rate: float = 1e-3
    lora_rank: int = 4
    lora_alpha: float = 4.0
    lora_targets: str = "to_q,to_k,to_v,to_out.0"
    lora_text_encoder: bool = False
    lora_variant: str = "lora"  # "ffa": FFA-LoRA, A frozen at a public seeded init, only B trained and released
    smp_lambda: float = 0.05
    member_fraction: float = 0.5
    aux_fraction: float = 0.5
    attacker_learning_rate: float = 1e-5
    attacker_weight_decay: float = 1e-4
    record_target_epsilon: float = 0.0  # defense = dp-sgd / smp-dp-sgd: record-level target; <= 0 means target-epsilon
    site_diagnostics: bool = False  # opt-in: sites send loss / attacker accuracy / clipping (NOT private) to the server
    site_dataset_size: int = 0  # declared PUBLIC upper bound on one site's number of images; 0 = dataset-size
    # reliability
    resume: str = "auto"  # "auto": go on from output-dir's checkpoint if the config matches; "never": refuse one
    min_sites: int = 0  # a round with fewer valid site contributions is short (charged, not applied); 0: never
    short_round: str = "skip"  # "skip" a short round, or "retry" it with a fresh sample (within max-retries)
    max_retries: int = 0  # retries allowed over the whole run; the plan's noise covers rounds + max-retries
    round_timeout: float = 3600.0  # seconds the server waits for a round's replies; late sites are left out
    # model, data, outputs
    model_path: str = ""  # "" = the embedded tiny model, built on first use
    data_path: str = "data/demo"  # holds site-<partition-id>/ folders
    output_dir: str = "outputs/run"
    resolution: int = 64
    device: str = "auto"
    seed: int = 0
    sample_prompts: str = "an emoji of a cat|an emoji of a dog|an emoji of a fox|an emoji of a lion"
    sample_steps: int = 25
    sample_guidance: float = 5.0

    def __post_init__(self) -> None:
        problems: list[str] = []

        def need(ok: bool, key: str, what: str) -> None:
            if not ok:
                problems.append(f"{key.replace('_', '-')}: {what} (got {getattr(self, key)!r})")

        need(self.adapter in ADAPTERS, "adapter", f"must be one of {ADAPTERS}")
        need(self.defense in DEFENSES, "defense", f"must be one of {DEFENSES}")
        need(self.adapter == "lora" or self.defense == "none", "defense", "applies to adapter 'lora' only")
        need(self.aggregation in AGGREGATIONS, "aggregation", f"must be one of {AGGREGATIONS}")
        need(self.aggregation == "central" or (self.ti_method == "dpagg" and not self.site_dpsgd), "aggregation",
             "secure aggregation carries DPAgg-TI sums and LoRA deltas only (not the DP-SGD baselines' reports)")
        need(self.aggregation == "central" or self.private, "aggregation",
             "secure aggregation needs a private run (non-private runs have no noise to distribute)")
        need(self.rounds >= 1, "rounds", "must be >= 1")
        need(0 < self.site_sampling_rate <= 1, "site_sampling_rate", "must be in (0, 1]")
        need(self.num_sites >= 0, "num_sites", "must be >= 0")
        need(self.num_sites >= 1 or self.adapter != "lora" or not self.private, "num_sites",
             "a private LoRA run (site-level DP-FedAvg) needs the declared public number of sites K (num-sites >= 1): "
             "it is never read from who connected")
        need(self.privacy_randomness in PRIVACY_RANDOMNESS, "privacy_randomness", f"must be one of {PRIVACY_RANDOMNESS}")
        need(self.aggregation != "distributed" or self.privacy_randomness == "os", "privacy_randomness",
             "distributed aggregation needs secret noise shares: 'os' only (a seeded share could be rebuilt by the server)")
        need(self.site_dataset_size >= 0, "site_dataset_size", "must be >= 0 (0: dataset-size)")
        need(math.isfinite(self.lora_clip_norm) and self.lora_clip_norm > 0, "lora_clip_norm", "must be finite and > 0")
        need(math.isfinite(self.server_learning_rate) and self.server_learning_rate > 0, "server_learning_rate", "must be > 0")
        need(self.local_steps >= 1, "local_steps", "must be >= 1")
        need(self.lora_batch_size >= 1, "lora_batch_size", "must be >= 1")
        need(self.lora_learning_rate > 0, "lora_learning_rate", "must be > 0")
        need(self.lora_rank >= 1, "lora_rank", "must be >= 1")
        need(self.lora_alpha > 0, "lora_alpha", "must be > 0")
        need(bool(self.lora_target_list), "lora_targets", "must name at least one module")
        need(not (self.site_dpsgd and self.lora_text_encoder), "lora_text_encoder",
             f"defense {self.defense!r} trains the UNet's LoRA only (per-image gradients): set it to false")
        need(self.lora_variant in LORA_VARIANTS, "lora_variant", f"must be one of {LORA_VARIANTS}")
        need(self.adapter == "lora" or self.lora_variant == "lora", "lora_variant", "applies to adapter 'lora' only")
        need(self.smp_lambda >= 0, "smp_lambda", "must be >= 0")
        need(0 < self.member_fraction < 1, "member_fraction", "must be in (0, 1)")
        need(0 < self.aux_fraction < 1, "aux_fraction", "must be in (0, 1)")
        need(self.attacker_learning_rate > 0, "attacker_learning_rate", "must be > 0")
        need(self.attacker_weight_decay >= 0, "attacker_weight_decay", "must be >= 0")
        need(not math.isnan(self.record_target_epsilon), "record_target_epsilon", "must be a number")
        need(self.ti_method in TI_METHODS, "ti_method", f"must be one of {TI_METHODS}")
        need(self.target_epsilon > 0, "target_epsilon", "must be > 0 (use 'inf' for non-private)")
        need(0 < self.target_delta < 1, "target_delta", "must be in (0, 1)")
        need(math.isfinite(self.noise_multiplier), "noise_multiplier", "must be finite")
        need(self.max_noise_to_signal > 0, "max_noise_to_signal", "must be > 0 (use 'inf' to disable the check)")
        need(0 < self.sampling_rate <= 1, "sampling_rate", "must be in (0, 1]")
        need(math.isfinite(self.clip_norm) and self.clip_norm > 0, "clip_norm", "must be finite and > 0")
        need(self.bound in BOUND_MODES, "bound", f"must be one of {BOUND_MODES}")
        need(self.dataset_size > 0, "dataset_size", "must be > 0 (the declared public number of images)")
        need(self.num_releases >= 1, "num_releases", "must be >= 1")
        need(self.rescale in RESCALE_MODES, "rescale", f"must be one of {RESCALE_MODES}")
        need(self.ti_steps >= 1, "ti_steps", "must be >= 1")
        need(self.learning_rate > 0, "learning_rate", "must be > 0")
        need(self.batch_size >= 1, "batch_size", "must be >= 1")
        need(bool(self.initializer_token.strip()), "initializer_token", "must not be empty")
        need(bool(self.placeholder_token.strip()) and " " not in self.placeholder_token, "placeholder_token", "must be one word")
        need("{token}" in self.prompt_template, "prompt_template", "must contain {token}")
        need(self.dpsgd_rounds >= 1, "dpsgd_rounds", "must be >= 1")
        need(self.dpsgd_local_steps >= 1, "dpsgd_local_steps", "must be >= 1")
        need(self.dpsgd_batch_size >= 1, "dpsgd_batch_size", "must be >= 1")
        need(self.dpsgd_max_grad_norm > 0, "dpsgd_max_grad_norm", "must be > 0")
        need(self.resolution >= 8 and self.resolution % 8 == 0, "resolution", "must be a positive multiple of 8")
        need(self.sample_steps >= 1, "sample_steps", "must be >= 1")
        need(self.resume in RESUME_MODES, "resume", f"must be one of {RESUME_MODES}")
        need(self.min_sites >= 0, "min_sites", "must be >= 0 (0: no minimum)")
        need(self.short_round in SHORT_ROUND_POLICIES, "short_round", f"must be one of {SHORT_ROUND_POLICIES}")
        need(self.max_retries >= 0, "max_retries", "must be >= 0")
        need(self.short_round == "retry" or self.max_retries == 0, "max_retries", "needs short-round = 'retry'")
        need(math.isfinite(self.round_timeout) and self.round_timeout > 0, "round_timeout", "must be finite and > 0")
        if problems:
            raise ValueError("invalid run config:\n  " + "\n  ".join(problems))

    @property
    def private(self) -> bool:
        """False in non-private mode (target-epsilon = inf): no sampling, no noise."""
        return not math.isinf(self.target_epsilon)

    @property
    def secret_randomness(self) -> bool:
        """True when privacy noise and privacy sampling come from the OS CSPRNG (the only mode that claims DP)."""
        return self.privacy_randomness == "os"

    @property
    def declared_site_size(self) -> int:
        """The declared public upper bound on one site's images (``site-dataset-size``, else ``dataset-size``)."""
        return self.site_dataset_size or self.dataset_size

    @property
    def effective_sampling_rate(self) -> float:
        return self.sampling_rate if self.private else 1.0

    @property
    def effective_site_sampling_rate(self) -> float:
        return self.site_sampling_rate if self.private else 1.0

    @property
    def site_dpsgd(self) -> bool:
        """True when every LoRA site runs DP-SGD (defense ``dp-sgd`` or ``smp-dp-sgd``): record-level DP."""
        return self.adapter == "lora" and self.defense in RECORD_DP_DEFENSES

    @property
    def record_epsilon_target(self) -> float:
        """Record-level target of DP-SGD inside a site (defense dp-sgd or smp-dp-sgd)."""
        return self.record_target_epsilon if self.record_target_epsilon > 0 else self.target_epsilon

    @property
    def planned_attempts_extra(self) -> int:
        """Round attempts beyond ``rounds`` / ``num-releases`` the plan must pay for (retries)."""
        return self.max_retries if self.short_round == "retry" else 0

    @property
    def lora_target_list(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())

    @property
    def prompts(self) -> list[str]:
        return [p.strip() for p in self.sample_prompts.split("|") if p.strip()]

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "RunConfig":
        """Build from Flower's run config (kebab-case keys); unknown keys are an error."""
        by_key = {f.name.replace("_", "-"): f for f in fields(cls)}
        unknown = sorted(set(run_config) - set(by_key))
        if unknown:
            raise ValueError(f"unknown run-config key(s) {unknown}; known keys: {sorted(by_key)}")
        values: dict[str, Any] = {}
        for key, raw in run_config.items():
            f = by_key[key]
            values[f.name] = _convert(key, raw, type(f.default))
        return cls(**values)

    def to_run_config(self) -> dict[str, Any]:
        """The inverse of :meth:`from_run_config` (infinity as the string 'inf')."""
        out = {}
        for k, v in asdict(self).items():
            out[k.replace("_", "-")] = "inf" if isinstance(v, float) and math.isinf(v) else v
        return out


def _convert(key: str, raw: Any, kind: type) -> Any:
    try:
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            if str(raw).lower() in ("true", "1", "yes"):
                return True
            if str(raw).lower() in ("false", "0", "no"):
                return False
            raise ValueError("expected true or false")
        if kind is int:
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError("expected an integer")
            return int(raw)
        if kind is float:
            if isinstance(raw, bool):
                raise ValueError("expected a number")
            return float(raw)  # accepts "inf"
        return str(raw)
    except (TypeError, ValueError) as err:
        raise ValueError(f"run-config key {key!r}: cannot read {raw!r} as {kind.__name__}: {err}") from None


def pyproject_run_config(path: Path = REPO_ROOT / "pyproject.toml") -> dict[str, Any]:
    """The run config's defaults: ``[tool.flwr.app.config]`` of pyproject.toml (what ``flwr run .`` uses)."""
    return dict(tomllib.loads(path.read_text())["tool"]["flwr"]["app"]["config"])


def parse_overrides(text: str) -> dict[str, Any]:
    """Flower's ``--run-config`` syntax: space-separated key=value, values as TOML scalars."""
    out: dict[str, Any] = {}
    for item in shlex.split(text):
        if "=" not in item:
            raise ValueError(f"--run-config item {item!r} is not key=value")
        key, raw = item.split("=", 1)
        try:
            out[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = raw  # bare strings need no quotes
    return out
