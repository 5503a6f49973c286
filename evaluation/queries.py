"""Model queries of the white-box diffusion attacks beyond the plain loss: PIA and SecMI.

- PIA (Kong, Li, Tian, Yang, "An Efficient Membership Inference Attack for the Diffusion Model
  by Proximal Initialization", ICLR 2024): take the model's own output at t = 0,
  eps_0 = eps_theta(x_0, 0), as the noise; form x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps_0
  and query eps_theta(x_t, t). A member's prediction stays close to eps_0. Two queries per image
  and timestep; the score is minus the mean squared distance (their l_p distance with p = 2).
- SecMI-stat (Duan, Kong, Wang, Shi, Xu, "Are Diffusion Models Vulnerable to Membership
  Inference Attacks?", ICML 2023): invert x_0 deterministically with DDIM steps of size k to
  x_t, take one more inversion step to x_{t+k} and one denoising step back; members come back
  closer (small "t-error" ||x~_t - x_t||^2). Score: minus the t-error (the threshold "stat"
  variant, not the trained "NNs" one).

Both need the noise prediction: v-prediction models are converted to it.
"""

from __future__ import annotations

from typing import Sequence

import torch

from evaluation.scores import Encoded, check_timesteps


def _abar(scheduler, t: int, device) -> torch.Tensor:
    return scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)[t]


def predict_noise(unet, scheduler, x_t: torch.Tensor, t: int, hidden: torch.Tensor) -> torch.Tensor:
    """eps_theta(x_t, t) whatever the model's prediction_type (epsilon or v)."""
    dtype = next(unet.parameters()).dtype
    tt = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
    out = unet(x_t.to(dtype), tt, hidden.to(dtype)).sample.float()
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return out
    if kind == "v_prediction":
        a = _abar(scheduler, t, x_t.device)
        return a.sqrt() * out + (1 - a).sqrt() * x_t.float()
    raise ValueError(f"unsupported scheduler prediction_type {kind!r}")


def ddim_move(x: torch.Tensor, eps: torch.Tensor, a_from: torch.Tensor, a_to: torch.Tensor) -> torch.Tensor:
    """The deterministic DDIM update (eta = 0) between noise levels, in either direction:
    x0_hat = (x - sqrt(1 - a_from) eps) / sqrt(a_from); x' = sqrt(a_to) x0_hat + sqrt(1 - a_to) eps."""
    x0 = (x - (1 - a_from).sqrt() * eps) / a_from.sqrt()
    return a_to.sqrt() * x0 + (1 - a_to).sqrt() * eps


@torch.no_grad()
def pia_scores(unet, scheduler, data: Encoded, timesteps: Sequence[int], *, batch_size: int = 32) -> torch.Tensor:
    """PIA scores (higher = member), float64 [N, len(timesteps)]."""
    steps = check_timesteps(scheduler, timesteps)
    out = torch.empty((len(data), len(steps)), dtype=torch.float64)
    for start in range(0, len(data), batch_size):
        sl = slice(start, start + batch_size)
        x0, hidden = data.latents[sl].float(), data.hidden[sl]
        eps0 = predict_noise(unet, scheduler, x0, 0, hidden)
        for j, t in enumerate(steps):
            a = _abar(scheduler, t, x0.device)
            x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps0
            eps_t = predict_noise(unet, scheduler, x_t, t, hidden)
            out[sl, j] = -((eps_t - eps0) ** 2).flatten(1).mean(1).double().cpu()
    return out


@torch.no_grad()
def secmi_scores(unet, scheduler, data: Encoded, *, t_sec: int = 100, interval: int = 10,
                 batch_size: int = 32) -> torch.Tensor:
    """SecMI-stat scores (minus the t-error; higher = member), float64 [N]."""
    total = scheduler.config.num_train_timesteps
    if interval < 1 or t_sec < interval or t_sec % interval or t_sec + interval >= total:
        raise ValueError(f"SecMI needs 1 <= interval <= t_sec, t_sec a multiple of interval and t_sec + interval "
                         f"< {total}; got t_sec={t_sec}, interval={interval}")
    out = torch.empty(len(data), dtype=torch.float64)
    for start in range(0, len(data), batch_size):
        sl = slice(start, start + batch_size)
        x, hidden = data.latents[sl].float(), data.hidden[sl]
        dev = x.device
        for s in range(0, t_sec, interval):  # deterministic inversion x_0 -> x_t
            x = ddim_move(x, predict_noise(unet, scheduler, x, s, hidden), _abar(scheduler, s, dev),
                          _abar(scheduler, s + interval, dev))
        a_t, a_next = _abar(scheduler, t_sec, dev), _abar(scheduler, t_sec + interval, dev)
        x_next = ddim_move(x, predict_noise(unet, scheduler, x, t_sec, hidden), a_t, a_next)
        x_back = ddim_move(x_next, predict_noise(unet, scheduler, x_next, t_sec + interval, hidden), a_next, a_t)
        out[sl] = -((x_back - x) ** 2).flatten(1).mean(1).double().cpu()
    return out
