"""Pretrain the embedded base model from scratch: a tiny Stable Diffusion that draws emoji.

The result is a diffusers folder (VAE, CLIP text encoder with the real CLIP tokenizer, UNet,
DDIM scheduler) that ``StableDiffusionPipeline.from_pretrained(folder)`` loads offline. It is
trained on Twemoji (CC-BY 4.0) from the ``emoji-datasource-twitter`` npm package at 32x32
pixels, with captions made from the emoji names ("an emoji of a cat face"). Skin-tone variants
are left out, and so, by default, are the People & Body and Symbols categories (``--skip-categories``):
the 1,026 emoji of things each get 1.6x the training steps they would get among all 1,636.

Three stages, each saved under ``--work`` so that a crash or a stop costs at most one
checkpoint interval (a finished stage is skipped when the script is run again):

1. **VAE.** An ``AutoencoderKL`` that downsamples by 4 (32x32x3 -> 8x8x4), trained as a plain
   autoencoder on the posterior mean (L1 + MSE, a small L2 pull on the latents and a little
   latent noise so that the decoder tolerates imperfect diffusion samples). Its log-variance
   head is fixed at the floor (-30), so ``latent_dist.sample()`` equals the mean to 1e-6: the
   encoder is deterministic in effect, which matters for membership and utility measurements
   on this base (see ENV.md, "mind the base").
2. **Latents.** Every image and its mirror image are encoded once; ``scaling_factor`` is set to
   1/std of the latents, so the diffusion model sees unit-variance data (as SD's 0.18215 does).
3. **UNet + text encoder.** A small ``UNet2DConditionModel`` with cross-attention and a small
   ``CLIPTextModel`` are trained jointly on the epsilon-prediction loss of DDPM (Ho et al.
   2020) with SD's scaled-linear betas, 10% empty captions for classifier-free guidance (Ho &
   Salimans 2022), Min-SNR-5 loss weights (Hang et al. 2023), AdamW, warm-up and cosine
   decay, and an exponential moving average of the weights, which is what is exported. The text encoder is trained (not frozen random) because
   at this size a random encoder separates the concepts poorly and the UNet then learns
   conditioning slowly; training it only moves the token rows the captions use.

Outputs in ``--out``: the pipeline (fp16 safetensors), ``training.json`` (settings, timings,
losses) and ``loss_curve.png``; in ``--work``: checkpoints and sample grids during training.

The committed model (assets/emoji-sd) is this script's output followed by a fourth stage,
``scripts/teach_emoji_styles.py`` (the same things drawn by OpenMoji, captioned "... in the
style of outline", so that the words after "in the style of" select a drawing style).

Rebuild (the package from ``npm pack emoji-datasource-twitter@16.0.0``, unpacked); stages 1-3
of the committed checkpoint were made by the first call (its VAE stage taken over from the
previous build, which the second call trains anew), see assets/emoji-sd/README.md::

    python scripts/pretrain_emoji_sd.py --package-dir PATH/package --out STAGE3 --vae-from assets/emoji-sd --threads 2 --unet-steps 6500 --checkpoint-every 500
    python scripts/pretrain_emoji_sd.py --package-dir PATH/package --out STAGE3 --threads 2 --unet-steps 6500 --checkpoint-every 500
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from common.emoji import SKIPPED_CATEGORIES, caption, list_emoji, load_pixels  # noqa: E402
from common.tiny_sd import BOS_ID, CLIP_VOCAB_SIZE, EOS_ID, MAX_LENGTH, build_clip_tokenizer  # noqa: E402

LOGVAR_FLOOR = -30.0  # DiagonalGaussianDistribution clamps log-variance to [-30, 20]
# Trained on by default: smileys, animals and nature, food, travel and places, activities and
# objects. People & Body (386 images, mostly gendered and professional variants of the same
# figures) and Symbols (224: arrows, signs, keycaps, zodiac) are left out, so the 1,026 images
# of things get 1.6x the steps they would get among all 1,636.
THINGS_ONLY = SKIPPED_CATEGORIES + ("People & Body", "Symbols")
PREVIEW_PROMPTS = ("cat face", "dog face", "red heart", "sun", "car", "deciduous tree", "fox face",
                   "pizza", "rocket", "house", "fish", "grinning face")


# ----------------------------------------------------------------------------- model parts
def build_vae(resolution: int, channels: tuple[int, ...] = (32, 64, 128)):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=resolution,
        block_out_channels=channels, layers_per_block=1, norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * len(channels), up_block_types=("UpDecoderBlock2D",) * len(channels),
    )
    # fix the log-variance half of the posterior at the floor: a deterministic encoder in effect
    with torch.no_grad():
        half = vae.quant_conv.out_channels // 2
        vae.quant_conv.weight[half:].zero_()
        vae.quant_conv.bias[half:].fill_(LOGVAR_FLOOR)
    return vae


def build_text_encoder(width: int, layers: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE, hidden_size=width, intermediate_size=4 * width,
        num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=MAX_LENGTH,
        projection_dim=width, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID,
    ))


def build_unet(latent_size: int, channels: tuple[int, ...], cross_dim: int):
    from diffusers import UNet2DConditionModel

    n = len(channels)
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, block_out_channels=channels,
        layers_per_block=1, norm_num_groups=32, cross_attention_dim=cross_dim, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
    )


def build_scheduler():
    """DDIM over SD's scaled-linear betas; training uses its ``add_noise`` (same as DDPM's)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                         steps_offset=1, timestep_spacing="trailing", prediction_type="epsilon")


