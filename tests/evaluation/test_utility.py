"""Utility figures on cases whose answer is known, on the pretrained emoji base (a random tiny
model cannot tell images apart, see ENV.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config import RunConfig
from common.data import load_site_images
from common.paths import REPO_ROOT
from evaluation.utility import Run, denoising_comparison, distribution_metrics, paired_summary, pil_images, prompts_for

EMOJI_SD = REPO_ROOT / "assets" / "emoji-sd"
NOTO = REPO_ROOT / "data" / "demo"
TWEMOJI = REPO_ROOT / "tests" / "data" / "twemoji-heldout"


def lora_run() -> Run:
    return Run(path=Path("unused"), config=RunConfig(adapter="lora", num_sites=4, model_path=str(EMOJI_SD), resolution=32),
               privacy={}, adapter="lora")


def test_an_adapter_trained_on_images_lowers_their_denoising_loss(emoji_pipe, small_members, small_overfit_pipe):
    trained = small_members  # the first 8 images of Noto site-0
    other = load_site_images(TWEMOJI, site="twemoji", resolution=32, max_images=8)
    base, adapted = emoji_pipe, small_overfit_pipe
    on_trained = denoising_comparison(lora_run(), base, adapted, trained, draws=2)
    on_other = denoising_comparison(lora_run(), base, adapted, other, draws=2)
    # the trained images' loss falls, significantly, and more than that of unrelated images
    assert on_trained["difference_ci"][1] < 0
    assert on_trained["relative_change"] < on_other["relative_change"]
    # the comparison is paired: the same pipeline twice gives exactly no difference
    same = denoising_comparison(lora_run(), base, base, trained, draws=1)
    assert same["difference"] == 0.0


def test_kid_of_a_set_with_itself_is_near_zero_and_with_another_style_positive():
    twemoji = pil_images(load_site_images(TWEMOJI, site="twemoji", resolution=32))
    noto = pil_images(load_site_images(NOTO / "site-1", site="noto", resolution=32)) + \
        pil_images(load_site_images(NOTO / "site-2", site="noto", resolution=32))
    out = distribution_metrics({"same": twemoji[:24], "other": noto}, twemoji[24:])
    assert out["reference_style"] == "twemoji"
    assert out["other"]["kid"] > 10 * abs(out["same"]["kid"]) and out["other"]["kid"] > 0
    assert out["same"]["style_accuracy"] > 0.8 > 0.2 > out["other"]["style_accuracy"]
    # the very same images: the unbiased estimate is -O(1/n) (cross terms include k(x, x)), near 0
    identical = distribution_metrics({"self": twemoji}, twemoji)
    assert abs(identical["self"]["kid"]) < 0.05 * out["other"]["kid"]


def test_paired_summary_interval_and_errors():
    import numpy as np

    s = paired_summary(np.array([1.0, 2.0, 3.0]), np.array([0.5, 1.5, 2.5]))
    assert s["difference"] == pytest.approx(-0.5) and s["difference_ci"] == pytest.approx([-0.5, -0.5])
    assert s["relative_change"] == pytest.approx(-0.25)


def test_ti_prompts_carry_the_token_only_when_adapted():
    run = Run(path=Path("x"), config=RunConfig(), privacy={}, adapter="textual-inversion")
    assert prompts_for(run, ["a cat", None], adapted=False) == ["a cat", "an image"]
    assert prompts_for(run, ["a cat"], adapted=True) == ["a cat in the style of <S*>"]


def test_batched_generation_draws_each_image_as_if_alone(emoji_pipe):
    import numpy as np

    from evaluation.utility import generate

    prompts = ["an emoji of a cat", "an emoji of a dog", "an emoji of a sun"]
    batched = generate(emoji_pipe, prompts, seed=5, steps=3, guidance=5.0, batch_size=2)
    alone = [generate(emoji_pipe, [p], seed=5 + i, steps=3, guidance=5.0)[0] for i, p in enumerate(prompts)]
    for a, b in zip(batched, alone):
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1  # 8-bit rounding of batched floats
    assert np.asarray(batched[0]).tobytes() != np.asarray(batched[1]).tobytes()
