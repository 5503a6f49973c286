"""One site's local LoRA training for a federated round: plain LoRA, MP-LoRA or SMP-LoRA.

Plain LoRA (Hu et al., ICLR 2022) minimises the denoising loss L_ada of latent diffusion
(Rombach et al. 2022) over the adapter's A and B matrices only, with AdamW on uniform random
minibatches of the site's images; FFA-LoRA (``LoRASpec(variant="ffa")``) over B only, A frozen.
Every defense below works with either variant.

MP-LoRA and SMP-LoRA (Luo et al., arXiv 2402.11989, AAAI 2025; see :mod:`client.smp`) train
on the members D^m_aux ∪ D^m_te only and alternate, every step,

1. one Adam step of the proxy attacker h on a balanced batch of D^m_aux and D^nm_aux;
2. one adapter step on a member batch with loss ``L_ada - λ·CE`` (MP) or
   ``L_ada / (1 + λ·CE + 1e-5)`` (SMP), where CE is h's cross-entropy of calling the batch
   "member" computed with its own timestep and noise draw, h frozen and in eval mode.

The splits come from ``split_seed`` (the same every round, so members stay members); h and
its Adam moments persist across rounds as bytes the caller keeps in the site's
``context.state``. h never leaves the site. At the end h is scored on D^m_te / D^nm_te.

The adapter's delta (clipping, DP-FedAvg) is the caller's business: this module only trains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from client.smp import (
    ProxyAttacker,
    adaptation_and_ce,
    attacker_accuracy,
    attacker_from_bytes,
    attacker_step,
    attacker_to_bytes,
    frozen,
    make_attacker_optimizer,
    mp_loss,
    seeded_from,
    smp_loss,
    split_members,
)
from client.ti import tokenize
from common.config import ADVERSARIAL_DEFENSES
from common.data import SiteImages
from common.diffusion import LatentDist, denoising_loss, encode_latents
from common.keys import DIAG_ATTACKER_ACCURACY, DIAG_LOSS
from common.lora import LoRASpec, training_adapter

LORA_DEFENSES = ("none", *ADVERSARIAL_DEFENSES)  # the defenses trained here (dp-sgd: client.dpsgd_lora)
ATTACKER_LOSS = "attacker-loss"  # mean over steps of h's training loss (-G on its batches)
MEMBER_CE = "ce"  # mean over steps of CE_h(member | adapter batch)
STEPS = "steps"


@dataclass(frozen=True)
class LoRATrainSettings:
    """Local-training hyperparameters of one round (data-independent)."""

    steps: int = 10
    batch_size: int = 4
    learning_rate: float = 1e-3
    defense: str = "none"  # "none" | "mp-lora" | "smp-lora"
    smp_lambda: float = 0.05
    member_fraction: float = 0.5
    aux_fraction: float = 0.5
    attacker_learning_rate: float = 1e-5
    attacker_weight_decay: float = 1e-4
    default_caption: str = "an image"

    def __post_init__(self) -> None:
        if self.defense not in LORA_DEFENSES:
            raise ValueError(f"defense must be one of {LORA_DEFENSES} here, got {self.defense!r}")
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("learning_rate", "attacker_learning_rate"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be finite and > 0, got {getattr(self, name)}")
        for name in ("smp_lambda", "attacker_weight_decay"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {getattr(self, name)}")
        for name in ("member_fraction", "aux_fraction"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name} must be strictly between 0 and 1, got {getattr(self, name)}")

    @property
    def adversarial(self) -> bool:
        return self.defense in ADVERSARIAL_DEFENSES


@dataclass
class LocalResult:
    """What a round of local training gives back.

    Attributes:
        metrics: ``adaptation-loss`` (mean L_ada over the steps) and ``steps``; with MP/SMP
            also ``attacker-accuracy`` (balanced, on the te splits, after the last step),
            ``attacker-loss`` and ``ce`` (means over the steps). All derive from private data.
        attacker_state: h and its optimizer as bytes for the site's ``context.state``
            (None for plain LoRA). Never send it to the server.
    """

    metrics: dict[str, float]
    attacker_state: bytes | None


def site_prompts(images: SiteImages, default_caption: str) -> list[str]:
    """Each image's caption, or the public default where it has none."""
    return [c or default_caption for c in images.captions]


