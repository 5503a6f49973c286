"""privadapt ClientApp: one site's local work for a round.

The site reads the run config (the same on every site), loads its own images from its
data folder, and answers the server's train message with DPAgg-TI's sum of bounded
per-image embeddings, a DP-SGD update of the shared embedding, or its clipped LoRA delta
(plain LoRA, MP-LoRA, SMP-LoRA, DP-SGD or SMP-LoRA inside DP-SGD local training; the proxy attacker stays in
the site's ``context.state`` and never leaves the site). A reply holds the privatised
contribution and, for DP-SGD, the public parameters of the site's spend; nothing else
derived from the images (losses, norms, counts) unless the site's own run config opts in
with ``site-diagnostics = true`` (:func:`site_report`).

An image that cannot be used is left out as absent and logged here, on the site only (see
:func:`common.data.load_site_images`). Any error that makes the site refuse a round is
logged here in full, and what leaves the site is a :class:`~common.reasons.SiteRefusal`
with one fixed text (:data:`common.reasons.SITE_REFUSALS`): no file name, path or exception
text. Flower turns it into an error reply, and the server leaves this site out of the round
without stopping the others.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.dpagg import site_contribution
from client.policy import PolicyError, check_round, load_policy, plan_from_message, reserve_run
from common import keys
from common.config import RunConfig
from common.data import SiteDataError, SiteImages, load_site_images
from common.dp import GaussianSumMechanism, NoiseSource, PrivacyEvent
from common.dp.sampling import privacy_sampling
from common.lora import (
    LoRASpec,
    attach_lora,
    flat_norm,
    frozen_state,
    init_frozen_a,
    load_lora_state,
    lora_state,
    tree_digest,
    tree_shapes,
    tree_sub,
)
from common.models import load_pipeline
from common.paths import derive_seed, resolve
from common.reasons import SITE_DATA, SITE_INTERNAL, SITE_POLICY, SITE_PROTOCOL, SiteRefusal
from common.secagg.protocol import STAGE as SECAGG_STAGE
from common.settings import lora_init_seed, lora_spec, model_dir, sends_diagnostics, ti_settings
from common.wire import packed_record, record_tree

log = logging.getLogger("privadapt.client")

# Pipelines stay resident in the site's process across rounds (one per model, device and
# adapter shape): a LoRA pipeline carries its attached adapter, a TI one carries none.
_PIPELINES: dict[tuple[str, str, LoRASpec | None], Any] = {}
ATTACKER_KEY = "privadapt-attacker"  # ConfigRecord in context.state: the SMP/MP proxy attacker


def get_pipeline(cfg: RunConfig, spec: LoRASpec | None = None):
    key = (model_dir(cfg), cfg.device, spec)
    if key not in _PIPELINES:
        pipe = load_pipeline(key[0], device=cfg.device)
        if spec is not None:
            # the trained tensors are overwritten by the server's adapter every round (FFA's A: see check_frozen_a)
            attach_lora(pipe, spec, seed=lora_init_seed(cfg))
        _PIPELINES[key] = pipe
    return _PIPELINES[key]


def site_identity(node_config: Mapping[str, Any], cfg: RunConfig) -> tuple[int, str, str]:
    """(index, name, data folder) of this site. A deployed SuperNode names its own folder
    with node-config ``data-path``; in simulation it is ``<data-path>/site-<partition-id>``."""
    index = int(node_config.get("partition-id", 0))
    folder = node_config.get("data-path") or str(resolve(cfg.data_path) / f"site-{index}")
    return index, str(node_config.get("site-name", f"site-{index}")), str(resolve(folder))


def load_images(cfg: RunConfig, name: str, folder: str) -> SiteImages:
    """This site's usable images; each one left out (unusable, or a copy) is logged here,
    on the site only: the names are private."""
    images = load_site_images(folder, site=name, resolution=cfg.resolution)
    for problem in images.skipped:
        log.warning("%s: left out of the data (treated as absent): %s", name, problem)
    if not images.names:
        log.warning("%s: no usable image in %s", name, folder)
    return images


def require_images(images: SiteImages, folder: str, *, dpsgd: bool = False) -> SiteImages:
    """``images``, or SiteDataError if there is none and the training needs one. DPAgg-TI
    never does (a site without images sends a zero sum, like one that sampled none), nor does
    private DP-SGD (a site without images takes noise-only steps, like one whose Poisson
    batches were all empty): under record-level DP, whether a site answers must not depend on
    whether it holds an image."""
    if not images.names and not dpsgd:
        raise SiteDataError(images.site, folder, "no usable image to train on")
    return images


def padding_capacity(cfg: RunConfig) -> int:
    """The public number of rows a site pads its batched DPAgg-TI run to (0: no padding).

    In ``secure`` and ``distributed`` aggregation the server does not see a site's sum, but
    it sees how long the site takes to answer, and the unpadded run's time grows with the
    site's secret Poisson count. There the site pads to the declared public bound on a
    site's images (``site-dataset-size``, else ``dataset-size``). In ``central`` mode the
    server is trusted and sees each site's sum anyway: no padding, the run stays fast."""
    return cfg.declared_site_size if cfg.aggregation != "central" else 0


