"""The pieces of (Stable) PrivateLoRA: member splits, the proxy attacker and the two losses.

Luo et al., "Privacy-Preserving Low-Rank Adaptation against Membership Inference Attacks
for Latent Diffusion Models" (arXiv 2402.11989, AAAI 2025) train LoRA against a proxy
membership-inference attacker h that lives on the site:

- the site's images split into members D^m = D^m_aux ∪ D^m_te (the training set) and
  non-members D^nm_aux, D^nm_te (never trained on); h learns on the aux splits and is scored
  on the te splits;
- h reads the per-element squared denoising error at one random timestep (Sec. 4.1) through
  an MLP features -> 512 -> 256 -> 2 (ReLU, dropout 0.5), trained with Adam (lr 1e-5, weight
  decay 1e-4) on balanced member / non-member batches;
- its MI gain G = balanced mean of log h(member | x) over members and log h(non-member | x)
  over non-members (G <= 0); h ascends G, the adapter descends it.

PrivateLoRA (MP-LoRA, Eq. 4) minimises ``L_ada + λG``; on a member batch G = -CE, where CE is
h's cross-entropy of labelling the batch "member", so the loss is ``L_ada - λ·CE``. Its
gradient ``∇L_ada + λ∇G`` lets a large ∇G swamp the adaptation gradient, which the paper
shows makes training unstable. Stable PrivateLoRA (SMP-LoRA, Eq. 6) minimises
``L_ada / (1 + λ·CE + δ) = L_ada / (1 - λG + δ)``, whose gradient

    ∇L_ada / (1 - λG + δ)  +  L_ada · λ∇G / (1 - λG + δ)^2

rescales the adaptation gradient by 1 / (1 - λG + δ) instead of adding to it (Sec. 4.3).

Nothing here talks to Flower: h and its optimizer state never leave the site; a site keeps
them across rounds as bytes (:func:`attacker_to_bytes`) in its own ``context.state``.
"""

from __future__ import annotations

import hashlib
import io
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from common.diffusion import denoising_error

HIDDEN_SIZES = (512, 256)
DROPOUT = 0.5
ATTACKER_LEARNING_RATE = 1e-5
ATTACKER_WEIGHT_DECAY = 1e-4
SMP_DELTA = 1e-5
MEMBER, NONMEMBER = 1, 0  # h's class labels


# ---- member / non-member splits -------------------------------------------------------

@dataclass(frozen=True)
class MemberSplits:
    """Disjoint index sets over a site's images (sorted CPU ``long`` tensors).

    ``member_aux ∪ member_te`` is the training set D_tr; the non-member splits are never
    trained on. ``*_aux`` train the proxy attacker, ``*_te`` score it.
    """

    member_aux: torch.Tensor
    member_te: torch.Tensor
    nonmember_aux: torch.Tensor
    nonmember_te: torch.Tensor

    @property
    def members(self) -> torch.Tensor:
        return torch.cat([self.member_aux, self.member_te]).sort().values

    @property
    def nonmembers(self) -> torch.Tensor:
        return torch.cat([self.nonmember_aux, self.nonmember_te]).sort().values


def split_members(n: int, *, member_fraction: float = 0.5, aux_fraction: float = 0.5, seed: int) -> MemberSplits:
    """Split ``range(n)`` into D^m_aux, D^m_te, D^nm_aux, D^nm_te under ``seed``.

    ``round(n * member_fraction)`` images are members; within members and within
    non-members, ``round(count * aux_fraction)`` go to the aux split. The same seed gives the
    same split, so a site that passes the same seed every round keeps its members fixed.

    Raises:
        ValueError: a fraction is not strictly between 0 and 1, or one of the four splits
            would be empty (the message names which, with the counts).
    """
    for name, value in (("member_fraction", member_fraction), ("aux_fraction", aux_fraction)):
        if not 0 < value < 1:
            raise ValueError(f"{name} must be strictly between 0 and 1, got {value!r}")
    if n < 0:
        raise ValueError(f"the number of images must be >= 0, got {n}")
    members = int(round(n * member_fraction))
    sizes = {}
    for group, count in (("member", members), ("nonmember", n - members)):
        aux = int(round(count * aux_fraction))
        sizes[f"{group}_aux"], sizes[f"{group}_te"] = aux, count - aux
    empty = [name for name, size in sizes.items() if size < 1]
    if empty:
        raise ValueError(f"{n} image(s) are too few for the member/non-member splits: {', '.join(empty)} would be "
                         f"empty (sizes {sizes}, member_fraction={member_fraction}, aux_fraction={aux_fraction}); "
                         f"at least 4 images are needed")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    parts = order.split(list(sizes.values()))
    return MemberSplits(*(part.sort().values for part in parts))


