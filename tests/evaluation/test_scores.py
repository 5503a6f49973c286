"""Per-image denoising errors on the pretrained emoji base."""

from __future__ import annotations

import pytest
import torch

from common.data import load_site_images
from evaluation.scores import denoising_errors, encode
from tests.evaluation.conftest import DEMO


@pytest.fixture(scope="module")
def encoded(emoji_pipe):
    images = load_site_images(DEMO / "site-0", site="site-0", resolution=32, max_images=6)
    return encode(emoji_pipe, images.pixels, [c or "an emoji" for c in images.captions])


def test_errors_have_one_value_per_image_timestep_and_draw_and_repeat_under_the_seed(emoji_pipe, encoded):
    a = denoising_errors(emoji_pipe.unet, emoji_pipe.scheduler, encoded, [10, 500], draws=2, seed=3)
    b = denoising_errors(emoji_pipe.unet, emoji_pipe.scheduler, encoded, [10, 500], draws=2, seed=3)
    c = denoising_errors(emoji_pipe.unet, emoji_pipe.scheduler, encoded, [10, 500], draws=2, seed=4)
    assert a.shape == (6, 2, 2) and a.dtype == torch.float64 and (a > 0).all()
    assert torch.equal(a, b) and not torch.equal(a, c)
    # batching does not change the figures
    d = denoising_errors(emoji_pipe.unet, emoji_pipe.scheduler, encoded, [10, 500], draws=2, seed=3, batch_size=4)
    torch.testing.assert_close(a, d, rtol=1e-5, atol=1e-6)


def test_bad_timesteps_and_shapes_are_named(emoji_pipe, encoded):
    with pytest.raises(ValueError, match="timesteps"):
        denoising_errors(emoji_pipe.unet, emoji_pipe.scheduler, encoded, [1000])
    with pytest.raises(ValueError, match="prompts"):
        encode(emoji_pipe, torch.zeros(2, 3, 32, 32), ["one"])
