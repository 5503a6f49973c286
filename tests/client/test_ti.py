import torch

from client.ti import TISettings, build_prompts, initializer_vector, train_per_image_embeddings
from common.models import load_pipeline

SETTINGS = TISettings(steps=3, learning_rate=1e-2, batch_size=8)


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def train(pipe, pixels, captions=None, seed=0, settings=SETTINGS):
    captions = captions or [None] * pixels.shape[0]
    return train_per_image_embeddings(pipe, pixels, captions, settings, generator=torch.Generator().manual_seed(seed))


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
    pipe = load_pipeline(tiny_sd_path, device="cpu")
    pixels = images(4, seed=1)
    whole = train(pipe, pixels, settings=TISettings(steps=2, learning_rate=1e-2, batch_size=4))
    chunked = train(pipe, pixels, settings=TISettings(steps=2, learning_rate=1e-2, batch_size=4))
    torch.testing.assert_close(whole, chunked)


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