def draw_batch(pool: torch.Tensor, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """``min(batch_size, len(pool))`` distinct entries of ``pool``, uniformly at random."""
    order = torch.randperm(pool.numel(), generator=generator, device=generator.device)
    return pool[order[:batch_size].to(pool.device)]


def train_lora_locally(
    pipe,
    spec: LoRASpec,
    images: SiteImages,
    settings: LoRATrainSettings,
    *,
    generator: torch.Generator,
    split_seed: int,
    attacker_state: bytes | None,
) -> LocalResult:
    """Train the attached adapter in place for ``settings.steps`` steps on one site's images.

    Args:
        pipe: a frozen StableDiffusionPipeline with the adapter attached
            (:func:`common.lora.attach_lora`) and the global adapter loaded; only
            ``lora_parameters(pipe, spec)`` change (FFA-LoRA: B; A stays frozen).
        spec: the adapter's shape and variant (which parameters to train).
        images: the site's private images.
        settings: the round's hyperparameters and defense.
        generator: drives every random draw (batches, latent samples, timesteps, noise,
            h's dropout); it must live on the pipeline's device.
        split_seed: seeds the member / non-member split; pass the same value every round.
        attacker_state: h from the site's previous round (MP/SMP), or None for a fresh h.

    Returns:
        The metrics and, for MP/SMP, h's new state.

    Raises:
        ValueError: the site has too few images for the member/non-member splits (MP/SMP),
            none at all, or ``attacker_state`` does not fit this model.
    """
    n = len(images)
    if n < 1:
        raise ValueError(f"site {images.site!r} has no image to train on")
    device = pipe.unet.device
    splits = None
    if settings.adversarial:
        try:
            splits = split_members(n, member_fraction=settings.member_fraction,
                                   aux_fraction=settings.aux_fraction, seed=split_seed)
        except ValueError as err:
            raise ValueError(f"site {images.site!r} cannot run {settings.defense}: {err}") from err
    pool = (splits.members if splits is not None else torch.arange(n)).to(device)

    # encode every image once; prompts are tokenized once as well
    dist = encode_latents(pipe.vae, images.pixels, batch_size=settings.batch_size)
    ids = tokenize(pipe, site_prompts(images, settings.default_caption)).to(device)
    attacker = None if splits is None else proxy_attacker(
        attacker_state, dist.mean[0].numel(), generator, device, lr=settings.attacker_learning_rate,
        weight_decay=settings.attacker_weight_decay)

    def text(index: torch.Tensor, grad: bool) -> torch.Tensor:
        # the text encoder carries adapter weights only when spec.text_encoder is set
        with torch.set_grad_enabled(grad and spec.text_encoder):
            return pipe.text_encoder(ids[index])[0]

    if splits is not None:
        member_aux, nonmember_aux = splits.member_aux.to(device), splits.nonmember_aux.to(device)
        k = min(settings.batch_size, member_aux.numel(), nonmember_aux.numel())
    losses, attacker_losses, ces = [], [], []
    with training_adapter(pipe, spec) as params:  # FFA-LoRA: B only, A frozen
        optimizer = torch.optim.AdamW(params, lr=settings.learning_rate)
        for _ in range(settings.steps):
            if attacker is not None:
                # 1. one step of the proxy attacker on a balanced aux batch (k members, k non-members)
                m, nm = draw_batch(member_aux, k, generator), draw_batch(nonmember_aux, k, generator)
                attacker_losses.append(attacker_step(
                    *attacker, pipe.unet, pipe.scheduler, dist.sample(generator, m), text(m, grad=False),
                    dist.sample(generator, nm), text(nm, grad=False), generator))
            # 2. one adapter step on a training batch
            index = draw_batch(pool, settings.batch_size, generator)
            latents = dist.sample(generator, index)
            hidden = text(index, grad=True)
            optimizer.zero_grad(set_to_none=True)
            if attacker is None:
                l_ada = denoising_loss(pipe.unet, pipe.scheduler, latents, hidden, generator).mean()
                loss = l_ada
            else:
                with frozen(attacker[0]) as h:
                    # the adversarial term has its own timestep and noise (one UNet call of 2B)
                    l_ada, ce = adaptation_and_ce(h, pipe.unet, pipe.scheduler, latents, hidden, generator)
                    combine = smp_loss if settings.defense == "smp-lora" else mp_loss
                    loss = combine(l_ada, ce, settings.smp_lambda)
                ces.append(float(ce.detach()))
            loss.backward()
            optimizer.step()
            losses.append(float(l_ada.detach()))

    metrics = {DIAG_LOSS: sum(losses) / len(losses), STEPS: float(settings.steps)}
    if attacker is None:
        return LocalResult(metrics, None)
    h, h_opt = attacker
    metrics[ATTACKER_LOSS] = sum(attacker_losses) / len(attacker_losses)
    metrics[MEMBER_CE] = sum(ces) / len(ces)
    metrics[DIAG_ATTACKER_ACCURACY] = _score(pipe, h, dist, splits.member_te.to(device),
                                             splits.nonmember_te.to(device), text, generator, settings.batch_size)
    return LocalResult(metrics, attacker_to_bytes(h, h_opt))


def proxy_attacker(state: bytes | None, features: int, generator: torch.Generator, device: torch.device, *,
                   lr: float, weight_decay: float) -> tuple[ProxyAttacker, torch.optim.Adam]:
    """h and its Adam from the site's previous round (its saved lr and weight decay win), or
    fresh ones initialised from ``generator``."""
    if state is not None:
        return attacker_from_bytes(state, features, device=device)
    with seeded_from(generator):
        h = ProxyAttacker(features).to(device)
    return h, make_attacker_optimizer(h, lr, weight_decay)


def _score(pipe, h: ProxyAttacker, dist: LatentDist, members: torch.Tensor, nonmembers: torch.Tensor, text,
           generator: torch.Generator, batch_size: int) -> float:
    """h's balanced accuracy on the te splits against the trained adapter."""
    with torch.no_grad():
        return attacker_accuracy(h, pipe.unet, pipe.scheduler,
                                 dist.sample(generator, members), text(members, grad=False),
                                 dist.sample(generator, nonmembers), text(nonmembers, grad=False),
                                 generator, batch_size=batch_size)