# ----------------------------------------------------------------------------- helpers
def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1]."""
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_images(x: torch.Tensor) -> list[Image.Image]:
    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def sheet(images: list[Image.Image], cols: int, scale: int = 2) -> Image.Image:
    w, h = images[0].size
    rows = math.ceil(len(images) / cols)
    out = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        out.paste(im, ((i % cols) * w, (i // cols) * h))
    return out.resize((cols * w * scale, rows * h * scale), Image.NEAREST)


def plot_curves(curves: dict[str, list[tuple[int, float]]], path: Path, title: str) -> None:
    """A minimal log-scale line plot with PIL (no matplotlib in the environment)."""
    W, H, pad = 720, 420, 50
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    pts = [p for c in curves.values() for p in c if p[1] > 0]
    if not pts:
        return
    xmax = max(p[0] for p in pts) or 1
    lo, hi = math.log10(min(p[1] for p in pts)), math.log10(max(p[1] for p in pts))
    hi = hi if hi > lo else lo + 1
    def xy(step: float, val: float) -> tuple[float, float]:
        return (pad + (W - 2 * pad) * step / xmax, H - pad - (H - 2 * pad) * (math.log10(val) - lo) / (hi - lo))
    d.rectangle([pad, pad, W - pad, H - pad], outline="black")
    for k in range(5):
        v = 10 ** (lo + (hi - lo) * k / 4)
        y = xy(0, v)[1]
        d.line([pad - 4, y, pad, y], fill="black")
        d.text((2, y - 6), f"{v:.3g}", fill="black")
    d.text((W / 2 - 20, H - pad + 8), f"step (max {xmax})", fill="black")
    d.text((pad, 12), title, fill="black")
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    for i, (name, c) in enumerate(curves.items()):
        c = [p for p in c if p[1] > 0]
        if len(c) > 1:
            d.line([xy(*p) for p in c], fill=colours[i % 4], width=2)
        d.text((W - pad - 180, pad + 8 + 14 * i), name, fill=colours[i % 4])
    img.save(path)


def smooth(values: list[float], every: int) -> list[tuple[int, float]]:
    """Means over consecutive windows of ``every`` steps, as (last step, mean)."""
    return [(i + every, float(np.mean(values[i:i + every]))) for i in range(0, len(values) - every + 1, every)]


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# ----------------------------------------------------------------------------- stage 1: VAE
def adopt_vae(source: Path, work: Path) -> dict:
    """Stage 1 taken from an earlier build: its VAE (fp16 on disk) saved in fp32 as this build's.

    The VAE stage does not depend on the UNet's settings, so a build that changes only the UNet
    stage can reuse the VAE of one made by this script; ``training.json`` then says so."""
    from diffusers import AutoencoderKL

    source = Path(source)
    vae = AutoencoderKL.from_pretrained(source / "vae" if (source / "vae").is_dir() else source,
                                        torch_dtype=torch.float32)
    if float(vae.quant_conv.bias.detach()[vae.quant_conv.out_channels // 2:].max()) > LOGVAR_FLOOR + 1:
        raise ValueError(f"--vae-from {source}: not a VAE of this script (its log-variance is not fixed at the floor)")
    vae.save_pretrained(work / "vae")
    earlier = source / "training.json" if (source / "vae").is_dir() else source.parent / "training.json"
    log = {k: v for k, v in json.loads(earlier.read_text()).get("vae", {}).items()} if earlier.is_file() else {}
    log.update({"adopted_from": str(source), "curve": []})
    (work / "vae_log.json").write_text(json.dumps(log))
    return log


def train_vae(pixels: torch.Tensor, args, work: Path) -> dict:
    done = work / "vae"
    if (done / "config.json").is_file():
        return json.loads((work / "vae_log.json").read_text())
    if args.vae_from is not None:
        return adopt_vae(args.vae_from, work)
    torch.manual_seed(args.seed)
    vae = build_vae(args.resolution, tuple(args.vae_channels)).train()
    params = [p for n, p in vae.named_parameters()]
    opt = torch.optim.AdamW(params, lr=args.vae_lr, weight_decay=0.0, fused=True)
    gen = torch.Generator().manual_seed(args.seed)
    losses: list[float] = []
    started = time.time()
    bar = tqdm(range(args.vae_steps), desc="VAE", unit="step", dynamic_ncols=True)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.vae_steps, args.vae_lr, 100)
        idx = torch.randint(0, len(pixels), (args.vae_batch,), generator=gen)
        x = pixels[idx]
        flip = torch.rand(len(idx), generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        # encode to the posterior mean, add a little noise, decode
        z = vae.encode(x).latent_dist.mean
        z_noisy = z + args.vae_latent_noise * z.detach().std() * torch.randn(z.shape, generator=gen)
        rec = vae.decode(z_noisy).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + args.vae_latent_l2 * z.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss))
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    vae.eval()
    with torch.no_grad():
        held = pixels[:: max(1, len(pixels) // 256)][:256]
        rec = vae.decode(vae.encode(held).latent_dist.mean).sample
        mse = float(F.mse_loss(rec, held))
        psnr = float(10 * math.log10(4.0 / mse))  # data range [-1, 1] -> peak-to-peak 2
    sheet(to_images(torch.cat([held[:16], rec[:16]])), cols=16, scale=3).save(work / "vae_reconstructions.png")
    log = {"steps": args.vae_steps, "seconds": round(time.time() - started, 1), "final_loss": float(np.mean(losses[-100:])),
           "recon_mse": mse, "recon_psnr_db": psnr, "curve": smooth(losses, 50)}
    vae.save_pretrained(done)
    (work / "vae_log.json").write_text(json.dumps(log))
    return log


# ----------------------------------------------------------------------------- stage 2: latents
@torch.no_grad()
def encode_all(pixels: torch.Tensor, work: Path) -> tuple[torch.Tensor, float]:
    """Latents of every image and its mirror image (unscaled), and the scaling factor 1/std."""
    path = work / "latents.pt"
    if path.is_file():
        saved = torch.load(path)
        return saved["latents"], saved["scale"]
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(work / "vae").eval()
    chunks = []
    for x in tqdm(pixels.split(256), desc="encode", unit="batch"):
        chunks.append(torch.stack([vae.encode(x).latent_dist.mean, vae.encode(x.flip(-1)).latent_dist.mean], 1))
    latents = torch.cat(chunks)  # [N, 2 (orig, mirror), 4, h, w]
    scale = float(1.0 / latents.std())
    torch.save({"latents": latents, "scale": scale}, path)
    return latents, scale


# ----------------------------------------------------------------------------- stage 3: UNet
def tokenize_names(tokenizer, images) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of every caption variant: ``ids[k]`` for variant k, ``owner[k]`` = image index."""
    unique = sorted({n for im in images for n in im.names})
    row = {n: i for i, n in enumerate(unique)}
    ids = tokenizer([caption((n,)) for n in unique] + [""], padding="max_length",
                    max_length=MAX_LENGTH, truncation=True, return_tensors="pt").input_ids
    choices = [torch.tensor([row[n] for n in im.names]) for im in images]
    return ids, choices


