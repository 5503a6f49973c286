"""Device and dtype choice, and loading a Stable Diffusion pipeline from a local folder.

Only local diffusers-format folders are loaded (``local_files_only=True``): privadapt never
downloads a model. Any SD 1.x/2.x checkpoint saved with ``save_pretrained`` works, as does the
embedded tiny model of :mod:`common.tiny_sd`. Loaded pipelines are frozen (eval mode,
``requires_grad=False``); adaptation code unfreezes exactly what it trains.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, StableDiffusionPipeline

REQUIRED_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def select_device(preference: str = "auto") -> torch.device:
    """Pick the torch device to run on.

    Args:
        preference: ``"auto"`` (CUDA if available, else MPS if available, else CPU), or an
            explicit ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``.

    Returns:
        The chosen device.

    Raises:
        ValueError: If the preference is unknown or names an accelerator that is not available.
    """
    pref = str(preference).strip().lower()
    if pref == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if pref == "cpu":
        return torch.device("cpu")
    if pref == "cuda" or pref.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {preference!r} requested but CUDA is not available")
        return torch.device(pref)
    if pref == "mps":
        if not _mps_available():
            raise ValueError("device 'mps' requested but MPS is not available")
        return torch.device("mps")
    raise ValueError(f"unknown device {preference!r}: use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def select_dtype(device: torch.device | str, preference: str | torch.dtype = "auto") -> torch.dtype:
    """Pick the parameter dtype for ``device``.

    Args:
        device: The device the model will run on.
        preference: ``"auto"`` (float16 on CUDA, float32 elsewhere), a name such as
            ``"float32"``, ``"float16"``, ``"bfloat16"`` (or ``fp32``/``fp16``/``bf16``), or a
            ``torch.dtype``.

    Returns:
        The chosen dtype.

    Raises:
        ValueError: If the preference is not a supported dtype.
    """
    if isinstance(preference, torch.dtype):
        if preference not in _DTYPES.values():
            raise ValueError(f"unsupported dtype {preference}: use float32, float16 or bfloat16")
        return preference
    pref = str(preference).strip().lower().removeprefix("torch.")
    if pref == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    if pref not in _DTYPES:
        raise ValueError(f"unknown dtype {preference!r}: use 'auto', 'float32', 'float16' or 'bfloat16'")
    return _DTYPES[pref]


def check_pipeline_dir(model_path: str | Path) -> Path:
    """Check that ``model_path`` is a local diffusers Stable Diffusion folder.

    Args:
        model_path: The folder to check.

    Returns:
        The path as a ``Path``.

    Raises:
        FileNotFoundError: If the folder does not exist.
        ValueError: If it is not a diffusers SD folder (no ``model_index.json`` or a missing
            component subfolder).
    """
    path = Path(model_path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"model folder not found: {path} (privadapt loads local folders only)")
    index = path / "model_index.json"
    if not index.is_file():
        raise ValueError(f"{path} is not a diffusers pipeline folder: no model_index.json")
    try:
        json.loads(index.read_text())
    except ValueError as err:
        raise ValueError(f"{index} is not valid JSON: {err}") from err
    missing = [name for name in REQUIRED_SUBFOLDERS if not (path / name).is_dir()]
    if missing:
        raise ValueError(f"{path} is not a Stable Diffusion folder: missing {', '.join(missing)}")
    return path


def load_pipeline(
    model_path: str | Path,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
) -> StableDiffusionPipeline:
    """Load a frozen Stable Diffusion pipeline from a local diffusers folder.

    The safety checker is not loaded. Every module is in eval mode with
    ``requires_grad=False`` and the progress bar is off.

    Args:
        model_path: A local diffusers-format SD 1.x/2.x folder (e.g. from ``save_pretrained``).
        device: A device or preference string for :func:`select_device`; ``None`` means "auto".
        dtype: A dtype or preference string for :func:`select_dtype`; ``None`` means "auto".

    Returns:
        The loaded pipeline on ``device`` in ``dtype``.

    Raises:
        FileNotFoundError: If ``model_path`` does not exist.
        ValueError: If ``model_path`` is not a diffusers SD folder.
    """
    from diffusers import StableDiffusionPipeline

    path = check_pipeline_dir(model_path)
    dev = device if isinstance(device, torch.device) else select_device(device or "auto")
    torch_dtype = select_dtype(dev, dtype if dtype is not None else "auto")
    pipe = StableDiffusionPipeline.from_pretrained(
        path,
        local_files_only=True,
        safety_checker=None,
        requires_safety_checker=False,
        dtype=torch_dtype,
    )
    pipe = pipe.to(dev)
    pipe.set_progress_bar_config(disable=True)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval().requires_grad_(False)
    return pipe


def latent_scaling_factor(vae: AutoencoderKL) -> float:
    """Return the factor that scales VAE latents to roughly unit variance (SD: 0.18215).

    Args:
        vae: The pipeline's ``AutoencoderKL``.

    Returns:
        ``vae.config.scaling_factor``.
    """
    return float(vae.config.scaling_factor)