def warn_over_capacity(name: str, num_images: int, capacity: int) -> None:
    """Logged on the site only: more images than the declared capacity. The DP release is
    unaffected, but a release that samples more than ``capacity`` of them takes longer than
    one that does not, which the server can time."""
    if capacity and num_images > capacity:
        log.warning("%s: %d images, more than the declared site capacity %d (site-dataset-size): a release that "
                    "samples more than %d of them is padded to its own size, so its timing is no longer constant; "
                    "declare a larger site-dataset-size (check-data reports it)", name, num_images, capacity, capacity)


def dpagg_contribution(msg: Message, cfg: RunConfig, index: int, name: str, folder: str) -> torch.Tensor:
    """This site's DPAgg-TI sum of bounded per-image embeddings (float64 [D])."""
    release = int(msg.content[keys.CONFIG][keys.ROUND])
    images = load_images(cfg, name, folder)
    capacity = padding_capacity(cfg)
    warn_over_capacity(name, len(images.names), capacity)
    pipe = get_pipeline(cfg)
    mechanism = GaussianSumMechanism(clip_norm=cfg.clip_norm, noise_multiplier=0.0, bound_mode=cfg.bound)
    training = torch.Generator(device=pipe.unet.device)
    training.manual_seed(derive_seed(cfg.seed, "train", index, release))
    contribution = site_contribution(
        pipe,
        images,
        ti_settings(cfg),
        mechanism,
        sample_rate=cfg.effective_sampling_rate,
        center=cfg.center,
        sampling=privacy_sampling(cfg.secret_randomness, cfg.seed, "sample", index, release),
        training=training,
        pad_to=capacity,
    )
    # Logged on the site only: the count of sampled images is private.
    log.info("%s release %d: %d of %d images sampled, %d clipped", name, release,
             contribution.num_sampled, len(images.names), contribution.num_clipped)
    return contribution.total


def site_report(metrics: Mapping[str, float], cfg: RunConfig) -> dict[str, float]:
    """The figures a reply may carry besides the contribution: the public parameters of a
    DP-SGD site's spend (z, q, steps, index and the epsilon they give), and the diagnostics
    (losses, proxy-attacker accuracy, delta norm, clipping: not private) only if
    :func:`sends_diagnostics`. Anything else in ``metrics`` stays on the site."""
    report = {k: metrics[k] for k in keys.SITE_SPEND if k in metrics}
    if sends_diagnostics(cfg):
        report.update({k: float(metrics[k]) for k in keys.DIAGNOSTICS if k in metrics})
    return report


def reply_content(arrays: ArrayRecord, report: Mapping[str, float]) -> RecordDict:
    """A reply: the privatised contribution, and a MetricRecord only if there is a report."""
    content = RecordDict({keys.ARRAYS: arrays})
    if report:
        content[keys.METRICS] = MetricRecord(dict(report))
    return content