def split_members_by_name(names: Sequence[str], *, member_fraction: float = 0.5, aux_fraction: float = 0.5,
                          seed: int) -> MemberSplits:
    """Split images into D^m_aux, D^m_te, D^nm_aux, D^nm_te, each image by its own name alone.

    Image ``names[i]`` is a member if u < ``member_fraction`` and in its aux split if
    v < ``aux_fraction``, where (u, v) are two uniforms read from BLAKE2b(seed, name). Unlike
    :func:`split_members`, whose permutation of ``range(n)`` reshuffles every image when n
    changes, adding or removing one image moves no other image between splits: what
    record-level DP's add/remove adjacency needs (:mod:`client.smp_dpsgd`). The sizes are
    random and a split may be empty. Returns indices into ``names``.
    """
    for name, value in (("member_fraction", member_fraction), ("aux_fraction", aux_fraction)):
        if not 0 < value < 1:
            raise ValueError(f"{name} must be strictly between 0 and 1, got {value!r}")
    parts: tuple[list[int], ...] = ([], [], [], [])  # member_aux, member_te, nonmember_aux, nonmember_te
    for i, name in enumerate(names):
        digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=16).digest()
        u, v = (int.from_bytes(digest[k:k + 8], "big") / 2**64 for k in (0, 8))
        parts[2 * (u >= member_fraction) + (v >= aux_fraction)].append(i)
    return MemberSplits(*(torch.tensor(part, dtype=torch.long) for part in parts))


# ---- the proxy attacker -----------------------------------------------------------------

