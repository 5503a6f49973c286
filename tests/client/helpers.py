"""Test helpers shared by the client tests."""

from __future__ import annotations

import torch


def opacus_leftovers(pipe) -> list[str]:
    """Names of pipeline modules or parameters still carrying Opacus hooks or attributes."""
    found = []
    for part in ("text_encoder", "unet", "vae"):
        for name, module in getattr(pipe, part).named_modules():
            if module._forward_hooks or module._backward_hooks or hasattr(module, "autograd_grad_sample_hooks"):
                found.append(f"{part}.{name}")
        for name, p in getattr(pipe, part).named_parameters():
            if hasattr(p, "grad_sample") or hasattr(p, "_forward_counter"):
                found.append(f"{part}.{name}")
    return found


class FixedDraws:
    """Stands in for ``torch`` inside common.diffusion: randn/randint return preset values,
    so one example alone sees exactly the noise and timestep it saw in the batch."""

    def __init__(self, noise: torch.Tensor, timesteps: torch.Tensor) -> None:
        self.noise, self.timesteps = noise, timesteps

    def randn(self, shape, **_):
        assert tuple(shape) == tuple(self.noise.shape)
        return self.noise.clone()

    def randint(self, low, high, size, **_):
        assert tuple(size) == tuple(self.timesteps.shape)
        return self.timesteps.clone()

    def __getattr__(self, name):
        return getattr(torch, name)


def perturbed_lora_pipe(tiny_sd_path, spec):
    """The tiny pipeline on the CPU with ``spec`` attached and B != 0 (so that A's gradients are not zero)."""
    from common.lora import attach_lora, lora_parameters
    from common.models import load_pipeline

    p = load_pipeline(tiny_sd_path, device="cpu")
    attach_lora(p, spec, seed=0)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for param in lora_parameters(p, spec):
            param.add_(0.05 * torch.randn(param.shape, generator=g))
    return p


def opacus_grad_samples(pipe, params, loss_fn) -> list[torch.Tensor]:
    """Opacus' per-row gradients (``grad_sample``) of ``params`` for ``loss_fn(hooked_unet)``,
    with the hooks removed and the gradients cleared afterwards."""
    import warnings

    from client.dpsgd_lora import per_sample_unet

    for p in params:
        p.grad = None
    unet = per_sample_unet(pipe)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            loss_fn(unet).backward()
        return [p.grad_sample.detach().clone() for p in params]
    finally:
        unet.cleanup()
        pipe.unet.eval()
        for p in params:
            p.grad = None


def clip_each_record(optimizer, clip_and_accumulate, clip_norm: float, rtol: float) -> list[tuple[float, float]]:
    """Run Opacus' ``clip_and_accumulate`` on each record's per-sample gradient alone, check the
    result is the gradient scaled by min(1, C/||g||) (Opacus divides by ||g|| + 1e-6: exact up to
    that guard, so ``rtol``), then on the whole batch as Opacus would. Returns (norm before, norm
    after clipping) per record, in float64."""
    seen = []
    full = [p.grad_sample for p in optimizer.params]
    for i in range(len(full[0])):
        for p, g in zip(optimizer.params, full):
            p.grad_sample, p.summed_grad = g[i:i + 1], None
        clip_and_accumulate(optimizer)
        before = torch.cat([g[i].flatten() for g in full]).double()
        after = torch.cat([p.summed_grad.flatten() for p in optimizer.params]).double()
        seen.append((float(before.norm()), float(after.norm())))
        torch.testing.assert_close(after, before * min(1.0, clip_norm / float(before.norm())), rtol=rtol, atol=0)
    for p, g in zip(optimizer.params, full):
        p.grad_sample, p.summed_grad = g, None
    clip_and_accumulate(optimizer)
    return seen
