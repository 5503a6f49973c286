"""Benchmark: batched per-image textual inversion against one run per image.

Both arms train the same number of images for the same number of steps on the same model
and hyperparameters; the only difference is batching. Prints the figures and the ratio,
measured side by side in one process.

    .venv/bin/python -m bench.ti --images 12 --steps 20
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from client.ti import train_per_image_embeddings
from common.models import load_pipeline
from common.textual_inversion import TISettings
from common.tiny_sd import tiny_sd_dir


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--model-path", default="")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3, help="best of N for each arm")
    args = parser.parse_args(argv)

    pipe = load_pipeline(args.model_path or tiny_sd_dir(), device=args.device)
    device = pipe.unet.device
    pixels = torch.rand(args.images, 3, args.resolution, args.resolution, generator=torch.Generator().manual_seed(0)) * 2 - 1
    settings = TISettings(steps=args.steps, batch_size=args.images)

    def batched() -> None:
        train_per_image_embeddings(pipe, pixels, [None] * args.images, settings,
                                   generator=torch.Generator(device=device).manual_seed(0))

    def one_by_one() -> None:
        for i in range(args.images):
            train_per_image_embeddings(pipe, pixels[i : i + 1], [None], settings,
                                       generator=torch.Generator(device=device).manual_seed(i))

    batched()  # warm-up (allocator, kernels)
    t_batched = min(timed(batched) for _ in range(args.repeats))
    t_single = min(timed(one_by_one) for _ in range(args.repeats))
    result = {
        "benchmark": "per-image TI: batched vs one run per image",
        "images": args.images,
        "steps": args.steps,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "batched_s": round(t_batched, 3),
        "one_run_per_image_s": round(t_single, 3),
        "image_steps_per_s_batched": round(args.images * args.steps / t_batched, 1),
        "image_steps_per_s_single": round(args.images * args.steps / t_single, 1),
        "speedup": round(t_single / t_batched, 2),
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
