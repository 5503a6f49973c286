"""The SMP-LoRA paper's evaluation attacker h' (Luo et al., arXiv 2402.11989, Sec. 5.1).

A FRESH proxy attacker of the paper's shape (:class:`client.smp.ProxyAttacker`: per-element
squared denoising error at one random timestep -> 512 -> 256 -> 2) is trained on the
auxiliary splits D^m_aux / D^nm_aux against the FINAL model, then scored on the held-out
splits D^m_te / D^nm_te. The training uses the paper's attacker step
(:func:`client.smp.attacker_step`: balanced batches, Adam with weight decay); the learning
rate defaults to 1e-3 rather than the paper's 1e-5, because h' trains from scratch for a few
hundred steps here instead of alongside the whole adaptation. A score is the mean over
``draws`` random timestep/noise draws of h's member probability.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from client.smp import MEMBER, ProxyAttacker, attack_features, attacker_step, make_attacker_optimizer, seeded_from
from evaluation.scores import Encoded


@dataclass(frozen=True)
class ProxySettings:
    steps: int = 300
    batch_size: int = 8
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    draws: int = 8

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "draws"):
            if getattr(self, name) < 1:
                raise ValueError(f"h' {name} must be >= 1, got {getattr(self, name)}")


def train_and_score(unet, scheduler, data: Encoded, labels: np.ndarray, aux: np.ndarray, *, seed: int = 0,
                    settings: ProxySettings = ProxySettings()) -> tuple[np.ndarray, np.ndarray, dict]:
    """Train h' on the aux rows, return (scores of the te rows, their labels, details)."""
    member_aux = np.flatnonzero(aux & (labels == 1))
    other_aux = np.flatnonzero(aux & (labels == 0))
    test = np.flatnonzero(~aux)
    if member_aux.size < 1 or other_aux.size < 1 or len(set(labels[test])) < 2:
        raise ValueError("h' needs members and non-members in both the aux and the held-out splits")
    gen = torch.Generator(device=data.latents.device).manual_seed(seed)
    with seeded_from(gen):
        h = ProxyAttacker(int(data.latents[0].numel()))
    opt = make_attacker_optimizer(h, settings.learning_rate, settings.weight_decay)
    k = min(settings.batch_size, member_aux.size, other_aux.size)
    losses = []
    for _ in range(settings.steps):
        m = torch.from_numpy(member_aux)[torch.randperm(member_aux.size, generator=gen)[:k]]
        o = torch.from_numpy(other_aux)[torch.randperm(other_aux.size, generator=gen)[:k]]
        losses.append(attacker_step(h, opt, unet, scheduler, data.latents[m], data.hidden[m], data.latents[o],
                                    data.hidden[o], gen))
    h.eval()
    idx = torch.from_numpy(test)
    scores = torch.zeros(test.size, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(settings.draws):
            features = attack_features(unet, scheduler, data.latents[idx], data.hidden[idx], gen, grad=False)
            scores += torch.softmax(h(features), dim=1)[:, MEMBER].double()
    details = {"train_members": int(member_aux.size), "train_non_members": int(other_aux.size),
               "final_train_loss": float(np.mean(losses[-20:])), **settings.__dict__}
    return (scores / settings.draws).numpy(), labels[test], details
