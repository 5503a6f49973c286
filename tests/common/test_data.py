"""Tests of common/data.py: loading, converting and validating one site's images."""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from common.data import RecordProblem, SiteDataError, SiteImages, load_site_images

SITE = "site-test"
DEMO = Path(__file__).resolve().parents[2] / "data" / "demo" / "site-0"


def value(v8: float) -> float:
    """The [-1, 1] value of an 8-bit level."""
    return v8 / 127.5 - 1.0


def save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


def load(folder: Path, resolution: int = 8, **kw) -> SiteImages:
    return load_site_images(folder, site=SITE, resolution=resolution, **kw)


def expect_error(folder: Path, culprit: str, *words: str, **kw) -> SiteDataError:
    """Loading must raise SiteDataError naming the site, the culprit file and the problem
    (only for problems of the folder as a whole)."""
    with pytest.raises(SiteDataError) as info:
        load(folder, **kw)
    msg = str(info.value)
    assert SITE in msg and culprit in msg, msg
    for w in words:
        assert w in msg, msg
    return info.value


NEIGHBOUR = "zz-valid.png"  # a usable image next to the bad one: it must still be loaded


def expect_left_out(folder: Path, culprit: str, *words: str, **kw) -> RecordProblem:
    """Loading must leave the image ``culprit`` out as absent, say why in ``skipped``, and
    keep the folder's other images (a valid neighbour is added to show it)."""
    save(Image.fromarray(np.random.default_rng(99).integers(0, 256, (4, 4, 3), np.uint8)), folder / NEIGHBOUR)
    data = load(folder, **kw)
    assert culprit not in data.names and NEIGHBOUR in data.names, data
    assert data.pixels.shape[0] == len(data.names) == len(data.captions)
    (problem,) = [p for p in data.skipped if p.name == culprit]
    for w in words:
        assert w in problem.problem, problem
    return problem


# ---- the real demo data -----------------------------------------------------------------
def test_demo_site() -> None:
    data = load_site_images(DEMO, site="site-0", resolution=32)
    captions = json.loads((DEMO / "captions.json").read_text())
    assert len(data) == 12 and data.site == "site-0"
    assert data.names == tuple(sorted(captions))
    assert data.captions == tuple(captions[n] for n in data.names)
    assert data.pixels.shape == (12, 3, 32, 32) and data.pixels.dtype == torch.float32
    assert data.pixels.min() >= -1 and data.pixels.max() <= 1
    assert data.pixels.std() > 0.1  # not a constant


def test_max_images_takes_first_names(tmp_path: Path) -> None:
    for i, name in enumerate(("c.png", "a.png", "b.png")):
        save(Image.new("RGB", (4, 4), (i, 0, 0)), tmp_path / name)
    assert load(tmp_path, max_images=2).names == ("a.png", "b.png")
    assert load(tmp_path).names == ("a.png", "b.png", "c.png")


@pytest.mark.parametrize(
    "bad", [{"resolution": 0}, {"max_images": 0}, {"max_pixels": -1}, {"resolution": 2.5}, {"resolution": True}]
)
def test_bad_arguments_raise_value_error(tmp_path: Path, bad: dict) -> None:
    save(Image.new("RGB", (4, 4)), tmp_path / "a.png")
    kw = {"resolution": 8, **bad}
    with pytest.raises(ValueError, match=next(iter(bad))):
        load_site_images(tmp_path, site=SITE, **kw)


