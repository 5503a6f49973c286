"""Does a base model draw the concept it is asked for? Nearest-training-image retrieval.

For each concept prompt ("an emoji of a cat face") and seed, the model draws one image; the
image's nearest neighbours among the training set (Twemoji at the model's resolution, and
their mirror images, by pixel L2 distance) are looked up, and the draw counts as a hit at
rank k when one of its k nearest training images carries the prompted name. With 1,636
images, chance is about k/1,636 per draw. It is a crude, automatic stand-in for "a person
recognizes the concept": a draw that is the right concept in a new pose or colour misses,
so the figures are lower bounds on recognisability, comparable between two models on the
same prompts and seeds.

    .venv/bin/python scripts/emoji_sd_quality.py --model assets/emoji-sd --package-dir PATH/package
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from common.emoji import EmojiImage, caption, list_emoji, load_pixels  # noqa: E402
from pretrain_emoji_sd import PREVIEW_PROMPTS, to_tensor  # noqa: E402  (scripts/ is on sys.path)

# the pretraining's preview concepts and a few more everyday ones; each is a name of one Twemoji image
CONCEPTS = PREVIEW_PROMPTS + ("banana", "pig face", "snowman", "umbrella")


def retrieval(pipe, images: list[EmojiImage], pixels: np.ndarray, concepts=CONCEPTS, seeds=(0, 1, 2, 3), *,
              steps: int = 25, guidance: float = 5.0, ks=(1, 5, 20)) -> dict:
    """Hit rates at ranks ``ks`` of the prompted name among the nearest training images.

    ``pixels``: uint8 [N, r, r, 3] of ``images`` at the model's resolution."""
    train = to_tensor(pixels)
    train = torch.cat([train, train.flip(-1)]).flatten(1)  # mirror images count as the same image
    owner = list(range(len(images))) * 2
    prompts = [caption((c,)) for c in concepts]
    hits = {k: [] for k in ks}
    per_concept: dict[str, list[int]] = {c: [] for c in concepts}
    for seed in seeds:
        gen = torch.Generator().manual_seed(seed)
        draws = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=gen, output_type="np").images
        x = torch.from_numpy(draws).float().mul(2).sub(1).permute(0, 3, 1, 2).flatten(1)
        order = torch.cdist(x, train).argsort(dim=1)
        for concept, row in zip(concepts, order):
            ranked = list(dict.fromkeys(owner[i] for i in row[: 4 * max(ks)].tolist()))  # unique images
            rank = next((r for r, i in enumerate(ranked) if concept in images[i].names), None)
            per_concept[concept].append(-1 if rank is None else rank)
            for k in ks:
                hits[k].append(rank is not None and rank < k)
    return {"draws": len(concepts) * len(seeds), "training_images": len(images),
            "hit_rate": {f"top{k}": float(np.mean(v)) for k, v in hits.items()},
            "chance": {f"top{k}": k / len(images) for k in ks},
            "rank_per_concept": per_concept}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=REPO_ROOT / "assets" / "emoji-sd")
    p.add_argument("--package-dir", type=Path, required=True, help="unpacked emoji-datasource-twitter package/")
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(args.model, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    images = list_emoji(args.package_dir, "twitter", skin_tones=False)
    report = retrieval(pipe, images, load_pixels(images, resolution), seeds=tuple(range(args.seeds)))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
