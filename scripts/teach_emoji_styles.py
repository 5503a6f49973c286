"""Stage 4 of the embedded base model: teach the pretrained emoji model that drawings have a style.

``scripts/pretrain_emoji_sd.py`` trains on one drawing style only (Twemoji), so the model it
makes has no notion of style: its captions never vary there, and a textual-inversion token put
after "in the style of" is all but ignored (``scripts/style_slot_probe.py``: "outline" instead
of "flat" there moved the images by 0.077 in mean absolute pixel value; after this stage 0.210). DPAgg-TI (Peetathawatchai et al.,
arXiv 2411.14639) learns a *style* token, so the base it adapts must read a style slot.

This stage fine-tunes that model (UNet and text encoder together, from its weights, with the
same loss, Min-SNR weights and EMA as stage 3) on the same concepts drawn in two open styles:

- **Twemoji** (CC-BY 4.0), captioned "an emoji of a cat" or, half of the time,
  "an emoji of a cat in the style of flat";
- **OpenMoji** (CC BY-SA 4.0, the ``openmoji`` npm package's colour SVGs rasterised with
  cairosvg), the emoji with the same code points, always captioned
  "an emoji of a cat in the style of outline".

The plain caption keeps drawing Twemoji, so the base grid is unchanged in kind, while the words
after "in the style of" now select a drawing style, which is where the demo's placeholder
token goes. Noto emoji, the demo's private set, are *not* used here. The VAE and its
``scaling_factor`` are kept as they are (OpenMoji's thin outlines reconstruct at a lower PSNR
than Twemoji through it; the model card gives both).

Rebuild, after stages 1-3 (``pretrain_emoji_sd.py``) have written their folder (about 20 min
on 2 CPU cores; needs ``pip install cairosvg``, which the project's setup does not install)::

    python scripts/teach_emoji_styles.py --base STAGE3 --twemoji-dir PATH/package \\
        --openmoji-dir PATH/package --out assets/emoji-sd --steps 2500 --threads 2
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from common.emoji import EmojiImage, caption, list_emoji, load_pixels  # noqa: E402
from pretrain_emoji_sd import (  # noqa: E402  (scripts/ is on sys.path)
    PREVIEW_PROMPTS, THINGS_ONLY, build_scheduler, ema_update, lr_at, plot_curves, sheet, smooth, to_tensor,
)

TWEMOJI_WORD = "flat"
OPENMOJI_WORD = "outline"


def styled(names_caption: str, word: str | None) -> str:
    """``"an emoji of a cat"`` -> ``"an emoji of a cat in the style of outline"`` (``word`` None: as is)."""
    return names_caption if word is None else f"{names_caption} in the style of {word}"


def openmoji_file(svg_dir: Path, image: EmojiImage) -> Path | None:
    """The OpenMoji colour SVG of a Twemoji image's code point, if OpenMoji draws it."""
    code = image.path.stem.upper()
    for candidate in (code, code.replace("-FE0F", "")):
        path = svg_dir / f"{candidate}.svg"
        if path.is_file():
            return path
    return None


def rasterise(svg: Path, resolution: int) -> np.ndarray:
    """An OpenMoji SVG drawn at 64x64, flattened onto white, box-filtered to ``resolution``."""
    import cairosvg  # only this build script needs it: pip install cairosvg

    png = cairosvg.svg2png(url=str(svg), output_width=64, output_height=64)
    rgba = Image.open(io.BytesIO(png)).convert("RGBA")
    rgb = Image.new("RGB", rgba.size, (255, 255, 255))
    rgb.paste(rgba, mask=rgba.getchannel("A"))
    return np.asarray(rgb.resize((resolution, resolution), Image.BOX), dtype=np.uint8)