# ---- formats, extensions and conversions -------------------------------------------------
def test_extensions_and_ignored_files(tmp_path: Path) -> None:
    def rgb(i: int) -> Image.Image:  # a different picture per file (duplicates are refused)
        return Image.new("RGB", (6, 6), (10 + 20 * i, 20, 30))

    save(rgb(1), tmp_path / "b.PNG")
    save(rgb(0), tmp_path / "a.JpEg", format="JPEG")
    save(rgb(2), tmp_path / "c.jpg")
    save(rgb(3), tmp_path / "d.webp", lossless=True)
    save(rgb(4), tmp_path / "e.bmp")
    save(rgb(5), tmp_path / "f.gif")  # not an accepted extension
    save(rgb(6), tmp_path / ".hidden.png")  # hidden (e.g. macOS ._ fork)
    (tmp_path / "notes.md").write_text("not an image")
    (tmp_path / "sub.png").mkdir()  # a folder, not a file
    data = load(tmp_path)
    assert data.names == ("a.JpEg", "b.PNG", "c.jpg", "d.webp", "e.bmp")
    for i in (1, 3, 4):  # lossless formats decode exactly
        exact = torch.tensor([value(10 + 20 * i), value(20), value(30)])
        assert torch.allclose(data.pixels[i, :, 0, 0], exact, atol=1e-6)


def test_content_not_matching_extension_is_accepted(tmp_path: Path) -> None:
    save(Image.new("RGB", (8, 8), (200, 0, 0)), tmp_path / "photo.png", format="JPEG")
    data = load(tmp_path)
    assert data.names == ("photo.png",)
    assert abs(float(data.pixels[0, 0].mean()) - value(200)) < 0.05


def test_rgb_exact_range_and_layout(tmp_path: Path) -> None:
    save(Image.new("RGB", (5, 5), (255, 0, 128)), tmp_path / "x.png")
    px = load(tmp_path, resolution=7).pixels
    assert px.shape == (1, 3, 7, 7)
    assert torch.all(px[0, 0] == 1.0) and torch.all(px[0, 1] == -1.0)
    assert torch.allclose(px[0, 2], torch.full((7, 7), value(128)), atol=1e-6)


def test_center_crop_then_resize(tmp_path: Path) -> None:
    # 30x10: red | green | blue thirds -> the centered 10x10 square is all green.
    wide = np.zeros((10, 30, 3), np.uint8)
    wide[:, :10, 0] = wide[:, 10:20, 1] = wide[:, 20:, 2] = 255
    save(Image.fromarray(wide), tmp_path / "wide.png")
    # 10x30 tall: the same thirds top to bottom.
    save(Image.fromarray(wide.transpose(1, 0, 2).copy()), tmp_path / "tall.png")
    px = load(tmp_path, resolution=4).pixels
    green = torch.tensor([-1.0, 1.0, -1.0])[:, None, None].expand(3, 4, 4)
    assert torch.equal(px[0], green) and torch.equal(px[1], green)


def test_resize_is_bicubic(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
    save(Image.fromarray(arr), tmp_path / "n.png")
    expected = np.asarray(Image.fromarray(arr).resize((5, 5), Image.BICUBIC), np.float32) / 127.5 - 1
    assert torch.equal(load(tmp_path, resolution=5).pixels[0], torch.from_numpy(expected).permute(2, 0, 1))


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    arr = np.zeros((8, 8, 3), np.uint8)
    arr[:4, :, 0] = 255  # top half red
    arr[4:, :, 2] = 255  # bottom half blue
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    save(img, tmp_path / "r.png", exif=exif)
    px = load(tmp_path).pixels[0]
    assert torch.all(px[2, :, 0] == 1.0) and torch.all(px[0, :, 7] == 1.0)  # left blue, right red


def test_rgba_composited_on_white(tmp_path: Path) -> None:
    save(Image.new("RGBA", (4, 4), (0, 0, 0, 0)), tmp_path / "clear.png")
    save(Image.new("RGBA", (4, 4), (0, 0, 0, 255)), tmp_path / "opaque.png")
    save(Image.new("RGBA", (4, 4), (0, 0, 0, 128)), tmp_path / "half.png")
    px = load(tmp_path, resolution=4).pixels
    assert torch.all(px[0] == 1.0)  # clear -> white
    assert torch.allclose(px[1], torch.full_like(px[1], value(127)), atol=1 / 127.5)  # half black on white
    assert torch.all(px[2] == -1.0)  # opaque black


def test_la_composited_on_white(tmp_path: Path) -> None:
    save(Image.new("LA", (4, 4), (0, 0)), tmp_path / "la.png")
    assert torch.all(load(tmp_path, resolution=4).pixels == 1.0)


def test_grayscale_replicated(tmp_path: Path) -> None:
    save(Image.new("L", (4, 4), 51), tmp_path / "g.png")
    save(Image.new("1", (4, 4), 1), tmp_path / "h.png")
    px = load(tmp_path, resolution=4).pixels
    assert torch.allclose(px[0], torch.full((3, 4, 4), value(51)), atol=1e-6)
    assert torch.all(px[1] == 1.0)


def test_palette_with_and_without_transparency(tmp_path: Path) -> None:
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 255] + [0, 255, 0] * 255)
    save(pal, tmp_path / "opaque.png")
    save(pal, tmp_path / "transparent.png", transparency=0)
    px = load(tmp_path, resolution=4).pixels
    assert torch.equal(px[0, :, 0, 0], torch.tensor([-1.0, -1.0, 1.0]))  # blue
    assert torch.all(px[1] == 1.0)  # transparent index -> white