def ema_update(ema: list[torch.Tensor], params: list[torch.nn.Parameter], decay: float) -> None:
    with torch.no_grad():
        torch._foreach_mul_(ema, decay)
        torch._foreach_add_(ema, [p.detach() for p in params], alpha=1 - decay)


@torch.no_grad()
def preview(unet, text_encoder, tokenizer, vae, scale, path: Path, *, steps: int = 25, guidance: float = 4.0) -> None:
    from diffusers import StableDiffusionPipeline

    vae.register_to_config(scaling_factor=scale)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=build_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    prompts = [caption((p,)) for p in PREVIEW_PROMPTS]
    images = []
    for seed in (0, 1):
        gen = torch.Generator().manual_seed(seed)
        images += pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=gen).images
    sheet(images, cols=len(prompts), scale=2).save(path)


def train_unet(latents: torch.Tensor, scale: float, images, tokenizer, args, work: Path) -> dict:
    from diffusers import AutoencoderKL

    ckpt_path = work / "unet_ckpt.pt"
    torch.manual_seed(args.seed + 1)
    unet = build_unet(args.resolution // 4, tuple(args.unet_channels), args.text_width).train()
    text_encoder = build_text_encoder(args.text_width, args.text_layers).train()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.unet_lr, weight_decay=0.0, fused=True)
    ema = [p.detach().clone() for p in params]
    state = {"step": 0, "losses": [], "seconds": 0.0}
    if ckpt_path.is_file():
        ck = torch.load(ckpt_path)
        unet.load_state_dict(ck["unet"])
        text_encoder.load_state_dict(ck["text_encoder"])
        opt.load_state_dict(ck["opt"])
        ema = ck["ema"]
        state = ck["state"]
        torch.set_rng_state(ck["rng"])
        print(f"resumed at step {state['step']}")
    scheduler = build_scheduler()
    vae = AutoencoderKL.from_pretrained(work / "vae").eval()
    ids, choices = tokenize_names(tokenizer, images)
    empty_row = len(ids) - 1
    data = latents * scale
    n = len(images)
    # Min-SNR-gamma loss weights (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
    # Weighting Strategy"): for epsilon prediction, w(t) = min(SNR(t), gamma) / SNR(t), which
    # stops the many nearly-clean timesteps (fine detail) from dominating the gradient and
    # makes the coarse shapes, what a 32-pixel emoji is made of, converge faster.
    snr = scheduler.alphas_cumprod / (1 - scheduler.alphas_cumprod)
    weight_of_t = (snr.clamp(max=args.min_snr_gamma) / snr) if args.min_snr_gamma > 0 else torch.ones_like(snr)
    gen = torch.Generator().manual_seed(args.seed + 2 + state["step"])
    started = time.time() - state["seconds"]
    bar = tqdm(range(state["step"], args.unet_steps), desc="UNet", unit="step", dynamic_ncols=True,
               initial=state["step"], total=args.unet_steps)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.unet_steps, args.unet_lr, 500)
        # a batch: random images, random mirror, random caption variant, 10% empty captions
        idx = torch.randint(0, n, (args.unet_batch,), generator=gen)
        mirror = torch.randint(0, 2, (args.unet_batch,), generator=gen)
        x0 = data[idx, mirror]
        rows = torch.stack([choices[i][torch.randint(0, len(choices[i]), (1,), generator=gen)][0] for i in idx.tolist()])
        drop = torch.rand(args.unet_batch, generator=gen) < args.caption_dropout
        rows = torch.where(drop, torch.full_like(rows, empty_row), rows)
        hidden = text_encoder(ids[rows]).last_hidden_state
        # forward diffusion at a random timestep, then the epsilon-prediction loss
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (args.unet_batch,), generator=gen)
        noisy = scheduler.add_noise(x0, noise, t)
        per_sample = (unet(noisy, t, hidden).sample - noise).pow(2).mean(dim=(1, 2, 3))
        loss = per_sample.mean()  # the plain epsilon MSE: what the curve shows
        opt.zero_grad(set_to_none=True)
        (weight_of_t[t].to(per_sample.dtype) * per_sample).mean().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_update(ema, params, min(args.ema_decay, (1 + step) / (10 + step)))
        state["losses"].append(float(loss))
        state["step"] = step + 1
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(state['losses'][-200:]):.4f}", lr=f"{opt.param_groups[0]['lr']:.1e}")
        last = step + 1 == args.unet_steps
        if (step + 1) % args.checkpoint_every == 0 or last:
            state["seconds"] = time.time() - started
            tmp = ckpt_path.with_suffix(".tmp")
            torch.save({"unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(), "opt": opt.state_dict(),
                        "ema": ema, "state": state, "rng": torch.get_rng_state()}, tmp)
            tmp.replace(ckpt_path)
            plot_curves({"UNet loss (mean of 100 steps)": smooth(state["losses"], 100)}, work / "unet_loss.png",
                        "UNet epsilon-prediction MSE")
            ema_unet, ema_text = ema_models(unet, text_encoder, ema, args)
            preview(ema_unet, ema_text, tokenizer, vae, scale, work / f"preview_{step + 1:06d}.png")
    state["seconds"] = time.time() - started
    return state


