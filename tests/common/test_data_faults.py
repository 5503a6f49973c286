"""More bad site inputs for common/data.py: duplicates, animated files, odd modes, hostile
captions (duplicate keys, names escaping the folder), and property tests of the captions parser."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from common.data import SiteDataError, load_site_images

SITE = "site-faults"
_hypothesis = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def load(folder: Path):
    return load_site_images(folder, site=SITE, resolution=8)


def refused(folder: Path, culprit: str, *words: str) -> str:
    with pytest.raises(SiteDataError) as info:
        load(folder)
    msg = str(info.value)
    assert SITE in msg and culprit in msg and all(w in msg for w in words), msg
    return msg


def colour(i: int) -> Image.Image:
    return Image.new("RGB", (6, 6), (i, 100, 200))


def test_a_copied_image_is_a_duplicate(tmp_path: Path) -> None:
    colour(1).save(tmp_path / "a.png")
    colour(2).save(tmp_path / "b.png")
    shutil.copy(tmp_path / "a.png", tmp_path / "c.png")
    refused(tmp_path, "c.png", "same pixels as a.png")


def test_the_same_picture_in_two_lossless_formats_is_a_duplicate(tmp_path: Path) -> None:
    colour(1).save(tmp_path / "a.png")
    colour(1).save(tmp_path / "b.bmp")
    refused(tmp_path, "b.bmp", "same pixels as a.png")


def test_a_grayscale_and_an_rgb_copy_of_the_same_gray_are_duplicates(tmp_path: Path) -> None:
    Image.new("L", (5, 5), 77).save(tmp_path / "a.png")
    Image.new("RGB", (5, 5), (77, 77, 77)).save(tmp_path / "b.png")
    refused(tmp_path, "b.png", "same pixels")


def test_an_animated_gif_gives_its_first_frame(tmp_path: Path) -> None:
    # .gif is not an accepted extension; a GIF behind a .png name is read by its content
    frames = [Image.new("RGB", (8, 8), c).convert("P") for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.png", format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    px = load(tmp_path).pixels[0]
    assert px[0].min() > 0.9 and px[2].max() < -0.9  # red, not blue


def test_an_animated_png_gives_its_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in ((0, 255, 0), (255, 0, 0))]
    frames[0].save(tmp_path / "anim.png", save_all=True, append_images=frames[1:])
    px = load(tmp_path).pixels[0]
    assert px[1].min() > 0.9 and px[0].max() < -0.9


def test_float_mode_is_refused_by_name(tmp_path: Path) -> None:
    Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32), mode="F").save(tmp_path / "f.tiff")
    (tmp_path / "f.tiff").rename(tmp_path / "f.png")  # a TIFF behind a .png name: read by content
    refused(tmp_path, "f.png", "unsupported image mode 'F'")


def test_a_fully_transparent_la_image_is_white(tmp_path: Path) -> None:
    Image.new("LA", (4, 4), (10, 0)).save(tmp_path / "clear.png")  # fully transparent: white
    assert load(tmp_path).pixels.min() == 1.0


@pytest.mark.parametrize("text,words", [
    ('{"a.png": "x", "a.png": "y"}', ("'a.png' more than once",)),
    ('{"../outside.png": "x"}', ("'../outside.png'", "not an image file")),
    ('{"/etc/passwd": "x"}', ("'/etc/passwd'", "not an image file")),
    ('{"a.png": "x"', ("not readable UTF-8 JSON",)),
    ("[" * 100_000 + "]" * 100_000, ("not readable UTF-8 JSON",)),
    ('{"a.png": {"nested": 1}}', ("must be a string",)),
])
def test_malformed_captions_json_is_refused(tmp_path: Path, text: str, words: tuple[str, ...]) -> None:
    colour(1).save(tmp_path / "a.png")
    (tmp_path / "captions.json").write_text(text)
    refused(tmp_path, "captions.json", *words)


def _loaded_or_refused(folder: Path, culprit: str) -> None:
    try:
        data = load(folder)
    except SiteDataError as exc:
        assert SITE in str(exc) and culprit in str(exc), str(exc)
    else:
        assert len(data.captions) == 1 and (data.captions[0] is None or isinstance(data.captions[0], str))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


@_hypothesis
@given(value=json_values | st.dictionaries(st.sampled_from(["a.png", "b.png", "../a.png", ""]), json_values, max_size=3))
def test_any_json_in_captions_loads_or_is_refused_by_name(tmp_path: Path, value) -> None:
    colour(1).save(tmp_path / "a.png")
    (tmp_path / "captions.json").write_text(json.dumps(value))
    _loaded_or_refused(tmp_path, "captions.json")


@pytest.mark.parametrize("name", ["captions.json", "a.txt"])
@_hypothesis
@given(blob=st.binary(max_size=512))
def test_any_bytes_in_a_captions_file_load_or_are_refused_by_name(tmp_path: Path, name: str, blob: bytes) -> None:
    colour(1).save(tmp_path / "a.png")
    (tmp_path / name).write_bytes(blob)
    _loaded_or_refused(tmp_path, name)
