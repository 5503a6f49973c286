"""A tiny, randomly initialised Stable Diffusion pipeline built offline, for plumbing tests.

Nothing here downloads anything. :func:`build_tiny_sd` builds every part of a Stable
Diffusion 1.x-format pipeline from its config under a fixed seed and ``save_pretrained``\\ s it,
so ``StableDiffusionPipeline.from_pretrained(out_dir)`` loads it with no network. The parts have
the real SD layout (a UNet that downsamples latents by 8 relative to pixels, a KL-VAE with 4
latent channels, a CLIP text encoder, DDPM with SD's scaled-linear betas) at a few hundred
thousand parameters, so training, DP-SGD, federated rounds and adapter export run in seconds on
a CPU. The tokenizer is the real CLIP BPE tokenizer (49,408 tokens), rebuilt from the committed
``assets/clip_tokenizer/bpe_simple_vocab_16e6.txt.gz`` exactly as OpenAI's CLIP builds it, so
prompts tokenize to the same ids as with a real SD checkpoint.

The weights are random: this model cannot draw pictures, and privacy or utility figures
measured on it mean nothing. Use a pretrained base for evaluation and demos.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent
BPE_PATH = REPO_ROOT / "assets" / "clip_tokenizer" / "bpe_simple_vocab_16e6.txt.gz"
CACHE_ENV = "PRIVADAPT_CACHE"
MARKER_NAME = "privadapt_tiny_sd.json"
BUILD_VERSION = 1  # bump when the architecture or the build procedure changes

CLIP_VOCAB_SIZE = 49408
BOS_ID, EOS_ID = 49406, 49407
MAX_LENGTH = 77
# Known ids of the real CLIP tokenizer: a cheap check that the BPE files were built right.
REFERENCE_PROMPT = "a photo of a cat"
REFERENCE_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]


def bytes_to_unicode() -> dict[int, str]:
    """Map every byte to a printable unicode character, as CLIP's ``SimpleTokenizer`` does.

    Returns:
        A dict from byte value (0-255) to a one-character string, in CLIP's order.
    """
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def clip_vocab_and_merges(bpe_path: Path = BPE_PATH) -> tuple[dict[str, int], list[str]]:
    """Build CLIP's vocabulary and merge list from the BPE file, exactly as CLIP does.

    Args:
        bpe_path: The gzipped ``bpe_simple_vocab_16e6.txt.gz``.

    Returns:
        ``(vocab, merges)``: token -> id (49,408 entries) and the merge lines ("a b").
    """
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    tokens += ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise ValueError(f"{bpe_path}: built {len(vocab)} tokens, expected {CLIP_VOCAB_SIZE}")
    return vocab, merges


def build_clip_tokenizer(out_dir: Path, bpe_path: Path = BPE_PATH) -> CLIPTokenizer:
    """Write ``vocab.json``/``merges.txt`` into ``out_dir`` and load them as a ``CLIPTokenizer``.

    Uses ``from_pretrained``: in transformers 5, ``CLIPTokenizer(vocab_file=...)`` silently
    builds a 3-token vocabulary.

    Args:
        out_dir: Folder to write the tokenizer files into (created if missing).
        bpe_path: The gzipped CLIP BPE vocabulary.

    Returns:
        The loaded and verified ``CLIPTokenizer``.

    Raises:
        RuntimeError: If the tokenizer does not reproduce the real CLIP vocabulary and ids.
    """
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges(bpe_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tokenizer = CLIPTokenizer.from_pretrained(out_dir, model_max_length=MAX_LENGTH)
    ids = tokenizer(REFERENCE_PROMPT).input_ids
    if len(tokenizer) != CLIP_VOCAB_SIZE or ids != REFERENCE_IDS:
        raise RuntimeError(
            f"CLIP tokenizer built wrong: {len(tokenizer)} tokens, {REFERENCE_PROMPT!r} -> {ids}"
        )
    return tokenizer


def _build_components(resolution: int, tokenizer: CLIPTokenizer) -> dict[str, Any]:
    """Instantiate the randomly initialised pipeline parts (uses the global torch RNG)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel(
        sample_size=resolution // 8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 32, 32, 64),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        sample_size=resolution,
        norm_num_groups=32,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=CLIP_VOCAB_SIZE,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_LENGTH,
            projection_dim=32,
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
            pad_token_id=EOS_ID,
        )
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        clip_sample=False,
    )
    # DDPM itself has no set_alpha_to_one; SD's config carries it for DDIM/PNDM.from_config.
    scheduler.register_to_config(set_alpha_to_one=False)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}


