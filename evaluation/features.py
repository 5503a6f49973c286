"""A small emoji style classifier, its features, KID and style accuracy.

The network (:class:`StyleNet`) is a four-stage CNN trained by privadapt
(``scripts/train_style_classifier.py``) to tell Twemoji (label 0) from Noto emoji (label 1) at
32x32 pixels; the committed weights are in ``assets/style-classifier``. It serves two
evaluation metrics with no download:

* **style accuracy**: the share of generated images that the classifier assigns to the
  target style (how far adaptation moved the style);
* **KID**, the kernel inception distance of Bińkowski et al., "Demystifying MMD GANs" (ICLR
  2018): the unbiased estimate of the squared maximum mean discrepancy between two feature
  sets under the cubic polynomial kernel k(x, y) = (x·y / d + 1)^3, averaged over random
  subsets. Here the features are the classifier's penultimate layer instead of Inception's
  pool3 layer (which cannot be downloaded), so values are comparable within privadapt only.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from common.paths import REPO_ROOT

DEFAULT_DIR = REPO_ROOT / "assets" / "style-classifier"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STYLES = ("twemoji", "noto")


class StyleNet(nn.Module):
    """Conv(3x3)-GroupNorm-SiLU blocks with 2x2 pooling, global average pooling, a
    ``feature_dim`` embedding layer and a linear head over the styles."""

    def __init__(self, width: int = 32, feature_dim: int = 128, num_classes: int = len(STYLES)) -> None:
        super().__init__()
        chans = (3, width, 2 * width, 4 * width, 4 * width)
        layers: list[nn.Module] = []
        for i in range(4):
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3, padding=1), nn.GroupNorm(8, chans[i + 1]), nn.SiLU()]
            if i < 3:
                layers.append(nn.AvgPool2d(2))
        self.body = nn.Sequential(*layers)
        self.embed = nn.Sequential(nn.Linear(chans[-1], feature_dim), nn.SiLU())
        self.head = nn.Linear(feature_dim, num_classes)
        self.config = {"width": width, "feature_dim": feature_dim, "num_classes": num_classes}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features ``[N, feature_dim]`` of images in [-1, 1], ``[N, 3, H, W]``."""
        return self.embed(self.body(x).mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def save_style_net(net: StyleNet, out_dir: Path, **extra) -> Path:
    """Write ``model.safetensors`` and ``config.json`` (architecture + ``extra``)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, out_dir / WEIGHTS_FILE)
    (out_dir / CONFIG_FILE).write_text(json.dumps({**net.config, "styles": list(STYLES), **extra}, indent=1) + "\n")
    return out_dir


def load_style_net(model_dir: Path | str = DEFAULT_DIR) -> StyleNet:
    """Load the committed (or any saved) classifier, in eval mode, on the CPU."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / CONFIG_FILE).read_text())
    net = StyleNet(cfg["width"], cfg["feature_dim"], cfg["num_classes"])
    net.load_state_dict(load_file(model_dir / WEIGHTS_FILE))
    return net.eval().requires_grad_(False)


def to_batch(images: Sequence[Image.Image] | np.ndarray | torch.Tensor, resolution: int = 32) -> torch.Tensor:
    """PIL images, a uint8 ``[N, H, W, 3]`` array or a float ``[N, 3, H, W]`` tensor in [-1, 1]
    -> float ``[N, 3, resolution, resolution]`` in [-1, 1] (RGBA is flattened onto white)."""
    if isinstance(images, torch.Tensor):
        x = images.float()
    else:
        if not isinstance(images, np.ndarray):
            arrays = []
            for im in images:
                if im.mode in ("RGBA", "LA", "P"):
                    rgba = im.convert("RGBA")
                    im = Image.new("RGB", rgba.size, (255, 255, 255))
                    im.paste(rgba, mask=rgba.getchannel("A"))
                im = im.convert("RGB")
                if im.size != (resolution, resolution):
                    im = im.resize((resolution, resolution), Image.BOX)
                arrays.append(np.asarray(im))
            images = np.stack(arrays)
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if x.shape[-1] != resolution:
        x = nn.functional.interpolate(x, size=(resolution, resolution), mode="area")
    return x


@torch.no_grad()
def embed(net: StyleNet, images, *, batch_size: int = 256) -> torch.Tensor:
    """Features ``[N, feature_dim]`` (float64) of ``images`` (see :func:`to_batch`)."""
    x = to_batch(images)
    return torch.cat([net.features(c) for c in x.split(batch_size)]).double()


@torch.no_grad()
def style_probabilities(net: StyleNet, images, *, batch_size: int = 256) -> torch.Tensor:
    """Softmax over :data:`STYLES`, ``[N, len(STYLES)]``."""
    x = to_batch(images)
    return torch.cat([net(c).softmax(-1) for c in x.split(batch_size)])


def style_accuracy(net: StyleNet, images, style: str | int) -> float:
    """Share of ``images`` that the classifier assigns to ``style`` (a name or a label)."""
    label = STYLES.index(style) if isinstance(style, str) else int(style)
    return float((style_probabilities(net, images).argmax(-1) == label).double().mean())


def _poly_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD² between two samples under the cubic polynomial kernel (KID's kernel).

    Diagonal terms of the within-sample kernel matrices are left out (Gretton et al. 2012,
    Lemma 6), so the estimate is unbiased and can be slightly negative.
    """
    m, n = len(x), len(y)
    kxx, kyy, kxy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return float(sxx + syy - 2 * kxy.mean())


def kid(
    feats_a: torch.Tensor | np.ndarray,
    feats_b: torch.Tensor | np.ndarray,
    *,
    num_subsets: int = 50,
    subset_size: int = 100,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel inception distance (Bińkowski et al. 2018) between two feature sets.

    The unbiased MMD² is averaged over ``num_subsets`` random subsets of ``min(subset_size,
    len(a), len(b))`` features drawn without replacement from each set, as in the reference
    implementation; the spread over subsets is returned too.

    Args:
        feats_a: ``[M, d]`` features.
        feats_b: ``[N, d]`` features.
        num_subsets: Number of subset pairs.
        subset_size: Subset size (capped by the smaller set).
        seed: Seed of the subset draws.

    Returns:
        ``(mean, std)`` of the subset estimates.

    Raises:
        ValueError: If a set has fewer than 2 features or the dimensions differ.
    """
    a = torch.as_tensor(np.asarray(feats_a), dtype=torch.float64)
    b = torch.as_tensor(np.asarray(feats_b), dtype=torch.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need two [N, d] feature sets of the same d, got {tuple(a.shape)} and {tuple(b.shape)}")
    size = min(subset_size, len(a), len(b))
    if size < 2:
        raise ValueError("KID needs at least 2 features in each set")
    gen = torch.Generator().manual_seed(seed)
    values = [
        mmd2_unbiased(a[torch.randperm(len(a), generator=gen)[:size]], b[torch.randperm(len(b), generator=gen)[:size]])
        for _ in range(num_subsets)
    ]
    return float(np.mean(values)), float(np.std(values))
