"""Does a base model read the word after "in the style of"? A probe of the slot DPAgg-TI learns.

DPAgg-TI (Peetathawatchai et al., arXiv 2411.14639) learns a placeholder token that stands in
"a cat in the style of <S*>"; the adaptation can only move the pictures as far as the base model
listens to that slot. For a few concept prompts and fixed seeds this draws each prompt with the
slot's word set to ``--word-a`` and ``--word-b`` (two style words the model was taught), and
with the ``--word-a`` token's input embedding pushed in a random direction by ``--move`` times
its own norm, and reports the mean absolute pixel difference (images in [0, 1]) of each pair
against the unchanged ``--word-a`` draw. A model that ignores the slot gives figures near 0.

    .venv/bin/python scripts/style_slot_probe.py --model assets/emoji-sd [--sheet docs/emoji_sd_base.png]

``--sheet`` also draws the pretraining's twelve preview concepts (seed 0, 25 steps, guidance 4)
in three rows: the plain caption, "... in the style of <word-a>", "... in the style of <word-b>".
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

from common.emoji import caption  # noqa: E402
from teach_emoji_styles import style_sheet, styled  # noqa: E402  (scripts/ is on sys.path)

CONCEPTS = ("cat face", "red heart", "car", "deciduous tree")


def draw(pipe, prompts: list[str], seed: int, steps: int, guidance: float) -> np.ndarray:
    gen = torch.Generator().manual_seed(seed)
    return pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=gen, output_type="np").images


@torch.no_grad()
def probe(pipe, *, word_a: str, word_b: str, move: float, concepts=CONCEPTS, seeds=(0, 1),
          steps: int = 25, guidance: float = 4.0) -> dict:
    """Mean |pixel difference| of (word_b vs word_a) and (moved word_a vs word_a), over prompts and seeds."""
    ids = pipe.tokenizer(word_a, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ValueError(f"--word-a: {word_a!r} is {len(ids)} tokens for this tokenizer; the probe moves one token")
    table = pipe.text_encoder.get_input_embeddings().weight
    original = table[ids[0]].clone()
    direction = torch.randn(original.shape, generator=torch.Generator().manual_seed(1234))
    moved = original + move * original.norm() * direction / direction.norm()
    base_prompts = [styled(caption((c,)), word_a) for c in concepts]
    other_prompts = [styled(caption((c,)), word_b) for c in concepts]
    word_diff, move_diff = [], []
    for seed in seeds:
        a = draw(pipe, base_prompts, seed, steps, guidance)
        word_diff.append(np.abs(draw(pipe, other_prompts, seed, steps, guidance) - a).mean())
        table[ids[0]] = moved
        try:
            move_diff.append(np.abs(draw(pipe, base_prompts, seed, steps, guidance) - a).mean())
        finally:
            table[ids[0]] = original
    return {"word_a": word_a, "word_b": word_b, "move_times_norm": move, "token_norm": float(original.norm()),
            "concepts": list(concepts), "seeds": list(seeds),
            "mean_abs_pixel_diff": {f"{word_b} vs {word_a}": float(np.mean(word_diff)),
                                    f"{word_a} moved vs {word_a}": float(np.mean(move_diff))}}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=REPO_ROOT / "assets" / "emoji-sd")
    p.add_argument("--word-a", default="flat")
    p.add_argument("--word-b", default="outline")
    p.add_argument("--move", type=float, default=1.0, help="size of the random move, in units of the token's norm")
    p.add_argument("--sheet", type=Path, help="also write the three-row sheet of the preview concepts here")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(args.model, torch_dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    print(json.dumps(probe(pipe, word_a=args.word_a, word_b=args.word_b, move=args.move), indent=1))
    if args.sheet:
        style_sheet(pipe, args.sheet, (None, args.word_a, args.word_b))
        print(f"wrote {args.sheet}")


if __name__ == "__main__":
    main()