def dpagg_reply(msg: Message, cfg: RunConfig, index: int, name: str, folder: str) -> RecordDict:
    """The sum of bounded embeddings alone: DPAgg-TI sites send no figures at all."""
    total = dpagg_contribution(msg, cfg, index, name, folder)
    arrays = ArrayRecord(array_dict={keys.EMBEDDING_SUM: Array(total.numpy().astype(np.float64))})
    return reply_content(arrays, {})


def dpsgd_reply(msg: Message, context: Context, cfg: RunConfig, index: int, name: str, folder: str) -> RecordDict:
    from client.dpsgd_ti import dpsgd_site_round  # Opacus is only needed for the baseline

    images = require_images(load_images(cfg, name, folder), folder, dpsgd=cfg.private)
    global_embedding = torch.from_numpy(msg.content[keys.ARRAYS][keys.EMBEDDING].numpy()).float()
    update, metrics = dpsgd_site_round(
        get_pipeline(cfg), images, ti_settings(cfg), cfg, global_embedding,
        state=context.state, site_index=index, round_index=int(msg.content[keys.CONFIG][keys.ROUND]),
    )
    arrays = ArrayRecord(array_dict={keys.EMBEDDING: Array(update.numpy().astype(np.float32))})
    return reply_content(arrays, site_report(metrics, cfg))


def lora_train_settings(cfg: RunConfig):
    from client.lora_train import LoRATrainSettings

    return LoRATrainSettings(
        steps=cfg.local_steps, batch_size=cfg.lora_batch_size, learning_rate=cfg.lora_learning_rate,
        defense=cfg.defense, smp_lambda=cfg.smp_lambda, member_fraction=cfg.member_fraction,
        aux_fraction=cfg.aux_fraction, attacker_learning_rate=cfg.attacker_learning_rate,
        attacker_weight_decay=cfg.attacker_weight_decay, default_caption=cfg.default_caption,
    )


def train_lora(pipe, spec: LoRASpec, images: SiteImages, cfg: RunConfig, context: Context, defense: str, index: int,
               round_index: int) -> dict[str, float]:
    """Run this round's local training on the pipeline's adapter, in place; return metrics."""
    if defense == "dp-sgd":
        from client.dpsgd_lora import dpsgd_lora_round

        return dpsgd_lora_round(pipe, spec, images, cfg, state=context.state, site_index=index, round_index=round_index)
    saved = context.state.get(ATTACKER_KEY)
    if defense == "smp-dp-sgd":
        from client.smp_dpsgd import smp_dpsgd_round

        metrics, attacker = smp_dpsgd_round(pipe, spec, images, cfg, state=context.state, site_index=index,
                                            round_index=round_index,
                                            attacker_state=bytes(saved["state"]) if saved is not None else None)
        context.state[ATTACKER_KEY] = ConfigRecord({"state": attacker})  # h stays on the site
        return dict(metrics)
    from client.lora_train import train_lora_locally

    training = torch.Generator(device=pipe.unet.device)
    training.manual_seed(derive_seed(cfg.seed, "lora-train", index, round_index))
    result = train_lora_locally(
        pipe, spec, images, lora_train_settings(cfg), generator=training,
        split_seed=derive_seed(cfg.seed, "member-split", index),  # the same split every round
        attacker_state=bytes(saved["state"]) if saved is not None else None,
    )
    if result.attacker_state is not None:
        context.state[ATTACKER_KEY] = ConfigRecord({"state": result.attacker_state})
    return dict(result.metrics)


def check_frozen_a(pipe, spec: LoRASpec, cfg: RunConfig, config: ConfigRecord, name: str) -> None:
    """FFA-LoRA: draw the public frozen A from the run seed (again: a resident pipeline may come
    from a run with another seed; it is cheap) and refuse the round unless the server's A,
    named by its digest in the round's config, is this site's bit for bit: B trained against
    another A would be meaningless in the published adapter."""
    if not spec.frozen_a:
        return
    init_frozen_a(pipe, spec, seed=lora_init_seed(cfg))
    mine, sent = tree_digest(frozen_state(pipe, spec)), str(config.get(keys.LORA_FROZEN_A, ""))
    if sent != mine:
        raise ValueError(f"{name}: the server's frozen FFA-LoRA A (digest {sent or 'none sent'}) is not this site's "
                         f"({mine}): another seed, adapter shape or torch build")


