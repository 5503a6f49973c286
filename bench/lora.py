"""Benchmark: step time of MP-LoRA and SMP-LoRA (Luo et al. 2025), FFA-LoRA (Sun et al.,
ICLR 2024), DP-SGD and SMP-LoRA inside DP-SGD against plain LoRA.

Every arm trains the same adapter on the same model, images and batch size from the same
starting state; only the local-training defense differs, or, in the ``ffa_*`` arms, which
matrices train (FFA-LoRA: B only, A frozen, so no gradient of A and, under DP-SGD, no
per-sample gradient of A is computed); ``ffa_ratio`` sets each FFA arm against the same arm
training A and B. Prints per-step wall times (median
over repeats after a warm-up), their ratios to plain LoRA, and where an SMP step's time goes.
The paper reports SMP-LoRA at about 1.25x LoRA's end-to-end time; privadapt's target is
at most 1.3x.

Times are wall-clock by default; ``--clock cpu --threads 1`` measures this process's CPU time
instead, which other work on a shared CPU disturbs far less. Two per-step figures are given: ``end_to_end`` is a whole round (latent encoding, final
attacker scoring) divided by its steps; ``marginal`` is (t(steps) - t(1)) / (steps - 1), the
cost of one more step.

    .venv/bin/python -m bench.lora --images 8 --batch-size 4 --steps 10
    .venv/bin/python -m bench.lora --arms lora,ffa_lora,dp_sgd,ffa_dp_sgd  # FFA-LoRA only

More arms (e.g. DP-SGD) plug in through :func:`extra_arms`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from contextlib import nullcontext
from typing import Callable

import torch

from client.lora_train import LoRATrainSettings, train_lora_locally
from client.smp import (
    ProxyAttacker,
    adaptation_and_ce,
    attack_features,
    attacker_step,
    frozen,
    make_attacker_optimizer,
    member_ce,
    smp_loss,
)
from common.data import SiteImages
from common.diffusion import denoising_loss, encode_latents
from common.lora import LoRASpec, attach_lora, load_lora_state, lora_parameters, lora_state
from common.models import load_pipeline
from common.tiny_sd import tiny_sd_dir

Arm = Callable[[int], object]  # runs one round of the given number of local steps


def extra_arms(pipe, spec: LoRASpec, images: SiteImages, args: argparse.Namespace) -> dict[str, Arm]:
    """More arms, timed like the built-in ones: name -> callable(step_count).

    Each callable starts from the same adapter state and trains ``step_count`` steps on
    ``images``. The DP-SGD arm runs :func:`client.dpsgd_lora.dpsgd_lora_round` (Opacus
    per-sample gradients, clipping, noise) with Poisson batches of expected size
    ``args.batch_size`` (q = batch / declared site size, declared as the arm's image count),
    at a fixed z so no calibration is timed. ``ffa_dp_sgd`` is the same with FFA-LoRA (per-sample
    gradients of B only). ``smp_dp_sgd`` runs :func:`client.smp_dpsgd.smp_dpsgd_round` (SMP-LoRA
    inside DP-SGD: each step, the proxy attacker's DP-SGD step and the adapter's, on per-member
    gradients of the SMP ratio) at the same fixed z, q and C.
    """
    from flwr.app import RecordDict

    from client.dpsgd_lora import dpsgd_lora_round
    from client.smp_dpsgd import smp_dpsgd_round
    from common.config import DPSGD_MECHANISMS_PER_STEP, RunConfig
    from common.dp.dpsgd import DPSGDBudget

    start = lora_state(pipe, spec)

    def arm(trained: LoRASpec, defense: str = "dp-sgd") -> Arm:
        def dp_sgd(steps: int) -> None:
            load_lora_state(pipe, spec, start)
            cfg = RunConfig.from_run_config({
                "adapter": "lora", "defense": defense, "num-sites": 1, "site-dataset-size": len(images),
                "rounds": 1, "local-steps": steps, "dpsgd-batch-size": args.batch_size, "lora-rank": spec.rank,
                "lora-alpha": spec.alpha, "lora-variant": trained.variant,
            })
            budget = DPSGDBudget(target_epsilon=1e9, delta=1e-5, noise_multiplier=1.0,  # fixed z
                                 total_steps=steps * DPSGD_MECHANISMS_PER_STEP[defense])
            common = {"state": RecordDict(), "site_index": 0, "round_index": 1, "budget": budget}
            if defense == "smp-dp-sgd":
                smp_dpsgd_round(pipe, trained, images, cfg, attacker_state=None, **common)
            else:
                dpsgd_lora_round(pipe, trained, images, cfg, **common)

        return dp_sgd

    return {"dp_sgd": arm(spec), "ffa_dp_sgd": arm(ffa_of(spec)), "smp_dp_sgd": arm(spec, "smp-dp-sgd")}


def ffa_of(spec: LoRASpec) -> LoRASpec:
    """The same attached adapter trained as FFA-LoRA: B only, A frozen where it is."""
    return dataclasses.replace(spec, variant="ffa")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]  # set by main(); "cpu" (this process's CPU time) resists other load on a shared CPU


def timed(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = clock()
    fn()
    synchronize(device)
    return clock() - start


def defense_arm(pipe, spec: LoRASpec, images: SiteImages, start: dict, defense: str, args,
                trained: LoRASpec | None = None) -> Arm:
    """``defense`` from ``start``, training ``trained``'s matrices of the adapter (default: ``spec``'s)."""
    device = pipe.unet.device

    def arm(steps: int) -> None:
        load_lora_state(pipe, spec, start)
        settings = LoRATrainSettings(steps=steps, batch_size=args.batch_size, defense=defense)
        train_lora_locally(pipe, trained or spec, images, settings,
                           generator=torch.Generator(device=device).manual_seed(0), split_seed=0, attacker_state=None)

    return arm


def breakdown(pipe, spec: LoRASpec, images: SiteImages, args) -> dict[str, float]:
    """Median seconds of the parts of one step, each run ``args.steps`` times: the plain
    adapter step (B rows), the attacker step (2B rows, no gradient through the UNet), the
    SMP adapter step fused (one UNet call of 2B) and unfused (two calls of B)."""
    device = pipe.unet.device
    b = args.batch_size
    g = torch.Generator(device=device).manual_seed(0)
    dist = encode_latents(pipe.vae, images.pixels[torch.arange(2 * b) % len(images)])
    ids = pipe.tokenizer(["an image"] * 2 * b, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        hidden = pipe.text_encoder(ids)[0]
    latents = dist.sample(g)
    params = lora_parameters(pipe, spec)
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    h = ProxyAttacker(latents[0].numel()).to(device)
    h_opt = make_attacker_optimizer(h)

    def adapter_step(loss_fn) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn().backward()
        optimizer.step()

    def unfused() -> torch.Tensor:
        l_ada = denoising_loss(pipe.unet, pipe.scheduler, latents[:b], hidden[:b], g).mean()
        ce = member_ce(h, attack_features(pipe.unet, pipe.scheduler, latents[:b], hidden[:b], g, grad=True))
        return smp_loss(l_ada, ce, 0.05)

    parts = {
        "plain_adapter_step": lambda: adapter_step(
            lambda: denoising_loss(pipe.unet, pipe.scheduler, latents[:b], hidden[:b], g).mean()),
        "attacker_step": lambda: attacker_step(h, h_opt, pipe.unet, pipe.scheduler, latents[:b], hidden[:b],
                                               latents[b:], hidden[b:], g),
        "smp_adapter_step_fused": lambda: adapter_step(
            lambda: smp_loss(*adaptation_and_ce(h, pipe.unet, pipe.scheduler, latents[:b], hidden[:b], g), 0.05)),
        "smp_adapter_step_unfused": lambda: adapter_step(unfused),
    }
    start = lora_state(pipe, spec)
    times: dict[str, list[float]] = {name: [] for name in parts}
    for repeat in range(args.steps + 1):  # round-robin, so that drift hits every part; the first is a warm-up
        for name, fn in parts.items():
            # the adapter's steps see h frozen, as in training
            with frozen(h) if "adapter" in name else nullcontext():
                seconds = timed(fn, device)
            if repeat:
                times[name].append(seconds)
    optimizer.zero_grad(set_to_none=True)
    load_lora_state(pipe, spec, start)
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv: list[str] | None = None, *, more_arms=extra_arms) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="median of N for each arm")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--model-path", default="")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall time, or this process's CPU time (CPU only; steadier on a shared machine)")
    parser.add_argument("--arms", default="", help="comma-separated arms to time (default: all; 'lora' is always "
                                                   "timed, as the reference; the SMP breakdown needs 'smp_lora')")
    args = parser.parse_args(argv)
    if args.steps < 2 or args.images < 4:
        parser.error("need --steps >= 2 (marginal time) and --images >= 4 (member/non-member splits)")
    if args.threads:
        torch.set_num_threads(args.threads)
    global clock
    clock = CLOCKS[args.clock]

    pipe = load_pipeline(args.model_path or tiny_sd_dir(), device=args.device, dtype=args.dtype)
    device = pipe.unet.device
    if args.clock == "cpu" and device.type != "cpu":
        parser.error("--clock cpu measures host CPU time: use it with --device cpu")
    spec = LoRASpec(rank=args.rank, alpha=float(args.rank))
    attach_lora(pipe, spec, seed=0)
    start = lora_state(pipe, spec)
    pixels = torch.rand(args.images, 3, args.resolution, args.resolution, generator=torch.Generator().manual_seed(0))
    images = SiteImages(tuple(f"{i}.png" for i in range(args.images)), pixels * 2 - 1, (None,) * args.images, "bench")

    arms: dict[str, Arm] = {
        name: defense_arm(pipe, spec, images, start, defense, args)
        for name, defense in (("lora", "none"), ("mp_lora", "mp-lora"), ("smp_lora", "smp-lora"))
    }
    arms["ffa_lora"] = defense_arm(pipe, spec, images, start, "none", args, trained=ffa_of(spec))
    arms.update(more_arms(pipe, spec, images, args))
    if args.arms:
        chosen = {"lora", *(a.strip() for a in args.arms.split(",") if a.strip())}
        if chosen - set(arms):
            parser.error(f"unknown arm(s) {sorted(chosen - set(arms))}; known: {sorted(arms)}")
        arms = {name: arm for name, arm in arms.items() if name in chosen}
    for arm in arms.values():
        arm(2)  # warm-up (allocator, kernels)
    full: dict[str, list[float]] = {name: [] for name in arms}
    one: dict[str, list[float]] = {name: [] for name in arms}
    names = list(arms)
    for repeat in range(args.repeats):  # interleaved and rotated, so that drift on a shared machine hits every arm
        for name in names[repeat % len(names):] + names[: repeat % len(names)]:
            arm = arms[name]
            full[name].append(timed(lambda: arm(args.steps), device))
            one[name].append(timed(lambda: arm(1), device))
    end_to_end = {name: statistics.median(full[name]) / args.steps for name in arms}
    marginal = {name: statistics.median((f - o) / (args.steps - 1) for f, o in zip(full[name], one[name]))
                for name in arms}
    result = {
        "benchmark": "LoRA step time: MP-LoRA / SMP-LoRA / FFA-LoRA (and extra arms) vs plain LoRA",
        "model": str(args.model_path or "tiny-sd"),
        "images": args.images,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "repeats": args.repeats,
        "resolution": args.resolution,
        "rank": args.rank,
        "device": str(device),
        "dtype": str(pipe.unet.dtype),
        "threads": torch.get_num_threads(),
        "clock": args.clock,
        "machine": platform.processor() or platform.machine(),
        "end_to_end_s_per_step": {k: round(v, 5) for k, v in end_to_end.items()},
        "marginal_s_per_step": {k: round(v, 5) for k, v in marginal.items()},
        "end_to_end_ratio_to_lora": {k: round(v / end_to_end["lora"], 3) for k, v in end_to_end.items()},
        "marginal_ratio_to_lora": {k: round(v / marginal["lora"], 3) for k, v in marginal.items()},
        # each FFA arm against the same arm training A and B (end to end, marginal)
        "ffa_ratio": {k[len("ffa_"):]: [round(end_to_end[k] / end_to_end[k[len("ffa_"):]], 3),
                                        round(marginal[k] / marginal[k[len("ffa_"):]], 3)]
                      for k in arms if k.startswith("ffa_") and k[len("ffa_"):] in arms},
        "smp_step_breakdown_s": ({k: round(v, 5) for k, v in breakdown(pipe, spec, images, args).items()}
                                 if "smp_lora" in arms else None),
        "target_ratio": 1.3,
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