def ema_models(unet, text_encoder, ema, args):
    """Copies of the two trained models holding the EMA weights."""
    u = build_unet(args.resolution // 4, tuple(args.unet_channels), args.text_width)
    t = build_text_encoder(args.text_width, args.text_layers)
    u.load_state_dict(unet.state_dict())
    t.load_state_dict(text_encoder.state_dict())
    with torch.no_grad():
        for p, e in zip(list(u.parameters()) + list(t.parameters()), ema):
            p.copy_(e)
    return u.eval(), t.eval()


# ----------------------------------------------------------------------------- export
def export(args, work: Path, tokenizer, scale: float, meta: dict) -> None:
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    ck = torch.load(work / "unet_ckpt.pt")
    unet = build_unet(args.resolution // 4, tuple(args.unet_channels), args.text_width)
    text_encoder = build_text_encoder(args.text_width, args.text_layers)
    unet.load_state_dict(ck["unet"])
    text_encoder.load_state_dict(ck["text_encoder"])
    unet, text_encoder = ema_models(unet, text_encoder, ck["ema"], args)
    vae = AutoencoderKL.from_pretrained(work / "vae").eval()
    vae.register_to_config(scaling_factor=scale)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=build_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    staging = args.out.parent / f".{args.out.name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    pipe.to(torch.float16).save_pretrained(staging, safe_serialization=True)
    # stored in fp16 to stay small; transformers 5 would load the text encoder in the stored
    # dtype while diffusers loads the UNet in fp32, so declare fp32 as the text encoder's dtype
    te_config = staging / "text_encoder" / "config.json"
    te_config.write_text(te_config.read_text().replace('"dtype": "float16"', '"dtype": "float32"'))
    for config in staging.glob("*/config.json"):  # no path of the building machine in the asset
        values = json.loads(config.read_text())
        if values.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(values, indent=2) + "\n")
    (staging / "training.json").write_text(json.dumps(meta, indent=1) + "\n")
    plot_curves({"UNet loss (mean of 100 steps)": smooth(ck["state"]["losses"], 100)}, staging / "loss_curve.png",
                f"UNet epsilon-prediction MSE, {ck['state']['step']} steps")
    keep = [p for p in (args.out / "README.md", args.out / "LICENSE.md") if p.is_file()]
    for p in keep:
        shutil.copy(p, staging / p.name)
    shutil.rmtree(args.out, ignore_errors=True)
    staging.replace(args.out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--package-dir", type=Path, required=True, help="unpacked emoji-datasource-twitter package/")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "assets" / "emoji-sd")
    p.add_argument("--work", type=Path, default=REPO_ROOT / ".cache" / "emoji-sd-work")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-categories", nargs="*", default=list(THINGS_ONLY),
                   help="emoji.json categories left out of training (default: flags, swatches, people, symbols)")
    p.add_argument("--vae-from", type=Path, default=None,
                   help="take stage 1 (the VAE) from an earlier build's folder instead of training it")
    p.add_argument("--vae-steps", type=int, default=1200)
    p.add_argument("--vae-channels", type=int, nargs="+", default=[32, 64, 64])
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--vae-latent-l2", type=float, default=1e-3)
    p.add_argument("--vae-latent-noise", type=float, default=0.1)
    p.add_argument("--unet-steps", type=int, default=6500)
    p.add_argument("--unet-batch", type=int, default=32)
    p.add_argument("--unet-lr", type=float, default=1e-3)
    p.add_argument("--unet-channels", type=int, nargs="+", default=[64, 128, 128])
    p.add_argument("--text-width", type=int, default=64)
    p.add_argument("--text-layers", type=int, default=3)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--min-snr-gamma", type=float, default=5.0, help="Min-SNR loss weighting; 0 = plain MSE")
    p.add_argument("--skin-tones", action="store_true",
                   help="also train on the skin-tone variants (1,580 more people images of the same names)")
    p.add_argument("--checkpoint-every", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    images = list_emoji(args.package_dir, "twitter", skin_tones=args.skin_tones,
                        skip_categories=tuple(args.skip_categories))
    pixels = to_tensor(load_pixels(images, args.resolution))
    print(f"{len(images)} Twemoji images at {args.resolution}x{args.resolution}")
    tokenizer = build_clip_tokenizer(args.work / "tokenizer")

    vae_log = train_vae(pixels, args, args.work)
    print(f"VAE: {vae_log['seconds']} s, reconstruction PSNR {vae_log['recon_psnr_db']:.2f} dB")
    latents, scale = encode_all(pixels, args.work)
    print(f"latents {tuple(latents.shape)}, scaling_factor {scale:.4f}")
    state = train_unet(latents, scale, images, tokenizer, args, args.work)

    n_params = lambda m: sum(x.numel() for x in m.parameters())  # noqa: E731
    meta = {
        "source": "emoji-datasource-twitter@16.0.0 (Twemoji 64x64 PNGs, CC-BY 4.0)",
        "num_images": len(images),
        "resolution": args.resolution,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("package_dir", "out", "work")},
        "scaling_factor": scale,
        "vae": {k: v for k, v in vae_log.items() if k != "curve"},
        "unet": {"steps": state["step"], "seconds": round(state["seconds"], 1),
                 "final_loss_mean_last_1000": float(np.mean(state["losses"][-1000:])),
                 "first_loss_mean_first_100": float(np.mean(state["losses"][:100]))},
        "params": {"unet": n_params(build_unet(args.resolution // 4, tuple(args.unet_channels), args.text_width)),
                   "text_encoder": n_params(build_text_encoder(args.text_width, args.text_layers)),
                   "vae": n_params(build_vae(args.resolution, tuple(args.vae_channels)))},
        "wall_seconds_this_invocation": round(time.time() - t0, 1),
        "loss_curve_every_100_steps": smooth(state["losses"], 100),
        "vae_loss_curve_every_50_steps": vae_log["curve"],
    }
    export(args, args.work, tokenizer, scale, meta)
    print(f"wrote {args.out} ({sum(f.stat().st_size for f in args.out.rglob('*') if f.is_file()) / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
