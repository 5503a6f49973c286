"""More bad site inputs for common/data.py: copies, animated files, odd modes, hostile
captions (duplicate keys, names escaping the folder), and property tests of the captions parser.
A bad record is left out as absent (named in ``skipped``); only a ``captions.json`` that cannot
be read as a JSON object makes the whole folder an error."""

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
    """The folder as a whole is refused, naming the site and ``culprit``."""
    with pytest.raises(SiteDataError) as info:
        load(folder)
    msg = str(info.value)
    assert SITE in msg and culprit in msg and all(w in msg for w in words), msg
    return msg


def left_out(folder: Path, culprit: str, *words: str, kept: tuple[str, ...]) -> str:
    """``culprit`` is left out (and said why), exactly the images ``kept`` are loaded."""
    data = load(folder)
    assert data.names == kept, data
    (problem,) = [p for p in data.skipped if p.name == culprit]
    assert all(w in problem.problem for w in words), problem
    return problem.problem


def colour(i: int) -> Image.Image:
    return Image.new("RGB", (6, 6), (i, 100, 200))


def test_a_copied_image_is_a_duplicate(tmp_path: Path) -> None:
    colour(1).save(tmp_path / "a.png")
    colour(2).save(tmp_path / "b.png")
    shutil.copy(tmp_path / "a.png", tmp_path / "c.png")
    left_out(tmp_path, "c.png", "same pixels as a.png", kept=("a.png", "b.png"))


def test_the_first_copy_in_name_order_is_kept_with_its_caption(tmp_path: Path) -> None:
    colour(1).save(tmp_path / "b.png")
    shutil.copy(tmp_path / "b.png", tmp_path / "a.png")
    shutil.copy(tmp_path / "b.png", tmp_path / "c.png")
    (tmp_path / "captions.json").write_text(json.dumps({"a.png": "first", "b.png": "second", "c.png": "third"}))
    data = load(tmp_path)
    assert data.names == ("a.png",) and data.captions == ("first",)
    assert [(p.name, "same pixels as a.png" in p.problem) for p in data.skipped] == [("b.png", True), ("c.png", True)]


def test_a_copy_of_a_left_out_image_is_kept(tmp_path: Path) -> None:
    """The earlier file is unusable (bad caption), so the later one is no copy of a kept image."""
    colour(1).save(tmp_path / "a.png")
    shutil.copy(tmp_path / "a.png", tmp_path / "b.png")
    (tmp_path / "a.txt").write_bytes(b"\xff")
    left_out(tmp_path, "a.png", "UTF-8", kept=("b.png",))


def test_the_same_picture_in_two_lossless_formats_is_a_duplicate(tmp_path: Path) -> None:
    colour(1).save(tmp_path / "a.png")
    colour(1).save(tmp_path / "b.bmp")
    left_out(tmp_path, "b.bmp", "same pixels as a.png", kept=("a.png",))


def test_a_grayscale_and_an_rgb_copy_of_the_same_gray_are_duplicates(tmp_path: Path) -> None:
    Image.new("L", (5, 5), 77).save(tmp_path / "a.png")
    Image.new("RGB", (5, 5), (77, 77, 77)).save(tmp_path / "b.png")
    left_out(tmp_path, "b.png", "same pixels", kept=("a.png",))


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


def test_float_mode_is_left_out_by_name(tmp_path: Path) -> None:
    Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32), mode="F").save(tmp_path / "f.tiff")
    (tmp_path / "f.tiff").rename(tmp_path / "f.png")  # a TIFF behind a .png name: read by content
    colour(3).save(tmp_path / "g.png")
    left_out(tmp_path, "f.png", "unsupported image mode 'F'", kept=("g.png",))


def test_a_fully_transparent_la_image_is_white(tmp_path: Path) -> None:
    Image.new("LA", (4, 4), (10, 0)).save(tmp_path / "clear.png")  # fully transparent: white
    assert load(tmp_path).pixels.min() == 1.0


@pytest.mark.parametrize("text,words", [
    ('{"a.png": "x"', ("not readable UTF-8 JSON",)),
    ("[" * 100_000 + "]" * 100_000, ("not readable UTF-8 JSON",)),
    ('"just a string"', ("JSON object",)),
])
def test_unreadable_captions_json_is_refused(tmp_path: Path, text: str, words: tuple[str, ...]) -> None:
    colour(1).save(tmp_path / "a.png")
    (tmp_path / "captions.json").write_text(text)
    refused(tmp_path, "captions.json", *words)


@pytest.mark.parametrize("text,words", [
    ('{"a.png": "x", "a.png": "y"}', ("'a.png' more than once",)),
    ('{"a.png": {"nested": 1}}', ("must be a string",)),
])
def test_a_bad_caption_entry_leaves_its_image_out(tmp_path: Path, text: str, words: tuple[str, ...]) -> None:
    colour(1).save(tmp_path / "a.png")
    colour(2).save(tmp_path / "b.png")
    (tmp_path / "captions.json").write_text(text)
    left_out(tmp_path, "a.png", *words, kept=("b.png",))


def test_a_key_repeated_inside_a_caption_value_is_not_a_repeated_entry(tmp_path: Path) -> None:
    colour(1).save(tmp_path / "a.png")
    colour(2).save(tmp_path / "b.png")
    (tmp_path / "captions.json").write_text('{"b.png": {"a.png": 1, "a.png": 2}, "a.png": "kept"}')
    assert left_out(tmp_path, "b.png", "must be a string", kept=("a.png",))
    assert load(tmp_path).captions == ("kept",)


@pytest.mark.parametrize("name", ["../outside.png", "/etc/passwd"])
def test_a_caption_entry_outside_the_folder_is_ignored(tmp_path: Path, name: str) -> None:
    colour(1).save(tmp_path / "a.png")
    (tmp_path / "captions.json").write_text(json.dumps({name: "x"}))
    left_out(tmp_path, "captions.json", f"{name!r}", "not an image file", kept=("a.png",))


def _loaded_or_refused(folder: Path, culprit: str) -> None:
    """The folder loads (a.png kept with a caption, or left out by name) or, for an
    unreadable ``captions.json`` only, is refused by name."""
    try:
        data = load(folder)
    except SiteDataError as exc:
        assert culprit == "captions.json" and SITE in str(exc) and culprit in str(exc), str(exc)
    else:
        if data.names:
            assert data.names == ("a.png",) and (data.captions[0] is None or isinstance(data.captions[0], str))
        else:
            assert "a.png" in {p.name for p in data.skipped}


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