def load_sets(args) -> tuple[list[EmojiImage], np.ndarray, list[EmojiImage], np.ndarray]:
    """Twemoji images of things and the OpenMoji drawings of the same code points (cached)."""
    twemoji = list_emoji(args.twemoji_dir, "twitter", skin_tones=False, skip_categories=THINGS_ONLY)
    cache = args.work / f"openmoji_{args.resolution}.npz"
    pairs = [(im, openmoji_file(args.openmoji_dir / "color" / "svg", im)) for im in twemoji]
    paired = [im for im, svg in pairs if svg is not None]
    if cache.is_file():
        open_px = np.load(cache)["pixels"]
    else:
        open_px = np.stack([rasterise(svg, args.resolution) for _, svg in tqdm(pairs, desc="rasterise") if svg is not None])
        np.savez_compressed(cache, pixels=open_px)
    if len(open_px) != len(paired):
        raise ValueError(f"{cache}: holds {len(open_px)} images, the packages give {len(paired)}; delete it")
    return twemoji, load_pixels(twemoji, args.resolution), paired, open_px


def caption_table(tokenizer, twemoji, openmoji):
    """Token ids of every caption, and for each training image the rows it may be shown with."""
    texts: list[str] = []
    row: dict[str, int] = {}

    def rows_for(im: EmojiImage, words: tuple[str | None, ...]) -> torch.Tensor:
        out = []
        for name in im.names:
            for word in words:
                text = styled(caption((name,)), word)
                if text not in row:
                    row[text] = len(texts)
                    texts.append(text)
                out.append(row[text])
        return torch.tensor(out)

    choices = [rows_for(im, (None, TWEMOJI_WORD)) for im in twemoji] + [rows_for(im, (OPENMOJI_WORD,)) for im in openmoji]
    ids = tokenizer(texts + [""], padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    return ids, choices


@torch.no_grad()
def style_sheet(pipe, path: Path, words: tuple[str | None, ...], *, seed: int = 0) -> None:
    """One row of the preview concepts per style word (None: the plain caption), same seed,
    25 DDIM steps, guidance 4."""
    images = []
    for word in words:
        prompts = [styled(caption((p,)), word) for p in PREVIEW_PROMPTS]
        images += pipe(prompts, num_inference_steps=25, guidance_scale=4.0,
                       generator=torch.Generator().manual_seed(seed)).images
    sheet(images, cols=len(PREVIEW_PROMPTS), scale=2).save(path)


def preview(pipe, path: Path) -> None:
    """Rows: plain captions, "... in the style of flat", "... in the style of outline" (seed 0)."""
    style_sheet(pipe, path, (None, TWEMOJI_WORD, OPENMOJI_WORD))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", type=Path, required=True, help="the folder pretrain_emoji_sd.py wrote")
    p.add_argument("--twemoji-dir", type=Path, required=True, help="unpacked emoji-datasource-twitter package/")
    p.add_argument("--openmoji-dir", type=Path, required=True, help="unpacked openmoji package/ (npm pack openmoji@17.0.0)")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "assets" / "emoji-sd")
    p.add_argument("--work", type=Path, default=REPO_ROOT / ".cache" / "emoji-styles-work")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--min-snr-gamma", type=float, default=5.0)
    p.add_argument("--preview-every", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.base.resolve() == args.out.resolve():
        raise ValueError("--out: must differ from --base (the base is read while the result is written)")
    t0 = time.time()

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(args.base, torch_dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    unet, text_encoder, vae, tokenizer = pipe.unet, pipe.text_encoder, pipe.vae, pipe.tokenizer
    twemoji, tw_px, openmoji, om_px = load_sets(args)
    print(f"{len(twemoji)} Twemoji and {len(openmoji)} OpenMoji images at {args.resolution}x{args.resolution}")
    scale = float(vae.config.scaling_factor)
    with torch.no_grad():
        x = to_tensor(np.concatenate([tw_px, om_px]))
        latents = torch.cat([torch.stack([vae.encode(c).latent_dist.mean, vae.encode(c.flip(-1)).latent_dist.mean], 1)
                             for c in x.split(256)]) * scale
    print(f"latent std: Twemoji {latents[:len(twemoji)].std():.3f}, OpenMoji {latents[len(twemoji):].std():.3f}")
    ids, choices = caption_table(tokenizer, twemoji, openmoji)
    empty_row = len(ids) - 1

    unet.train()
    text_encoder.train()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, fused=True)
    ema = [q.detach().clone() for q in params]
    scheduler = build_scheduler()
    snr = scheduler.alphas_cumprod / (1 - scheduler.alphas_cumprod)
    weight_of_t = snr.clamp(max=args.min_snr_gamma) / snr if args.min_snr_gamma > 0 else torch.ones_like(snr)
    gen = torch.Generator().manual_seed(args.seed)
    losses: list[float] = []
    n = len(latents)
    started = time.time()
    for step in (bar := tqdm(range(args.steps), desc="styles", unit="step", dynamic_ncols=True)):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        idx = torch.randint(0, n, (args.batch,), generator=gen)
        x0 = latents[idx, torch.randint(0, 2, (args.batch,), generator=gen)]
        rows = torch.stack([choices[i][torch.randint(0, len(choices[i]), (1,), generator=gen)][0] for i in idx.tolist()])
        rows = torch.where(torch.rand(args.batch, generator=gen) < args.caption_dropout, torch.full_like(rows, empty_row), rows)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch,), generator=gen)
        per_sample = (unet(scheduler.add_noise(x0, noise, t), t, text_encoder(ids[rows]).last_hidden_state).sample
                      - noise).pow(2).mean(dim=(1, 2, 3))
        opt.zero_grad(set_to_none=True)
        (weight_of_t[t] * per_sample).mean().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_update(ema, params, min(args.ema_decay, (1 + step) / (10 + step)))
        losses.append(float(per_sample.detach().mean()))
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-200:]):.4f}")
        if (step + 1) % args.preview_every == 0 or step + 1 == args.steps:
            live = [q.detach().clone() for q in params]
            with torch.no_grad():
                torch._foreach_copy_(params, ema)
            unet.eval(), text_encoder.eval()
            preview(pipe, args.work / f"preview_{step + 1:06d}.png")
            if step + 1 < args.steps:  # back to the live weights
                with torch.no_grad():
                    torch._foreach_copy_(params, live)
                unet.train(), text_encoder.train()
    seconds = time.time() - started  # the EMA weights are in the models now: export them

    staging = args.out.parent / f".{args.out.name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    pipe.to(torch.float16).save_pretrained(staging, safe_serialization=True)
    te_config = staging / "text_encoder" / "config.json"  # see pretrain_emoji_sd.export
    te_config.write_text(te_config.read_text().replace('"dtype": "float16"', '"dtype": "float32"'))
    for config in [staging / "model_index.json", *staging.glob("*/config.json")]:  # no /tmp paths in the asset
        values = json.loads(config.read_text())
        if values.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(values, indent=2) + "\n")
    shutil.rmtree(staging / "tokenizer")  # unchanged: the base's files as they are (save_pretrained adds call defaults)
    shutil.copytree(args.base / "tokenizer", staging / "tokenizer")
    meta = json.loads((args.base / "training.json").read_text())
    meta["styles"] = {
        "source": "emoji-datasource-twitter@16.0.0 (Twemoji, CC-BY 4.0) and openmoji@17.0.0 (colour SVGs, CC BY-SA 4.0)",
        "num_twemoji": len(twemoji), "num_openmoji": len(openmoji),
        "captions": {"twemoji": [caption(("cat",)), styled(caption(("cat",)), TWEMOJI_WORD)],
                     "openmoji": [styled(caption(("cat",)), OPENMOJI_WORD)]},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                     if k not in ("twemoji_dir", "openmoji_dir", "out", "work", "base")},
        "steps": args.steps, "seconds": round(seconds, 1),
        "loss_mean_first_100": float(np.mean(losses[:100])), "loss_mean_last_500": float(np.mean(losses[-500:])),
        "loss_curve_every_100_steps": smooth(losses, 100),
        "wall_seconds_this_invocation": round(time.time() - t0, 1),
    }
    (staging / "training.json").write_text(json.dumps(meta, indent=1) + "\n")
    plot_curves({"stage 3 (Twemoji)": meta["loss_curve_every_100_steps"],
                 "stage 4 (styles)": [(meta["unet"]["steps"] + s, v) for s, v in meta["styles"]["loss_curve_every_100_steps"]]},
                staging / "loss_curve.png", "UNet epsilon-prediction MSE (mean of 100 steps)")
    for name in ("README.md", "LICENSE.md"):
        for src in (args.out / name, args.base / name):
            if src.is_file():
                shutil.copy(src, staging / name)
                break
    shutil.rmtree(args.out, ignore_errors=True)
    staging.replace(args.out)
    print(f"wrote {args.out} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