def _params(seed: int, resolution: int) -> dict:
    return {"version": BUILD_VERSION, "seed": int(seed), "resolution": int(resolution)}


def is_built(out_dir: Path, *, seed: int = 0, resolution: int = 64) -> bool:
    """Whether ``out_dir`` already holds a tiny SD built with these parameters."""
    marker = Path(out_dir) / MARKER_NAME
    if not (Path(out_dir) / "model_index.json").is_file() or not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()) == _params(seed, resolution)
    except (OSError, ValueError):
        return False


def build_tiny_sd(out_dir: Path, *, seed: int = 0, resolution: int = 64) -> Path:
    """Build a tiny random Stable Diffusion pipeline into ``out_dir`` (idempotent).

    The build is deterministic in ``seed`` and leaves the caller's RNG state untouched. It
    writes into a staging folder beside ``out_dir`` and renames it into place, so a reader
    never sees a half-written model. If ``out_dir`` already holds a build with the same
    parameters it is returned as is; an older privadapt build there is replaced.

    Args:
        out_dir: Destination folder (a diffusers pipeline folder afterwards).
        seed: Seed of the random weights.
        resolution: Image side in pixels; must be a multiple of 8 (latents are ``resolution/8``).

    Returns:
        ``out_dir``.

    Raises:
        ValueError: If ``resolution`` is not a positive multiple of 8.
        FileExistsError: If ``out_dir`` is a non-empty folder that privadapt did not build.
    """
    out_dir = Path(out_dir)
    if resolution <= 0 or resolution % 8:
        raise ValueError(f"resolution must be a positive multiple of 8, got {resolution}")
    if is_built(out_dir, seed=seed, resolution=resolution):
        return out_dir
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MARKER_NAME).is_file():
        raise FileExistsError(f"{out_dir} is not empty and is not a privadapt tiny-SD build")

    from diffusers import StableDiffusionPipeline

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        tokenizer = build_clip_tokenizer(staging / "tokenizer")
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # CPU only: leave CUDA RNGs alone
            components = _build_components(resolution, tokenizer)
        pipe = StableDiffusionPipeline(
            **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
        with _quiet_transformers_progress():
            pipe.save_pretrained(staging, safe_serialization=True)
        (staging / MARKER_NAME).write_text(json.dumps(_params(seed, resolution)))
        _move_into_place(staging, out_dir, seed=seed, resolution=resolution)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


@contextmanager
def _quiet_transformers_progress() -> Iterator[None]:
    """Hide transformers' "Writing model shards" bar for a one-shard model."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _move_into_place(staging: Path, out_dir: Path, *, seed: int, resolution: int) -> None:
    """Rename ``staging`` to ``out_dir``; tolerate a concurrent builder that got there first."""
    if out_dir.exists():
        if is_built(out_dir, seed=seed, resolution=resolution):
            return  # another process finished the same build meanwhile
        shutil.rmtree(out_dir)  # empty, or a stale privadapt build (checked by the caller)
    try:
        os.replace(staging, out_dir)
    except OSError:
        if not is_built(out_dir, seed=seed, resolution=resolution):
            raise


def default_cache_root() -> Path:
    """The cache root: ``$PRIVADAPT_CACHE`` if set, else ``<repo>/.cache`` (gitignored)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else REPO_ROOT / ".cache"


def tiny_sd_dir(cache_root: Path | None = None) -> Path:
    """Return the embedded tiny SD folder, building it on first use.

    Args:
        cache_root: Cache root; defaults to :func:`default_cache_root`.

    Returns:
        ``<cache_root>/tiny-sd``, a diffusers pipeline folder (seed 0, 64x64).
    """
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    return build_tiny_sd(root / "tiny-sd")