def test_sixteen_bit_scaled_to_eight(tmp_path: Path) -> None:
    levels = np.array([[0, 128 * 257], [65535, 65535]], np.uint16)
    img = Image.fromarray(levels)
    assert img.mode == "I;16"
    save(img, tmp_path / "a16.png")
    px = load(tmp_path, resolution=2).pixels[0]
    assert px.shape == (3, 2, 2)
    expected = torch.tensor([[-1.0, value(128)], [1.0, 1.0]])
    for c in range(3):
        assert torch.allclose(px[c], expected, atol=1e-6)


def test_int32_image_read_as_sixteen_bit(tmp_path: Path) -> None:
    img = Image.fromarray(np.full((4, 4), 65535, np.int32))
    assert img.mode == "I"
    save(img, tmp_path / "i32.png", format="TIFF")  # TIFF content, .png name
    assert torch.all(load(tmp_path, resolution=4).pixels == 1.0)


def test_int32_out_of_16_bit_range_left_out(tmp_path: Path) -> None:
    save(Image.fromarray(np.full((4, 4), -5, np.int32)), tmp_path / "neg.png", format="TIFF")
    expect_left_out(tmp_path, "neg.png", "16-bit")


def test_cmyk_converted(tmp_path: Path) -> None:
    save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), tmp_path / "c.jpg")  # red in CMYK
    px = load(tmp_path).pixels[0]
    assert torch.allclose(px[:, 0, 0], torch.tensor([1.0, -1.0, -1.0]), atol=0.05)


# ---- captions ---------------------------------------------------------------------------
def test_captions_json_and_sidecars(tmp_path: Path) -> None:
    for i, name in enumerate(("a.png", "b.png", "c.png", "d.png", "e.png")):
        save(Image.new("RGB", (4, 4), (i, 0, 0)), tmp_path / name)
    (tmp_path / "captions.json").write_text(json.dumps({"a.png": "from json", "c.png": " same ", "e.png": "  "}))
    (tmp_path / "b.txt").write_text("from sidecar\n", encoding="utf-8")
    (tmp_path / "c.txt").write_text("same")
    (tmp_path / "orphan.txt").write_text("not a caption of anything")
    assert load(tmp_path).captions == ("from json", "from sidecar", "same", None, None)


def test_no_captions_at_all(tmp_path: Path) -> None:
    save(Image.new("RGB", (4, 4)), tmp_path / "a.png")
    assert load(tmp_path).captions == (None,)


