"""One site's private images: read from a folder, validated, converted, resized.

A site's data folder holds image files (``.png .jpg .jpeg .webp .bmp``, any letter case)
and, optionally, captions: a ``captions.json`` object mapping file name -> caption, and/or a
sidecar ``<stem>.txt`` per image. Everything else in the folder (sub-folders, hidden files
such as ``.DS_Store`` or macOS ``._x.png`` forks, other extensions) is ignored.

One record is one image with its caption. A record that cannot be used (an unreadable,
truncated, too large or unsupported image, a file resolving outside the folder, a malformed
or contradictory caption of that image) or that repeats the pixels of an earlier one is left
out as if it were absent: the site's result is then exactly that of the folder without it,
which the add/remove-one-image guarantee covers (raising instead would drop the whole site,
a change of up to n_site * C from one record). What was left out, and why, comes back in
:attr:`SiteImages.skipped`, for the site's own log and ``client.check_data``. Only problems
of the folder as a whole (missing, not a directory, unlistable, an unusable
``captions.json``) raise :class:`SiteDataError`. Both name files, which are private to the
site: never forward them to the server.
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
    """A site's data folder as a whole (or its ``captions.json``) is missing, unreadable or malformed."""

    def __init__(self, site: str, path: str | Path, problem: str) -> None:
        self.site = site
        self.path = str(path)
        self.problem = problem
        super().__init__(f"site {site!r}: {path}: {problem}")


@dataclass(frozen=True)
class RecordProblem:
    """Why one file of a site's folder was left out (or one ``captions.json`` entry ignored).

    Attributes:
        name: the file, relative to the data folder: the image left out, or ``captions.json``
            for an entry that names no image.
        problem: what is wrong, in words (may name other files of the folder).
    """

    name: str
    problem: str

    def __str__(self) -> str:
        return f"{self.name}: {self.problem}"


@dataclass(frozen=True)
class SiteImages:
    """The usable images of one site, in file-name order.

    Attributes:
        names: file names relative to the data folder, sorted.
        pixels: float32 tensor [N, 3, R, R] with values in [-1, 1] (N may be 0).
        captions: one caption per image, or None where the image has none.
        site: the site the images belong to.
        skipped: the records left out as absent and the caption entries ignored, with why
            (private to the site, like the names).
    """

    names: tuple[str, ...]
    pixels: torch.Tensor
    captions: tuple[str | None, ...]
    site: str
    skipped: tuple[RecordProblem, ...] = ()

    def __len__(self) -> int:
        return len(self.names)


class _Unusable(Exception):
    """One record cannot be used; ``args[0]`` says why (becomes a :class:`RecordProblem`)."""


