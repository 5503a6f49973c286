"""KID, MMD and the committed style classifier (evaluation/features.py)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from evaluation.features import (
    DEFAULT_DIR,
    StyleNet,
    embed,
    kid,
    load_style_net,
    mmd2_unbiased,
    save_style_net,
    style_accuracy,
    style_probabilities,
    to_batch,
)

REPO = Path(__file__).resolve().parents[2]
TWEMOJI_HELDOUT = REPO / "tests" / "data" / "twemoji-heldout"
NOTO_DEMO = REPO / "data" / "demo"


def load_folder(pattern_root: Path, pattern: str) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in sorted(pattern_root.glob(pattern))]


def test_mmd2_unbiased_matches_a_loop():
    """The vectorised estimate equals the textbook double sums (diagonals left out)."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 3, generator=gen, dtype=torch.float64), torch.randn(4, 3, generator=gen, dtype=torch.float64)
    k = lambda a, b: (float(a @ b) / 3 + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(5), 2)) / 20
    yy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(4), 2)) / 12
    xy = sum(k(x[i], y[j]) for i in range(5) for j in range(4)) / 20
    assert mmd2_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)


def test_kid_same_distribution_is_near_zero_and_a_shift_is_not():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    same, spread = kid(a, b)
    shifted, _ = kid(a, b + 0.5)
    assert abs(same) < 3 * spread + 1e-3
    assert shifted > 20 * max(abs(same), spread)
    assert kid(a, a + 1.0)[0] > shifted  # a larger shift, a larger distance


def test_kid_rejects_bad_shapes():
    with pytest.raises(ValueError):
        kid(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError):
        kid(np.zeros((1, 3)), np.zeros((5, 3)))


def test_save_and_load_roundtrip(tmp_path):
    torch.manual_seed(0)
    net = StyleNet(width=8, feature_dim=16).eval()
    save_style_net(net, tmp_path, note="test")
    back = load_style_net(tmp_path)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    assert torch.equal(net(x), back(x))
    assert embed(back, x).shape == (3, 16)


def test_to_batch_flattens_rgba_onto_white():
    clear = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    x = to_batch([clear])
    assert x.shape == (1, 3, 32, 32) and torch.allclose(x, torch.ones_like(x))


@pytest.fixture(scope="module")
def classifier() -> StyleNet:
    if not (DEFAULT_DIR / "model.safetensors").is_file():
        pytest.skip("the style classifier is not committed")
    return load_style_net()


def test_committed_classifier_separates_held_out_styles(classifier):
    """Neither set's concepts were in the classifier's training data."""
    twemoji = load_folder(TWEMOJI_HELDOUT, "*.png")
    noto = load_folder(NOTO_DEMO, "site-*/*.png")
    assert len(twemoji) == 48 and len(noto) == 48
    assert style_accuracy(classifier, twemoji, "twemoji") >= 0.8
    assert style_accuracy(classifier, noto, "noto") >= 0.8
    probs = style_probabilities(classifier, noto)
    assert torch.allclose(probs.sum(-1), torch.ones(48))


def test_committed_features_tell_the_styles_apart(classifier):
    """KID between the two styles is well above KID between two halves of one style."""
    twemoji = embed(classifier, load_folder(TWEMOJI_HELDOUT, "*.png"))
    noto = embed(classifier, load_folder(NOTO_DEMO, "site-*/*.png"))
    across, _ = kid(twemoji, noto, subset_size=24)
    within, _ = kid(noto[::2], noto[1::2])
    assert across > 0 and across > 5 * abs(within)