def test_unicode_sidecar(tmp_path: Path) -> None:
    save(Image.new("RGB", (4, 4)), tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("café ☕", encoding="utf-8")
    assert load(tmp_path).captions == ("café ☕",)


# ---- folder errors name the site and the folder; bad records are left out, by name -------
def test_missing_folder(tmp_path: Path) -> None:
    expect_error(tmp_path / "nowhere", "nowhere", "does not exist")


def test_folder_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "afile"
    f.write_text("x")
    expect_error(f, "afile", "not a directory")


def test_a_folder_without_images_is_an_empty_site(tmp_path: Path) -> None:
    """No image means zero records (a DPAgg-TI site then sends a zero sum), not an error."""
    folder = tmp_path / "empty-site"
    folder.mkdir()
    (folder / "readme.txt").write_text("no images here")
    data = load(folder, resolution=8)
    assert data.names == () and data.captions == () and data.skipped == ()
    assert data.pixels.shape == (0, 3, 8, 8) and data.pixels.dtype == torch.float32


def test_a_folder_of_unusable_images_is_an_empty_site(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "b.png").write_text("text")
    data = load(tmp_path)
    assert len(data) == 0 and data.pixels.shape == (0, 3, 8, 8)
    assert [p.name for p in data.skipped] == ["a.png", "b.png"]


def test_zero_byte_file(tmp_path: Path) -> None:
    (tmp_path / "zero.png").write_bytes(b"")
    expect_left_out(tmp_path, "zero.png", "zero-byte")


def test_not_an_image(tmp_path: Path) -> None:
    (tmp_path / "fake.jpg").write_bytes(b"this is text, not a JPEG")
    expect_left_out(tmp_path, "fake.jpg", "not a readable image")


def test_left_out_image_is_exactly_absent(tmp_path: Path) -> None:
    """The result with a bad file equals the result of the folder without it, bit for bit."""
    rng = np.random.default_rng(5)
    for name in ("a.png", "c.png"):
        save(Image.fromarray(rng.integers(0, 256, (9, 9, 3), np.uint8)), tmp_path / name)
    (tmp_path / "captions.json").write_text(json.dumps({"a.png": "first", "c.png": "third"}))
    without = load(tmp_path)
    (tmp_path / "b.png").write_bytes(VALID_PNG[: len(VALID_PNG) // 2])
    (tmp_path / "b.txt").write_text("caption of a broken file")
    with_bad = load(tmp_path)
    assert with_bad.names == without.names == ("a.png", "c.png")
    assert with_bad.captions == without.captions and torch.equal(with_bad.pixels, without.pixels)
    assert [p.name for p in with_bad.skipped] == ["b.png"] and without.skipped == ()


def test_max_images_counts_usable_images(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"")
    for i, name in enumerate(("b.png", "c.png", "d.png")):
        save(Image.new("RGB", (4, 4), (i, 0, 0)), tmp_path / name)
    assert load(tmp_path, max_images=2).names == ("b.png", "c.png")


@pytest.mark.parametrize("fmt,ext", [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp"), ("BMP", "bmp")])
def test_truncated_image(tmp_path: Path, fmt: str, ext: str) -> None:
    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format=fmt)
    data = buf.getvalue()
    (tmp_path / f"cut.{ext}").write_bytes(data[: len(data) * 2 // 3])
    expect_left_out(tmp_path, f"cut.{ext}", "truncated")


def test_too_large(tmp_path: Path) -> None:
    save(Image.new("RGB", (20, 20)), tmp_path / "big.png")
    expect_left_out(tmp_path, "big.png", "too large", "400", max_pixels=399)
    assert load(tmp_path, max_pixels=400).names == ("big.png", NEIGHBOUR)


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny valid 1x1 PNG whose header is rewritten to claim width x height pixels."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = bytes(data[12:17 + 12])  # b"IHDR" + 13 bytes
    new = b"IHDR" + struct.pack(">II", width, height) + ihdr[12:]
    data[12:29] = new
    data[29:33] = struct.pack(">I", zlib.crc32(new) & 0xFFFFFFFF)
    return bytes(data)


@pytest.mark.parametrize("side", [7000, 100_000])  # below and above Pillow's own bomb limit
def test_too_large_checked_from_header_before_decoding(tmp_path: Path, side: int) -> None:
    # The pixel data is far too short: decoding first would report truncation instead.
    (tmp_path / "bomb.png").write_bytes(_png_claiming(side, side))
    expect_left_out(tmp_path, "bomb.png", "too large")


def test_unsupported_mode(tmp_path: Path) -> None:
    save(Image.new("F", (4, 4), 0.5), tmp_path / "float.png", format="TIFF")
    expect_left_out(tmp_path, "float.png", "unsupported image mode", "'F'")


def test_captions_json_not_json(tmp_path: Path) -> None:
    save(Image.new("RGB", (4, 4)), tmp_path / "a.png")
    (tmp_path / "captions.json").write_text("{not json")
    expect_error(tmp_path, "captions.json", "JSON")


def test_captions_json_not_an_object(tmp_path: Path) -> None:
    save(Image.new("RGB", (4, 4)), tmp_path / "a.png")
    (tmp_path / "captions.json").write_text(json.dumps(["a.png", "a caption"]))
    expect_error(tmp_path, "captions.json", "JSON object", "list")


@pytest.mark.parametrize("caption", [3, None, ["a"]])
def test_a_malformed_caption_entry_leaves_its_image_out(tmp_path: Path, caption: object) -> None:
    save(Image.new("RGB", (4, 4)), tmp_path / "a.png")
    (tmp_path / "captions.json").write_text(json.dumps({"a.png": caption, NEIGHBOUR: "fine"}))
    expect_left_out(tmp_path, "a.png", "'a.png'", "must be a string")
    assert load(tmp_path).captions == ("fine",)


@pytest.mark.parametrize("named", ["missing.png", "notes.md"])
def test_a_caption_entry_naming_no_image_is_ignored(tmp_path: Path, named: str) -> None:
    save(Image.new("RGB", (4, 4)), tmp_path / "a.png")
    (tmp_path / "notes.md").write_text("x")
    (tmp_path / "captions.json").write_text(json.dumps({named: "x", "a.png": "kept"}))
    data = load(tmp_path)
    assert data.names == ("a.png",) and data.captions == ("kept",)
    (problem,) = data.skipped
    assert problem.name == "captions.json" and f"{named!r}" in problem.problem and "not an image" in problem.problem


def test_captions_json_not_utf8(tmp_path: Path) -> None:
    save(Image.new("RGB", (4, 4)), tmp_path / "a.png")
    (tmp_path / "captions.json").write_bytes(b'{"a.png": "\xff\xfe"}')
    expect_error(tmp_path, "captions.json", "UTF-8")


def test_sidecar_not_utf8(tmp_path: Path) -> None:
    save(Image.new("RGB", (4, 4)), tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes(b"\xff\xfe\xfa")
    expect_left_out(tmp_path, "a.png", "a.txt", "UTF-8")


def test_sidecar_disagrees_with_json(tmp_path: Path) -> None:
    save(Image.new("RGB", (4, 4)), tmp_path / "a.png")
    (tmp_path / "captions.json").write_text(json.dumps({"a.png": "one"}))
    (tmp_path / "a.txt").write_text("two")
    expect_left_out(tmp_path, "a.png", "a.txt", "disagrees")


@pytest.fixture
def site_and_outside(tmp_path: Path) -> tuple[Path, Path]:
    site, outside = tmp_path / "site", tmp_path / "outside"
    site.mkdir()
    outside.mkdir()
    save(Image.new("RGB", (4, 4)), site / "a.png")
    save(Image.new("RGB", (4, 4)), outside / "secret.png")
    (outside / "secret.txt").write_text("someone else's caption")
    (outside / "captions.json").write_text(json.dumps({"a.png": "x"}))
    return site, outside


@pytest.mark.parametrize("link,target,dropped,words", [
    ("b.png", "secret.png", "b.png", ("outside the data folder",)),
    ("a.txt", "secret.txt", "a.png", ("caption file a.txt", "outside the data folder")),
])
def test_symlink_escaping_folder_leaves_its_image_out(site_and_outside: tuple[Path, Path], link: str, target: str,
                                                       dropped: str, words: tuple[str, ...]) -> None:
    site, outside = site_and_outside
    os.symlink(outside / target, site / link)
    expect_left_out(site, dropped, *words)


def test_captions_json_escaping_folder_is_an_error(site_and_outside: tuple[Path, Path]) -> None:
    site, outside = site_and_outside
    os.symlink(outside / "captions.json", site / "captions.json")
    expect_error(site, "captions.json", "outside the data folder")


def test_symlink_inside_folder_is_fine(site_and_outside: tuple[Path, Path]) -> None:
    site, _ = site_and_outside
    (site / "store").mkdir()
    save(Image.new("RGB", (4, 4), (1, 2, 3)), site / "store" / "b.png")
    save(Image.new("RGB", (4, 4), (4, 5, 6)), site / "store" / "c.png")
    os.symlink(site / "store" / "b.png", site / "b.png")
    os.symlink("store/c.png", site / "c.png")  # relative link
    assert load(site).names == ("a.png", "b.png", "c.png")


def test_symlink_to_an_image_of_the_folder_is_a_duplicate(site_and_outside: tuple[Path, Path]) -> None:
    site, _ = site_and_outside
    os.symlink("a.png", site / "b.png")
    expect_left_out(site, "b.png", "same pixels as a.png")


def test_symlinked_site_folder_is_fine(site_and_outside: tuple[Path, Path], tmp_path: Path) -> None:
    site, _ = site_and_outside
    os.symlink(site, tmp_path / "alias")
    assert load(tmp_path / "alias").names == ("a.png",)


def test_symlink_loop(tmp_path: Path) -> None:
    save(Image.new("RGB", (4, 4)), tmp_path / "a.png")
    os.symlink(tmp_path / "y.png", tmp_path / "x.png")
    os.symlink(tmp_path / "x.png", tmp_path / "y.png")
    expect_left_out(tmp_path, "x.png")
    assert {p.name for p in load(tmp_path).skipped} == {"x.png", "y.png"}


def test_dangling_symlink(tmp_path: Path) -> None:
    os.symlink(tmp_path / "gone.png", tmp_path / "a.png")
    expect_left_out(tmp_path, "a.png", "cannot be read")


# ---- hostile bytes: never an exception; the file is loaded or left out by name -----------
def _valid_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


VALID_PNG = _valid_png()


def _loaded_or_left_out(folder: Path, name: str) -> None:
    """Either a well-formed image (bytes Pillow happens to accept) or the file left out by name."""
    data = load(folder)
    if data.names:
        assert data.names == (name,) and data.skipped == ()
        assert data.pixels.shape == (1, 3, 8, 8)
        assert torch.isfinite(data.pixels).all() and data.pixels.abs().max() <= 1
    else:
        assert [p.name for p in data.skipped] == [name] and data.pixels.shape == (0, 3, 8, 8)

_hypothesis = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_hypothesis
@given(blob=st.binary(min_size=0, max_size=2048))
def test_random_bytes_are_loaded_or_left_out(tmp_path: Path, blob: bytes) -> None:
    (tmp_path / "r.png").write_bytes(blob)
    _loaded_or_left_out(tmp_path, "r.png")


@_hypothesis
@given(
    cut=st.integers(min_value=0, max_value=len(VALID_PNG)),
    flips=st.lists(st.tuples(st.integers(0, len(VALID_PNG) - 1), st.integers(0, 255)), max_size=8),
)
def test_corrupted_png_is_loaded_or_left_out(tmp_path: Path, cut: int, flips: list[tuple[int, int]]) -> None:
    blob = bytearray(VALID_PNG)
    for pos, byte in flips:
        blob[pos] = byte
    (tmp_path / "m.png").write_bytes(bytes(blob[:cut]))
    _loaded_or_left_out(tmp_path, "m.png")