def load_site_images(
    folder: str | Path,
    *,
    site: str,
    resolution: int,
    max_images: int | None = None,
    max_pixels: int = 40_000_000,
) -> SiteImages:
    """Load and validate every image of one site's data folder, leaving out unusable ones.

    Images are taken in sorted file-name order (the first ``max_images`` usable ones if
    given); only the top level of ``folder`` is read. Each image is decoded fully (a
    truncated file is unusable, never padded), its EXIF orientation applied, and converted
    to RGB:

    - RGBA, LA and palette (P) images with transparency are composited on a white background;
    - grayscale (L, 1-bit) is replicated to the three channels;
    - 16-bit grayscale (``I;16``) and 32-bit integer (``I``) images are read as 16-bit data
      (0..65535; ``I`` values outside that range make the image unusable), scaled to 8 bits
      (/257) and replicated to RGB;
    - CMYK and YCbCr are converted by Pillow; other modes (e.g. float ``F``) are unusable.

    Then it is center-cropped to the largest square and resized to ``resolution`` with
    bicubic resampling (``Image.BICUBIC``), and mapped from [0, 255] to [-1, 1].
    A file whose content does not match its extension (a JPEG named ``.png``) is accepted
    if Pillow decodes it: the format is read from the content. Animated files give their
    first frame.

    Captions come from ``captions.json`` and ``<stem>.txt`` sidecars (UTF-8, stripped; a
    blank caption counts as none). A sidecar applies to every image with its stem (``a.png`` and
    ``a.jpg`` share ``a.txt``). An image may get a caption from both sources only if they
    agree; an image whose caption is unreadable, malformed, given twice in ``captions.json``
    or contradictory is left out (its record is unusable). A ``captions.json`` entry naming
    no image file is ignored.

    Copies are left out: an image whose decoded RGB pixels equal those of an earlier kept
    image in name order (the same file copied, the same picture saved as PNG and BMP, a
    symlink to another image) is a later copy of the same record. Keeping it would count
    one private image twice, so its contribution could exceed the per-image bound.

    Every image, caption entry or copy left out is listed in :attr:`SiteImages.skipped`.

    Args:
        folder: the site's data folder.
        site: the site's name, used in error messages and kept in the result.
        resolution: side R of the square output images, in pixels.
        max_images: keep at most this many usable images (None: all).
        max_pixels: an image with more pixels (width * height) than this is unusable,
            checked from the header before decoding (decompression-bomb guard).

    Returns:
        The site's usable images, names and captions, and what was left out.

    Raises:
        SiteDataError: the folder is missing, not a directory or cannot be listed;
            ``captions.json`` resolves outside the folder, is not UTF-8 JSON or not an object.
        ValueError: ``resolution``, ``max_images`` or ``max_pixels`` is not a positive integer.
    """
    for arg, value in (("resolution", resolution), ("max_pixels", max_pixels), ("max_images", max_images)):
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise ValueError(f"{arg} must be a positive integer, got {value!r}")
    folder = Path(folder)
    root = _site_root(folder, site)
    images = image_files(folder, site)
    json_captions, skipped = _read_captions_json(folder, root, site, set(images))

    pixels: list[np.ndarray] = []
    names: list[str] = []
    captions: list[str | None] = []
    kept: dict[str, str] = {}  # digest of the decoded pixels -> the kept image with them
    for name in images:
        if max_images is not None and len(names) >= max_images:
            break
        try:
            arr, digest = _load_pixels(_inside(folder / name, root), resolution, max_pixels)
            caption = _caption(folder, root, name, json_captions.get(name))
        except _Unusable as exc:
            skipped.append(RecordProblem(name, str(exc.args[0])))
            continue
        if digest in kept:
            skipped.append(RecordProblem(name, f"has the same pixels as {kept[digest]}: a copy of one image, "
                                               "left out so that the image counts once"))
            continue
        kept[digest] = name
        names.append(name)
        pixels.append(arr)
        captions.append(caption)
    stacked = np.stack(pixels) if pixels else np.zeros((0, 3, resolution, resolution), np.float32)
    return SiteImages(names=tuple(names), pixels=torch.from_numpy(stacked), captions=tuple(captions), site=site,
                      skipped=tuple(skipped))


def _site_root(folder: Path, site: str) -> Path:
    """The resolved data folder; SiteDataError if it is missing or not a directory."""
    if not folder.exists():
        raise SiteDataError(site, folder, "data folder does not exist")
    if not folder.is_dir():
        raise SiteDataError(site, folder, "data folder is not a directory")
    return folder.resolve()


def image_files(folder: str | Path, site: str) -> list[str]:
    """The sorted names of the image files at the top level of ``folder`` (by extension;
    hidden files and folders excluded); SiteDataError if the folder cannot be listed."""
    folder = Path(folder)
    try:
        entries = list(folder.iterdir())
    except OSError as exc:
        raise SiteDataError(site, folder, f"data folder cannot be listed ({exc})") from exc
    return sorted(
        p.name for p in entries
        if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and not p.is_dir()
    )


def _inside(path: Path, root: Path) -> Path:
    """``path`` if it resolves inside ``root`` (symlinks included), else :class:`_Unusable`."""
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError) as exc:  # symlink loop
        raise _Unusable(f"cannot resolve path ({exc})") from exc
    if not resolved.is_relative_to(root):
        raise _Unusable(f"resolves to {resolved}, outside the data folder {root}")
    return path


class _Entry:
    """A ``captions.json`` entry that makes its image unusable (kept instead of the caption)."""

    def __init__(self, problem: str) -> None:
        self.problem = problem


