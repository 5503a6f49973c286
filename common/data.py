"""One site's private images: read from a folder, validated, converted, resized.

A site's data folder holds image files (``.png .jpg .jpeg .webp .bmp``, any letter case)
and, optionally, captions: a ``captions.json`` object mapping file name -> caption, and/or a
sidecar ``<stem>.txt`` per image. Everything else in the folder (sub-folders, hidden files
such as ``.DS_Store`` or macOS ``._x.png`` forks, other extensions) is ignored.

Every problem with the data raises :class:`SiteDataError` naming the site and the file, so a
site operator can fix it; nothing is skipped silently. Those messages contain file names,
which are local to the site: do not forward them to the server if names are private.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
CAPTIONS_FILE = "captions.json"
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA"})
_DIRECT_MODES = frozenset({"RGB", "L", "1", "CMYK", "YCbCr", "RGBX"})


class SiteDataError(ValueError):
    """A site's data folder or one of its files is missing, unreadable or malformed."""

    def __init__(self, site: str, path: str | Path, problem: str) -> None:
        self.site = site
        self.path = str(path)
        self.problem = problem
        super().__init__(f"site {site!r}: {path}: {problem}")


@dataclass(frozen=True)
class SiteImages:
    """The images of one site, in file-name order.

    Attributes:
        names: file names relative to the data folder, sorted.
        pixels: float32 tensor [N, 3, R, R] with values in [-1, 1].
        captions: one caption per image, or None where the image has none.
        site: the site the images belong to.
    """

    names: tuple[str, ...]
    pixels: torch.Tensor
    captions: tuple[str | None, ...]
    site: str

    def __len__(self) -> int:
        return len(self.names)


def load_site_images(
    folder: str | Path,
    *,
    site: str,
    resolution: int,
    max_images: int | None = None,
    max_pixels: int = 40_000_000,
) -> SiteImages:
    """Load and validate every image of one site's data folder.

    Images are taken in sorted file-name order (the first ``max_images`` of them if given);
    only the top level of ``folder`` is read. Each image is decoded fully (a truncated file
    is an error, never padded), its EXIF orientation applied, and converted to RGB:

    - RGBA, LA and palette (P) images with transparency are composited on a white background;
    - grayscale (L, 1-bit) is replicated to the three channels;
    - 16-bit grayscale (``I;16``) and 32-bit integer (``I``) images are read as 16-bit data
      (0..65535; ``I`` values outside that range are an error), scaled to 8 bits (/257) and
      replicated to RGB;
    - CMYK and YCbCr are converted by Pillow; other modes (e.g. float ``F``) are refused.

    Then it is center-cropped to the largest square and resized to ``resolution`` with
    bicubic resampling (``Image.BICUBIC``), and mapped from [0, 255] to [-1, 1].
    A file whose content does not match its extension (a JPEG named ``.png``) is accepted
    if Pillow decodes it: the format is read from the content. Animated files give their
    first frame.

    Captions come from ``captions.json`` and ``<stem>.txt`` sidecars (UTF-8, stripped; a
    blank caption counts as none). A sidecar applies to every image with its stem (``a.png`` and
    ``a.jpg`` share ``a.txt``). An image may get a caption from both sources only if they agree.

    Duplicates are refused: two files whose decoded RGB pixels are identical (the same file
    copied, or the same picture saved as PNG and BMP) would make one private image count twice,
    so its contribution could exceed the per-image bound the DP guarantee rests on.

    Args:
        folder: the site's data folder.
        site: the site's name, used in error messages and kept in the result.
        resolution: side R of the square output images, in pixels.
        max_images: load at most this many images (None: all).
        max_pixels: refuse any image with more pixels (width * height) than this, checked from
            the header before decoding (decompression-bomb guard).

    Returns:
        The site's images, names and captions.

    Raises:
        SiteDataError: the folder is missing, not a directory or holds no image; an image is
            empty, unreadable, truncated, too large or of an unsupported mode; ``captions.json`` (also one
            naming a file twice)
            or a sidecar is malformed; a file (e.g. a symlink) resolves outside the folder; two
            images have the same pixels.
        ValueError: ``resolution``, ``max_images`` or ``max_pixels`` is not a positive integer.
    """
    for arg, value in (("resolution", resolution), ("max_pixels", max_pixels), ("max_images", max_images)):
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise ValueError(f"{arg} must be a positive integer, got {value!r}")
    folder = Path(folder)
    if not folder.exists():
        raise SiteDataError(site, folder, "data folder does not exist")
    if not folder.is_dir():
        raise SiteDataError(site, folder, "data folder is not a directory")
    root = folder.resolve()

    try:
        entries = list(folder.iterdir())
    except OSError as exc:
        raise SiteDataError(site, folder, f"data folder cannot be listed ({exc})") from exc
    images = sorted(
        p.name for p in entries
        if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and not p.is_dir()
    )
    if not images:
        extensions = " ".join(sorted(IMAGE_EXTENSIONS))
        raise SiteDataError(site, folder, f"data folder holds no image (looked for {extensions})")
    json_captions = _read_captions_json(folder, root, site, set(images))
    names = images if max_images is None else images[:max_images]

    pixels = []
    captions: list[str | None] = []
    seen: dict[str, str] = {}  # digest of the decoded pixels -> first file with them
    for name in names:
        path = _inside(folder / name, root, site)
        arr, digest = _load_pixels(path, site, resolution, max_pixels)
        if digest in seen:
            raise SiteDataError(site, path, f"has the same pixels as {seen[digest]}: a duplicate would count one "
                                            "image twice (remove one of them)")
        seen[digest] = name
        pixels.append(arr)
        captions.append(_caption(folder, root, site, name, json_captions.get(name)))
    return SiteImages(
        names=tuple(names), pixels=torch.from_numpy(np.stack(pixels)), captions=tuple(captions), site=site
    )