class ProxyAttacker(nn.Module):
    """h: per-element denoising errors [B, F] -> logits [B, 2] (class 1 = member).

    The paper's MLP: Linear(F, 512), ReLU, Dropout(0.5), Linear(512, 256), ReLU,
    Dropout(0.5), Linear(256, 2).
    """

    def __init__(self, features: int) -> None:
        super().__init__()
        if features < 1:
            raise ValueError(f"the attacker needs >= 1 input feature, got {features}")
        self.features = features
        first, second = HIDDEN_SIZES
        self.net = nn.Sequential(
            nn.Linear(features, first), nn.ReLU(), nn.Dropout(DROPOUT),
            nn.Linear(first, second), nn.ReLU(), nn.Dropout(DROPOUT),
            nn.Linear(second, 2),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


def make_attacker_optimizer(h: ProxyAttacker, lr: float = ATTACKER_LEARNING_RATE,
                            weight_decay: float = ATTACKER_WEIGHT_DECAY) -> torch.optim.Adam:
    """The paper's optimizer for h: Adam, lr 1e-5, (L2) weight decay 1e-4."""
    return torch.optim.Adam(h.parameters(), lr=lr, weight_decay=weight_decay)


def attack_features(unet, scheduler, latents: torch.Tensor, hidden: torch.Tensor,
                    generator: torch.Generator | None, *, grad: bool) -> torch.Tensor:
    """h's input: the per-element squared denoising error, flattened to [B, C*H*W].

    One random timestep and one noise draw per sample (its own, from ``generator``); the
    target follows ``scheduler.config.prediction_type`` as in training. With ``grad=False``
    no graph is built through the UNet.
    """
    with torch.set_grad_enabled(grad):
        return denoising_error(unet, scheduler, latents, hidden, generator).flatten(1)


def member_ce(h: ProxyAttacker, features: torch.Tensor) -> torch.Tensor:
    """CE_h(member | batch) = -mean_i log softmax(h(f_i))[member]; on a member batch this is -G."""
    return -F.log_softmax(h(features), dim=1)[:, MEMBER].mean()


# ---- the two adapter losses ---------------------------------------------------------------

def smp_loss(l_ada: torch.Tensor, ce: torch.Tensor, lam: float, delta: float = SMP_DELTA) -> torch.Tensor:
    """Stable PrivateLoRA's loss (Luo et al. 2025, Eq. 6): ``L_ada / (1 + λ·CE + δ)``.

    With CE = -G on a member batch the denominator is 1 - λG + δ, and the gradient is
    ``∇L_ada / (1 - λG + δ) + L_ada · λ∇G / (1 - λG + δ)^2``: the adaptation gradient is
    rescaled by 1 / (1 - λG + δ) rather than summed with λ∇G as in MP-LoRA.
    """
    return l_ada / (1 + lam * ce + delta)


def mp_loss(l_ada: torch.Tensor, ce: torch.Tensor, lam: float) -> torch.Tensor:
    """PrivateLoRA's min-max loss (Luo et al. 2025, Eq. 4): ``L_ada + λG = L_ada - λ·CE``."""
    return l_ada - lam * ce


def adaptation_and_ce(h: ProxyAttacker, unet, scheduler, latents: torch.Tensor, hidden: torch.Tensor,
                      generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """L_ada (batch mean) and CE_h(member | batch) of one member batch, from ONE UNet call.

    The same as ``denoising_loss(...).mean()`` followed by
    ``member_ce(h, attack_features(..., grad=True))``: the batch enters twice, as 2B rows,
    and each copy gets its own timestep and noise, so the adversarial term is drawn
    independently of L_ada, as the paper prescribes. The UNet treats rows independently
    (group norm, no batch statistics), so only the cost changes: one call of 2B instead of
    two of B.
    """
    batch = latents.shape[0]
    error = denoising_error(unet, scheduler, torch.cat([latents, latents]), torch.cat([hidden, hidden]), generator)
    return error[:batch].mean(), member_ce(h, error[batch:].flatten(1))


@contextmanager
def frozen(h: ProxyAttacker) -> Iterator[ProxyAttacker]:
    """h in eval mode with no gradient on its weights (the adapter's step must not move it)."""
    was_training = h.training
    flags = [p.requires_grad for p in h.parameters()]
    h.eval().requires_grad_(False)
    try:
        yield h
    finally:
        h.train(was_training)
        for p, flag in zip(h.parameters(), flags):
            p.requires_grad_(flag)


# ---- training and scoring h -----------------------------------------------------------

@contextmanager
def seeded_from(generator: torch.Generator) -> Iterator[None]:
    """Run the block with the global RNGs (the CPU's, and the generator's CUDA device's)
    seeded from ``generator``, and restore them afterwards. Dropout and module
    initialisation read the global RNGs; this makes them reproducible from the generator."""
    device = generator.device
    seed = int(torch.randint(0, 2**62, (), generator=generator, device=device))
    cuda = device.type == "cuda"
    index = (device.index if device.index is not None else torch.cuda.current_device()) if cuda else None
    with torch.random.fork_rng(devices=[index] if cuda else []):
        torch.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


def _balanced(member_latents: torch.Tensor, nonmember_latents: torch.Tensor, what: str) -> None:
    if member_latents.shape[0] < 1 or nonmember_latents.shape[0] < 1:
        raise ValueError(f"{what} needs at least one member and one non-member, got "
                         f"{member_latents.shape[0]} and {nonmember_latents.shape[0]}")


def attacker_step(h: ProxyAttacker, opt: torch.optim.Optimizer, unet, scheduler,
                  member_latents: torch.Tensor, member_hidden: torch.Tensor,
                  nonmember_latents: torch.Tensor, nonmember_hidden: torch.Tensor,
                  generator: torch.Generator) -> float:
    """One optimizer step of h on a balanced batch; returns its loss (-G on that batch).

    Members and non-members (equal counts, drawn by the caller from D^m_aux and D^nm_aux)
    go through the UNet in one call without gradient; only h's weights move. h is left in
    train mode (dropout on, seeded from ``generator``).
    """
    _balanced(member_latents, nonmember_latents, "an attacker step")
    if member_latents.shape[0] != nonmember_latents.shape[0]:
        raise ValueError(f"an attacker step takes a balanced batch, got {member_latents.shape[0]} members and "
                         f"{nonmember_latents.shape[0]} non-members")
    features = attack_features(unet, scheduler, torch.cat([member_latents, nonmember_latents]),
                               torch.cat([member_hidden, nonmember_hidden]), generator, grad=False)
    labels = torch.full((features.shape[0],), NONMEMBER, dtype=torch.long, device=features.device)
    labels[: member_latents.shape[0]] = MEMBER
    h.train()
    opt.zero_grad(set_to_none=True)
    with seeded_from(generator):
        # mean CE over a balanced batch = -(mean log h(m) over members + mean log(1-h) over non-members)/2 = -G
        loss = F.cross_entropy(h(features), labels)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


@torch.no_grad()
def attacker_accuracy(h: ProxyAttacker, unet, scheduler,
                      member_latents: torch.Tensor, member_hidden: torch.Tensor,
                      nonmember_latents: torch.Tensor, nonmember_hidden: torch.Tensor,
                      generator: torch.Generator, *, batch_size: int = 16) -> float:
    """h's balanced accuracy (TPR + TNR) / 2 on held-out members and non-members (the te
    splits), h in eval mode; one random timestep per sample, UNet calls of ``batch_size``."""
    _balanced(member_latents, nonmember_latents, "the attacker's accuracy")
    h.eval()

    def hit_rate(latents: torch.Tensor, hidden: torch.Tensor, label: int) -> float:
        hits = 0
        for lat, hid in zip(latents.split(batch_size), hidden.split(batch_size)):
            features = attack_features(unet, scheduler, lat, hid, generator, grad=False)
            hits += int((h(features).argmax(dim=1) == label).sum())
        return hits / latents.shape[0]

    return 0.5 * (hit_rate(member_latents, member_hidden, MEMBER)
                  + hit_rate(nonmember_latents, nonmember_hidden, NONMEMBER))


# ---- persistence on the site ------------------------------------------------------------

def attacker_to_bytes(h: ProxyAttacker, opt: torch.optim.Optimizer) -> bytes:
    """h's weights and its optimizer's state (Adam moments, step counts) as bytes, for the
    site's own ``context.state``; never sent to the server."""
    buffer = io.BytesIO()
    torch.save({"features": h.features, "attacker": h.state_dict(), "optimizer": opt.state_dict()}, buffer)
    return buffer.getvalue()


def attacker_from_bytes(data: bytes, features: int, *, device: torch.device | str = "cpu",
                        ) -> tuple[ProxyAttacker, torch.optim.Adam]:
    """Rebuild h and its Adam from :func:`attacker_to_bytes` (loaded with ``weights_only``).

    Raises:
        ValueError: the bytes are not a saved attacker, or it reads a different number of
            features (the model or resolution changed).
    """
    try:
        saved = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        stored = saved["features"]
    except Exception as err:  # torch raises several types on malformed input
        raise ValueError(f"the saved proxy attacker cannot be read ({type(err).__name__}: {err})") from err
    if stored != features:
        raise ValueError(f"the saved proxy attacker reads {stored} features, this model gives {features}")
    h = ProxyAttacker(features).to(device)
    h.load_state_dict(saved["attacker"])
    opt = make_attacker_optimizer(h)
    opt.load_state_dict(saved["optimizer"])  # also restores lr and weight decay
    return h, opt
