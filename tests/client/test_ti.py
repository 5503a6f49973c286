import pytest
import torch

from client.ti import build_prompts, plan_rows, train_per_image_embeddings
from common.models import load_pipeline
from common.textual_inversion import TISettings, initializer_vector

SETTINGS = TISettings(steps=3, learning_rate=1e-2, batch_size=8)


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def train(pipe, pixels, captions=None, seed=0, settings=SETTINGS, pad_to=0):
    captions = captions or [None] * pixels.shape[0]
    return train_per_image_embeddings(pipe, pixels, captions, settings, generator=torch.Generator().manual_seed(seed),
                                      pad_to=pad_to)


def test_prompts_use_caption_or_public_default():
    assert build_prompts(["a cat", None], SETTINGS) == ["a cat in the style of <S*>", "an image in the style of <S*>"]


def test_each_row_depends_only_on_its_own_image(tiny_sd_path):
    pipe = load_pipeline(tiny_sd_path, device="cpu")
    pixels = images(3)
    first = train(pipe, pixels)
    changed = pixels.clone()
    changed[2] = -changed[2]
    second = train(pipe, changed)
    init = initializer_vector(pipe, SETTINGS)
    assert first.shape == (3, init.numel())
    # rows moved away from the initializer
    assert (torch.linalg.vector_norm(first - init, dim=1) > 0).all()
    # rows 0 and 1 are untouched by image 2; row 2 follows its image
    torch.testing.assert_close(first[:2], second[:2], rtol=1e-5, atol=1e-7)
    assert not torch.allclose(first[2], second[2])


def test_chunking_does_not_change_the_result(tiny_sd_path):
    """The batch size only regroups the rows: every row gets the same draws and, up to float
    rounding of the differently shaped passes, the same embedding (5 rows in 1, 3 or 5 passes)."""
    pipe = load_pipeline(tiny_sd_path, device="cpu")
    pixels = images(5, seed=1)
    whole, chunked, single = (train(pipe, pixels, settings=TISettings(steps=2, learning_rate=1e-2, batch_size=b))
                              for b in (5, 2, 1))
    torch.testing.assert_close(chunked, whole)
    torch.testing.assert_close(single, whole)
    # the rows differ from one another far more than the tolerance: mixed-up rows would show
    assert torch.cdist(whole, whole).add(torch.eye(5)).min() > 1e-3


@pytest.mark.parametrize("capacity", [1, 3, 7, 8, 20])
def test_a_padded_plan_has_the_same_passes_and_rows_whatever_the_count(capacity):
    plans = [plan_rows(real, 4, pad_to=capacity) for real in range(capacity + 1)]
    assert len({p.rows for p in plans}) == 1 and len({len(p.sizes) for p in plans}) == 1
    for real, p in enumerate(plans):
        assert sum(p.sizes) == p.rows == capacity + 1 and max(p.sizes) <= 4 and min(p.sizes) >= 1
        # the real rows keep the passes of the unpadded run, and share none with a dummy row
        assert p.sizes[:len(plan_rows(real, 4).sizes)] == plan_rows(real, 4).sizes


def test_more_images_than_the_capacity_are_all_trained():
    p = plan_rows(9, 4, pad_to=6)
    assert p.real == 9 and p.rows == 10 and p.sizes == (4, 4, 1, 1)


def unet_passes(pipe, run) -> list[int]:
    """The batch size of every UNet forward pass that ``run()`` makes."""
    seen: list[int] = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    try:
        run()
    finally:
        hook.remove()
    return seen


def test_padding_leaves_the_real_rows_bit_identical_and_fixes_the_work(tiny_sd_path):
    pipe = load_pipeline(tiny_sd_path, device="cpu")
    settings = TISettings(steps=2, learning_rate=1e-2, batch_size=2)
    pixels = images(3, seed=2)
    alone = train(pipe, pixels, settings=settings)
    padded = train(pipe, pixels, settings=settings, pad_to=6)
    assert padded.shape == alone.shape and torch.equal(padded, alone)
    # the same UNet work for 0, 3 or 6 real images: 7 rows in 4 passes per step
    work = [unet_passes(pipe, lambda n=n: train(pipe, images(n, seed=3), settings=settings, pad_to=6))
            for n in (0, 3, 6)]
    assert all(len(w) == 4 * settings.steps and sum(w) == 7 * settings.steps for w in work)


def test_text_encoder_is_restored_and_frozen(tiny_sd_path):
    pipe = load_pipeline(tiny_sd_path, device="cpu")
    table = pipe.text_encoder.get_input_embeddings()
    before = table.weight.clone()
    train(pipe, images(2))
    assert pipe.text_encoder.get_input_embeddings() is table
    assert torch.equal(table.weight, before)
    assert not any(p.requires_grad for p in pipe.unet.parameters())


def test_empty_sample_gives_no_rows(tiny_sd_path):
    pipe = load_pipeline(tiny_sd_path, device="cpu")
    out = train(pipe, images(0))
    assert out.shape[0] == 0