def _inside(path: Path, root: Path, site: str) -> Path:
    """``path`` if it resolves inside ``root`` (symlinks included), else SiteDataError."""
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError) as exc:  # symlink loop
        raise SiteDataError(site, path, f"cannot resolve path ({exc})") from exc
    if not resolved.is_relative_to(root):
        raise SiteDataError(site, path, f"resolves to {resolved}, outside the data folder {root}")
    return path


def _read_captions_json(folder: Path, root: Path, site: str, images: set[str]) -> dict[str, str | None]:
    """The validated ``captions.json`` of ``folder`` as {image name: caption}; {} if absent."""
    path = folder / CAPTIONS_FILE
    if not path.exists() and not path.is_symlink():
        return {}
    _inside(path, root, site)
    try:
        data = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_unique_keys)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise SiteDataError(site, path, f"is not readable UTF-8 JSON ({type(exc).__name__}: {exc})") from exc
    except _DuplicateKey as exc:
        raise SiteDataError(site, path, f"names {exc.args[0]!r} more than once") from None
    if not isinstance(data, dict):
        raise SiteDataError(
            site, path, f"must be a JSON object mapping file name -> caption, got {type(data).__name__}"
        )
    out: dict[str, str | None] = {}
    for name, caption in data.items():
        if not isinstance(caption, str):
            raise SiteDataError(site, path, f"caption of {name!r} must be a string, got {type(caption).__name__}")
        if name not in images:
            raise SiteDataError(site, path, f"names {name!r}, which is not an image file in {folder}")
        out[name] = caption.strip() or None
    return out


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object's dict; a key given twice (json keeps the last silently) is an error."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _caption(folder: Path, root: Path, site: str, name: str, from_json: str | None) -> str | None:
    """The caption of image ``name``: its ``<stem>.txt`` sidecar and/or its JSON entry."""
    sidecar = folder / (Path(name).stem + ".txt")
    if not sidecar.exists() and not sidecar.is_symlink():
        return from_json
    _inside(sidecar, root, site)
    try:
        text = sidecar.read_text(encoding="utf-8").strip() or None
    except (OSError, UnicodeDecodeError) as exc:
        raise SiteDataError(site, sidecar, f"caption file is not readable UTF-8 text ({exc})") from exc
    if from_json is not None and text is not None and text != from_json:
        raise SiteDataError(site, sidecar, f"caption of {name!r} disagrees with {CAPTIONS_FILE}")
    return text or from_json


def _load_pixels(path: Path, site: str, resolution: int, max_pixels: int) -> tuple[np.ndarray, str]:
    """Decode, check, convert and resize one image: float32 [3, R, R] in [-1, 1], and a
    SHA-256 of the full-size RGB pixels (for duplicates)."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise SiteDataError(site, path, f"cannot be read ({exc})") from exc
    if size == 0:
        raise SiteDataError(site, path, "is an empty (zero-byte) file")
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check below replaces Pillow's bomb warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise SiteDataError(
                        site, path, f"image is too large: {width}x{height} = {width * height} pixels > {max_pixels}"
                    )
                img.load()
                rgb = _to_rgb(ImageOps.exif_transpose(img), site, path)
    except SiteDataError:
        raise
    except Image.DecompressionBombError as exc:
        raise SiteDataError(site, path, f"image is too large ({exc})") from exc
    except Exception as exc:  # Pillow raises many types on hostile input; all mean "unreadable"
        problem = f"is not a readable image or is truncated ({type(exc).__name__}: {exc})"
        raise SiteDataError(site, path, problem) from exc
    digest = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode() + rgb.tobytes()).hexdigest()
    side = min(rgb.size)
    left, top = (rgb.width - side) // 2, (rgb.height - side) // 2
    # Crop first: resize(box=...) would let bicubic taps reach pixels outside the square.
    square = rgb.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
    arr = np.asarray(square, dtype=np.float32)  # [R, R, 3], 0..255
    return np.ascontiguousarray((arr / 127.5 - 1.0).transpose(2, 0, 1)), digest


def _to_rgb(img: Image.Image, site: str, path: Path) -> Image.Image:
    """Convert a decoded image of any supported mode to 8-bit RGB (see load_site_images)."""
    mode = img.mode
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(img).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise SiteDataError(site, path, f"{mode} image has values outside the 16-bit range 0..65535")
        gray = ((values * 255 + 32767) // 65535).astype(np.uint8)  # round(v / 257)
        return Image.fromarray(gray).convert("RGB")
    if mode in _DIRECT_MODES or mode == "P":
        return img.convert("RGB")
    raise SiteDataError(site, path, f"unsupported image mode {mode!r}")
