"""Read the open emoji sets that ship in the ``emoji-datasource-*`` npm packages.

The packages (``npm pack emoji-datasource-twitter@16.0.0`` / ``emoji-datasource-google@16.0.0``)
hold one 64x64 RGBA PNG per emoji under ``img/<vendor>/64/`` and the metadata in
``emoji.json`` (name, short names, category, skin-tone variations). Twemoji's images are
CC-BY 4.0 (Twitter, Inc. and contributors), Noto Color Emoji's are Apache 2.0 (Google); the
package metadata is MIT (Cal Henderson, iamcal/emoji-data).

These helpers are used by the scripts that build the embedded base model, the demo data and the
style classifier; nothing at run time reads the packages.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

# Categories left out: flags (270 near-identical rectangles) and the bare skin-tone swatches.
SKIPPED_CATEGORIES = ("Flags", "Component")
# Old Unicode names that say little ("HEAVY BLACK HEART"); the short names carry the concept.
EXTRA_NAMES = {"sunny": "sun", "heart": "red heart", "car": "car", "cloud": "cloud", "star": "star"}


@dataclass(frozen=True)
class EmojiImage:
    """One emoji picture: its file, its concept key and the phrases that name it."""

    path: Path
    key: str  # the base emoji's short name, shared by its skin-tone variants
    names: tuple[str, ...]  # e.g. ("cat face", "cat")
    category: str
    sort_order: int


def _names(entry: dict) -> tuple[str, ...]:
    names = [entry["name"].lower()] if entry.get("name") else []
    names += [s.replace("_", " ") for s in entry.get("short_names", [])]
    extra = EXTRA_NAMES.get(entry["short_name"])
    if extra:
        names.append(extra)
    return tuple(dict.fromkeys(n for n in names if n))  # unique, in order


def list_emoji(package_dir: Path, vendor: str, *, skin_tones: bool = True,
               skip_categories: tuple[str, ...] = SKIPPED_CATEGORIES) -> list[EmojiImage]:
    """Every emoji image of ``vendor`` ("twitter" or "google") in an unpacked package.

    Args:
        package_dir: The ``package/`` folder of the unpacked npm tarball.
        vendor: ``"twitter"`` (Twemoji) or ``"google"`` (Noto).
        skin_tones: Also list the single-tone skin variations (same names as the base emoji).
        skip_categories: Categories left out (``emoji.json``'s "category"); flags and the
            skin-tone swatches by default.

    Returns:
        The images that exist on disk, in the package's sort order.
    """
    package_dir = Path(package_dir)
    entries = json.loads((package_dir / "emoji.json").read_text())
    img_dir = package_dir / "img" / vendor / "64"
    known = {e["category"] for e in entries}
    unknown = sorted(set(skip_categories) - known - set(SKIPPED_CATEGORIES))  # a typo would skip nothing
    if unknown:
        raise ValueError(f"skip_categories: {unknown} are not categories of {package_dir / 'emoji.json'} "
                         f"(it has {sorted(known)})")
    out: list[EmojiImage] = []
    for e in sorted(entries, key=lambda x: x["sort_order"]):
        if e["category"] in skip_categories or not e.get(f"has_img_{vendor}"):
            continue
        files = [e["image"]]
        if skin_tones:
            files += [v["image"] for k, v in (e.get("skin_variations") or {}).items()
                      if "-" not in k and v.get(f"has_img_{vendor}")]
        for name in files:
            if (img_dir / name).is_file():
                out.append(EmojiImage(img_dir / name, e["short_name"], _names(e), e["category"], e["sort_order"]))
    return out


def caption(names: tuple[str, ...], index: int = 0) -> str:
    """The caption of the ``index``-th name: "an emoji of a cat face"."""
    return f"an emoji of a {names[index % len(names)]}"


def load_rgb(path: Path, resolution: int) -> np.ndarray:
    """Load an RGBA emoji, flatten it onto white and resize it (box filter).

    Returns:
        ``uint8`` array ``[resolution, resolution, 3]``.
    """
    rgba = Image.open(path).convert("RGBA")
    rgb = Image.new("RGB", rgba.size, (255, 255, 255))
    rgb.paste(rgba, mask=rgba.getchannel("A"))
    if rgb.size != (resolution, resolution):
        rgb = rgb.resize((resolution, resolution), Image.BOX if resolution < rgb.size[0] else Image.BICUBIC)
    return np.asarray(rgb, dtype=np.uint8)


def load_pixels(images: list[EmojiImage], resolution: int) -> np.ndarray:
    """Stack :func:`load_rgb` over ``images``: ``uint8`` ``[N, resolution, resolution, 3]``."""
    return np.stack([load_rgb(im.path, resolution) for im in images])