def _read_captions_json(folder: Path, root: Path, site: str,
                        images: set[str]) -> tuple[dict[str, str | None | _Entry], list[RecordProblem]]:
    """``captions.json`` of ``folder`` as {image name: caption, or an :class:`_Entry` saying
    why that image's caption is unusable}, and the entries ignored because they name no image
    file; ``({}, [])`` if absent. A file that cannot be read as a JSON object is a SiteDataError."""
    path = folder / CAPTIONS_FILE
    if not path.exists() and not path.is_symlink():
        return {}, []
    try:
        _inside(path, root)
    except _Unusable as exc:
        raise SiteDataError(site, path, str(exc.args[0])) from None
    repeated: dict[int, set[str]] = {}  # id of each parsed object -> its keys given more than once
    try:
        data = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=lambda pairs: _object(pairs, repeated))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise SiteDataError(site, path, f"is not readable UTF-8 JSON ({type(exc).__name__}: {exc})") from exc
    if not isinstance(data, dict):
        raise SiteDataError(
            site, path, f"must be a JSON object mapping file name -> caption, got {type(data).__name__}"
        )
    twice = repeated.get(id(data), set())
    out: dict[str, str | None | _Entry] = {}
    ignored: list[RecordProblem] = []
    for name, caption in data.items():
        if name not in images:
            ignored.append(RecordProblem(CAPTIONS_FILE, f"names {name!r}, which is not an image file of the folder: "
                                                        "entry ignored"))
        elif name in twice:
            out[name] = _Entry(f"{CAPTIONS_FILE} names {name!r} more than once")
        elif not isinstance(caption, str):
            out[name] = _Entry(f"{CAPTIONS_FILE}: caption of {name!r} must be a string, got {type(caption).__name__}")
        else:
            out[name] = caption.strip() or None
    return out, ignored


def _object(pairs: list[tuple[str, object]], repeated: dict[int, set[str]]) -> dict:
    """A JSON object's dict, noting in ``repeated[id(dict)]`` the keys given more than once
    (json would keep the last silently; the caller makes that image's caption unusable)."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            repeated.setdefault(id(out), set()).add(key)
        out[key] = value
    return out


def _caption(folder: Path, root: Path, name: str, from_json: str | None | _Entry) -> str | None:
    """The caption of image ``name``: its ``<stem>.txt`` sidecar and/or its JSON entry
    (:class:`_Unusable` if either is unusable or they disagree)."""
    if isinstance(from_json, _Entry):
        raise _Unusable(from_json.problem)
    sidecar = folder / (Path(name).stem + ".txt")
    if not sidecar.exists() and not sidecar.is_symlink():
        return from_json
    try:
        _inside(sidecar, root)
        text = sidecar.read_text(encoding="utf-8").strip() or None
    except _Unusable as exc:
        raise _Unusable(f"caption file {sidecar.name}: {exc.args[0]}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise _Unusable(f"caption file {sidecar.name} is not readable UTF-8 text ({exc})") from exc
    if from_json is not None and text is not None and text != from_json:
        raise _Unusable(f"caption file {sidecar.name} disagrees with {CAPTIONS_FILE}")
    return text or from_json


def _load_pixels(path: Path, resolution: int, max_pixels: int) -> tuple[np.ndarray, str]:
    """Decode, check, convert and resize one image: float32 [3, R, R] in [-1, 1], and a
    SHA-256 of the full-size RGB pixels (for copies); :class:`_Unusable` if it cannot be."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise _Unusable(f"cannot be read ({exc})") from exc
    if size == 0:
        raise _Unusable("is an empty (zero-byte) file")
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check below replaces Pillow's bomb warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise _Unusable(f"image is too large: {width}x{height} = {width * height} pixels > {max_pixels}")
                img.load()
                rgb = _to_rgb(ImageOps.exif_transpose(img))
    except _Unusable:
        raise
    except Image.DecompressionBombError as exc:
        raise _Unusable(f"image is too large ({exc})") from exc
    except Exception as exc:  # Pillow raises many types on hostile input; all mean "unreadable"
        raise _Unusable(f"is not a readable image or is truncated ({type(exc).__name__}: {exc})") from exc
    digest = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode() + rgb.tobytes()).hexdigest()
    side = min(rgb.size)
    left, top = (rgb.width - side) // 2, (rgb.height - side) // 2
    # Crop first: resize(box=...) would let bicubic taps reach pixels outside the square.
    square = rgb.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
    arr = np.asarray(square, dtype=np.float32)  # [R, R, 3], 0..255
    return np.ascontiguousarray((arr / 127.5 - 1.0).transpose(2, 0, 1)), digest


def _to_rgb(img: Image.Image) -> Image.Image:
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
            raise _Unusable(f"{mode} image has values outside the 16-bit range 0..65535")
        gray = ((values * 255 + 32767) // 65535).astype(np.uint8)  # round(v / 257)
        return Image.fromarray(gray).convert("RGB")
    if mode in _DIRECT_MODES or mode == "P":
        return img.convert("RGB")
    raise _Unusable(f"unsupported image mode {mode!r}")