def lora_contribution(msg: Message, context: Context, cfg: RunConfig, index: int, name: str,
                      folder: str) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Train from the server's adapter; return the delta clipped to ``lora-clip-norm``
    (float64 tree; FFA-LoRA: of the B matrices only) and the site's report
    (:func:`site_report`: the public DP-SGD parameters, plus the diagnostics only if the site
    opted in)."""
    config = msg.content[keys.CONFIG]
    defense, round_index = str(config[keys.DEFENSE]), int(config[keys.ROUND])
    if defense != cfg.defense:
        raise ValueError(f"{name}: the server asked for defense {defense!r}, the run config says {cfg.defense!r}")
    spec = lora_spec(cfg)
    pipe = get_pipeline(cfg, spec)
    expected = tree_shapes(lora_state(pipe, spec))
    try:
        received = record_tree(msg.content[keys.ARRAYS], expected)
    except ValueError as err:
        raise ValueError(f"{name}: the server's adapter: {err}") from None
    if tree_shapes(received) != expected:
        raise ValueError(f"{name}: the server's adapter does not match this site's LoRA "
                         f"(rank {spec.rank}, targets {','.join(spec.targets)})")
    check_frozen_a(pipe, spec, cfg, config, name)
    images = require_images(load_images(cfg, name, folder), folder, dpsgd=cfg.private and cfg.site_dpsgd)
    load_lora_state(pipe, spec, received)
    metrics = train_lora(pipe, spec, images, cfg, context, defense, index, round_index)
    delta = tree_sub(lora_state(pipe, spec), received)
    norm = flat_norm(delta)
    if cfg.private:
        delta = GaussianSumMechanism(clip_norm=cfg.lora_clip_norm, noise_multiplier=0.0).bound_tree(delta)
    log.info("%s round %d: %s delta norm %.4g (clip bound %g)", name, round_index, defense, norm, cfg.lora_clip_norm)
    metrics.update({keys.DIAG_DELTA_NORM: norm, keys.DIAG_CLIPPED: float(cfg.private and norm > cfg.lora_clip_norm)})
    return delta, site_report(metrics, cfg)


def lora_reply(msg: Message, context: Context, cfg: RunConfig, index: int, name: str, folder: str) -> RecordDict:
    """Train from the server's adapter, clip the delta to ``lora-clip-norm`` and send it."""
    delta, report = lora_contribution(msg, context, cfg, index, name, folder)
    return reply_content(packed_record(delta), report)


def secure_reply(msg: Message, context: Context, cfg: RunConfig, index: int, name: str, folder: str) -> Message:
    """Answer a secure-aggregation stage. The contribution is computed (policy checked,
    images read, training run) only at the setup stage; nothing but masked values, keys and
    shares leaves the site, so no diagnostics are sent in this mode."""
    from client.secagg import handle_secagg

    def contribution() -> dict[str, torch.Tensor]:
        enforce_policy(msg, context, cfg, name)
        method = str(msg.content[keys.CONFIG][keys.METHOD])
        if method == "dpagg":
            return {keys.EMBEDDING_SUM: dpagg_contribution(msg, cfg, index, name, folder)}
        if method == "lora":
            return lora_contribution(msg, context, cfg, index, name, folder)[0]
        raise ValueError(f"{name}: secure aggregation is not available for method {method!r}")

    return handle_secagg(msg, context, contribution, noise=noise_share_source(cfg, name))


def noise_share_source(cfg: RunConfig, name: str) -> NoiseSource:
    """The source of this site's distributed noise share: always the OS CSPRNG.

    A seeded share could be rebuilt by the server from the run seed (and the sum's noise
    removed), so ``distributed`` aggregation refuses seeded randomness here too, even if the
    config check (``RunConfig.__post_init__``) were bypassed. In ``secure`` aggregation the
    sites add no noise (the server does), so the source is never drawn from."""
    if cfg.aggregation == "distributed" and not cfg.secret_randomness:
        raise ValueError(f"{name}: distributed aggregation refuses seeded noise shares "
                         f"(privacy-randomness = {cfg.privacy_randomness!r}): the server could rebuild them")
    return NoiseSource.secure()


