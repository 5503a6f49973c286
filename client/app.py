"""privadapt ClientApp: one site's local work for a round.

The site reads the run config (the same on every site), loads its own images from its
data folder, and answers the server's train message with DPAgg-TI's sum of bounded
per-image embeddings, or with a DP-SGD update of the shared embedding. Bad input raises an
error that names the site and the file; Flower turns it into an error reply, and the
server leaves this site out of the round without stopping the others.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.dpagg import sampling_generator, site_contribution
from client.ti import TISettings
from common import keys
from common.config import RunConfig
from common.data import SiteImages, load_site_images
from common.dp import GaussianSumMechanism
from common.models import load_pipeline
from common.paths import derive_seed, resolve
from common.tiny_sd import tiny_sd_dir

log = logging.getLogger("privadapt.client")

# Pipelines stay resident in the site's process across rounds (one per model and device).
_PIPELINES: dict[tuple[str, str], Any] = {}


def ti_settings(cfg: RunConfig) -> TISettings:
    return TISettings(
        steps=cfg.ti_steps,
        learning_rate=cfg.learning_rate,
        batch_size=cfg.batch_size,
        initializer_token=cfg.initializer_token,
        placeholder_token=cfg.placeholder_token,
        prompt_template=cfg.prompt_template,
        default_caption=cfg.default_caption,
    )


def model_dir(cfg: RunConfig) -> str:
    return str(resolve(cfg.model_path)) if cfg.model_path else str(tiny_sd_dir())


def get_pipeline(cfg: RunConfig):
    key = (model_dir(cfg), cfg.device)
    if key not in _PIPELINES:
        _PIPELINES[key] = load_pipeline(key[0], device=cfg.device)
    return _PIPELINES[key]


def site_identity(node_config: Mapping[str, Any], cfg: RunConfig) -> tuple[int, str, str]:
    """(index, name, data folder) of this site. A deployed SuperNode names its own folder
    with node-config ``data-path``; in simulation it is ``<data-path>/site-<partition-id>``."""
    index = int(node_config.get("partition-id", 0))
    folder = node_config.get("data-path") or str(resolve(cfg.data_path) / f"site-{index}")
    return index, str(node_config.get("site-name", f"site-{index}")), str(resolve(folder))


def load_images(cfg: RunConfig, name: str, folder: str) -> SiteImages:
    return load_site_images(folder, site=name, resolution=cfg.resolution)


def dpagg_reply(msg: Message, cfg: RunConfig, index: int, name: str, folder: str) -> RecordDict:
    release = int(msg.content[keys.CONFIG][keys.ROUND])
    images = load_images(cfg, name, folder)
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
        sampling=sampling_generator(None if cfg.secure_noise else derive_seed(cfg.seed, "sample", index, release)),
        training=training,
    )
    # Logged on the site only: the count of sampled images is private.
    log.info("%s release %d: %d of %d images sampled, %d clipped", name, release,
             contribution.num_sampled, len(images.names), contribution.num_clipped)
    arrays = ArrayRecord(array_dict={keys.EMBEDDING_SUM: Array(contribution.total.numpy().astype(np.float64))})
    return RecordDict({keys.ARRAYS: arrays})


def dpsgd_reply(msg: Message, context: Context, cfg: RunConfig, index: int, name: str, folder: str) -> RecordDict:
    from client.dpsgd_ti import dpsgd_site_round  # Opacus is only needed for the baseline

    images = load_images(cfg, name, folder)
    global_embedding = torch.from_numpy(msg.content[keys.ARRAYS][keys.EMBEDDING].numpy()).float()
    update, metrics = dpsgd_site_round(
        get_pipeline(cfg), images, ti_settings(cfg), cfg, global_embedding,
        state=context.state, site_index=index, round_index=int(msg.content[keys.CONFIG][keys.ROUND]),
    )
    arrays = ArrayRecord(array_dict={keys.EMBEDDING: Array(update.numpy().astype(np.float32))})
    return RecordDict({keys.ARRAYS: arrays, keys.METRICS: MetricRecord(metrics)})


def handle_train(msg: Message, context: Context, overrides: Mapping[str, Any] | None = None) -> Message:
    cfg = RunConfig.from_run_config({**context.run_config, **(overrides or {})})
    index, name, folder = site_identity(context.node_config, cfg)
    method = str(msg.content[keys.CONFIG][keys.METHOD])
    if method == "dpagg":
        content = dpagg_reply(msg, cfg, index, name, folder)
    elif method == "dp-sgd":
        content = dpsgd_reply(msg, context, cfg, index, name, folder)
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
