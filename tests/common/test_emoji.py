"""Reading the emoji-datasource packages (common/emoji.py) on a small package made here."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from common.emoji import caption, list_emoji, load_rgb


@pytest.fixture()
def package(tmp_path):
    """An ``emoji-datasource-twitter``-shaped package: emoji.json and img/twitter/64/*.png."""
    entries = [
        {"name": "CAT FACE", "short_name": "cat", "short_names": ["cat"], "category": "Animals & Nature",
         "sort_order": 2, "image": "1f431.png", "has_img_twitter": True},
        {"name": "WAVING HAND SIGN", "short_name": "wave", "short_names": ["wave"], "category": "People & Body",
         "sort_order": 1, "image": "1f44b.png", "has_img_twitter": True,
         "skin_variations": {"1F3FB": {"image": "1f44b-1f3fb.png", "has_img_twitter": True}}},
        {"name": "HEAVY BLACK HEART", "short_name": "heart", "short_names": ["heart"], "category": "Smileys & Emotion",
         "sort_order": 3, "image": "2764.png", "has_img_twitter": True},
        {"name": None, "short_name": "flag-fr", "short_names": ["flag-fr"], "category": "Flags",
         "sort_order": 4, "image": "1f1eb.png", "has_img_twitter": True},
    ]
    (tmp_path / "emoji.json").write_text(json.dumps(entries))
    img = tmp_path / "img" / "twitter" / "64"
    img.mkdir(parents=True)
    for name in ("1f431.png", "1f44b.png", "1f44b-1f3fb.png", "2764.png", "1f1eb.png"):
        Image.new("RGBA", (64, 64), (200, 10, 10, 255)).save(img / name)
    return tmp_path


def test_lists_in_sort_order_without_flags(package):
    images = list_emoji(package, "twitter")
    assert [im.key for im in images] == ["wave", "wave", "cat", "heart"]  # base + one skin tone, then in order
    assert images[2].names == ("cat face", "cat")
    assert images[3].names == ("heavy black heart", "heart", "red heart")  # the short name's concept is added


def test_skin_tones_and_categories_can_be_left_out(package):
    assert [im.key for im in list_emoji(package, "twitter", skin_tones=False)] == ["wave", "cat", "heart"]
    kept = list_emoji(package, "twitter", skin_tones=False, skip_categories=("Flags", "People & Body"))
    assert [im.key for im in kept] == ["cat", "heart"]


def test_an_unknown_category_is_an_error_naming_it(package):
    with pytest.raises(ValueError, match="People and Body"):
        list_emoji(package, "twitter", skip_categories=("People and Body",))


def test_caption_and_flattening(package):
    assert caption(("cat face", "cat"), 1) == "an emoji of a cat"
    rgb = load_rgb(package / "img" / "twitter" / "64" / "1f431.png", 32)
    assert rgb.shape == (32, 32, 3) and rgb.dtype == np.uint8 and tuple(rgb[0, 0]) == (200, 10, 10)