def own_dpsgd_event(cfg: RunConfig, context: Context) -> PrivacyEvent | None:
    """The record-level plan of this site's own DP-SGD over the run (None without DP-SGD).

    From public settings only (:mod:`common.dp.dpsgd`: q = dpsgd-batch-size / declared
    site-dataset-size), so it is also what the server computes and charges; the site's
    images are not read."""
    from common.dp.dpsgd import dpsgd_schedule

    schedule = dpsgd_schedule(cfg)
    if schedule is None:
        return None
    from client.site_accountant import site_noise_multiplier

    z = site_noise_multiplier(schedule.budget, schedule.sample_rate, context.state)
    return PrivacyEvent.dpsgd(z, schedule.sample_rate, schedule.budget.total_steps)


def enforce_policy(msg: Message, context: Context, cfg: RunConfig, name: str) -> None:
    """Refuse, before any training, a round whose DP-SGD plan differs from this site's own, or
    that breaks the site's own privacy policy, and reserve the run's planned spend in the
    site's lifetime ledger (see client.policy)."""
    plan = plan_from_message(msg.content[keys.CONFIG], int(context.run_id), own_dpsgd_event(cfg, context))
    policy = load_policy(context.node_config)
    if policy is not None:
        check_round(policy, plan, name)
        reserve_run(policy, plan, name)


SITE_KEYS = ("model-path", "device")  # node-config keys a site may set for itself


def refusal_reason(err: BaseException) -> str:
    """The fixed text (one of :data:`common.reasons.SITE_REFUSALS`) a site sends for ``err``."""
    from client.secagg import SecAggProtocolError

    if isinstance(err, SiteDataError):
        return SITE_DATA
    if isinstance(err, PolicyError):
        return SITE_POLICY
    if isinstance(err, SecAggProtocolError):
        return SITE_PROTOCOL
    return SITE_INTERNAL


def handle_train(msg: Message, context: Context, overrides: Mapping[str, Any] | None = None) -> Message:
    """Answer a train message; an error is logged here in full and leaves the site only as a
    :class:`~common.reasons.SiteRefusal` with a fixed text (error texts name private files and
    depend on the data, and Flower forwards them to the server with a traceback)."""
    try:
        return answer_train(msg, context, overrides)
    except Exception as err:  # noqa: BLE001 - every error is refused the same way
        reason = refusal_reason(err)
        log.error("this site refused the round (%s); sent only %r", err, reason, exc_info=err)
    # raised outside the handler: the refusal carries no __context__ (the original error)
    raise SiteRefusal(reason)


def answer_train(msg: Message, context: Context, overrides: Mapping[str, Any] | None = None) -> Message:
    """The site's reply to a train message (errors propagate; :func:`handle_train` refuses them)."""
    # where the model lives and which device to use are the site's own business
    local = {k: context.node_config[k] for k in SITE_KEYS if k in context.node_config}
    cfg = RunConfig.from_run_config({**context.run_config, **(overrides or {}), **local})
    index, name, folder = site_identity(context.node_config, cfg)
    if SECAGG_STAGE in msg.content[keys.CONFIG]:
        return secure_reply(msg, context, cfg, index, name, folder)
    method = str(msg.content[keys.CONFIG][keys.METHOD])
    enforce_policy(msg, context, cfg, name)
    if method == "dpagg":
        content = dpagg_reply(msg, cfg, index, name, folder)
    elif method == "dp-sgd":
        content = dpsgd_reply(msg, context, cfg, index, name, folder)
    elif method == "lora":
        content = lora_reply(msg, context, cfg, index, name, folder)
    else:
        raise ValueError(f"{name}: the server asked for unknown method {method!r}")
    return Message(content=content, reply_to=msg)


def build_client_app(overrides: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp whose run config is Flower's run config updated with ``overrides``
    (used by ``simulations.run``, whose Python API passes no run config)."""
    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, overrides)

    return client_app


app = build_client_app()
