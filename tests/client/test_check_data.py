"""Tests of client/check_data.py: the command a site runs on its data folder before it joins."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from client.check_data import check_folder, format_report, main
from common.paths import REPO_ROOT

DEMO = REPO_ROOT / "data/demo/site-0"


def picture(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (12, 12, 3), np.uint8))


@pytest.fixture
def messy(tmp_path):
    """A folder with two valid images and one problem of each kind a record can have."""
    folder = tmp_path / "site"
    folder.mkdir()
    picture(1).save(folder / "a-valid.png")
    picture(2).save(folder / "b-valid.png")
    shutil.copy(folder / "a-valid.png", folder / "c-copy.png")
    (folder / "d-text.png").write_text("not an image")
    (folder / "e-empty.png").write_bytes(b"")
    good = (folder / "a-valid.png").read_bytes()
    (folder / "f-truncated.png").write_bytes(good[: len(good) // 2])
    Image.new("F", (4, 4), 0.5).save(folder / "g-float.png", format="TIFF")
    picture(3).save(folder / "h-badcaption.png")
    (folder / "h-badcaption.txt").write_bytes(b"\xff\xfe")
    picture(4).save(folder / "i-disagrees.png")
    (folder / "i-disagrees.txt").write_text("one")
    (folder / "captions.json").write_text(json.dumps({"i-disagrees.png": "two", "gone.png": "x"}))
    return folder


EXPECTED = {  # file -> a word of its problem
    "c-copy.png": "same pixels as a-valid.png",
    "d-text.png": "not a readable image",
    "e-empty.png": "zero-byte",
    "f-truncated.png": "truncated",
    "g-float.png": "unsupported image mode",
    "h-badcaption.png": "UTF-8",
    "i-disagrees.png": "disagrees",
    "captions.json": "'gone.png'",
}


def test_every_problem_is_listed_with_its_file(messy):
    report = check_folder(messy, resolution=8)
    assert report.usable == 2 and not report.clean
    found = {p.name: p.problem for p in report.problems}
    assert set(found) == set(EXPECTED)
    for name, word in EXPECTED.items():
        assert word in found[name], (name, found[name])


def test_a_clean_folder_exits_zero_and_says_so(capsys):
    assert main([str(DEMO), "--resolution", "8", "--site-dataset-size", "12"]) == 0
    out = capsys.readouterr().out
    assert "12 usable image(s), clean" in out and "problem" not in out


def test_problems_exit_one_and_are_printed(messy, capsys):
    assert main([str(messy), "--resolution", "8"]) == 1
    out = capsys.readouterr().out
    assert all(f"problem: {name}: " in out for name in EXPECTED)
    assert "2 usable image(s), 8 problem(s)" in out


def test_more_images_than_the_declared_site_size_is_a_problem(capsys):
    report = check_folder(DEMO, resolution=8, site_dataset_size=11)
    (problem,) = report.problems
    assert "12 usable images, more than the declared site-dataset-size 11" in problem.problem
    assert check_folder(DEMO, resolution=8, site_dataset_size=12).clean


@pytest.mark.parametrize("make,word", [
    (lambda path: None, "does not exist"),
    (lambda path: path.write_text("a file"), "not a directory"),
    (lambda path: path.mkdir(), "no usable image"),
])
def test_folder_problems(tmp_path, make, word):
    folder = tmp_path / "site"
    make(folder)
    report = check_folder(folder, resolution=8)
    assert not report.clean and report.usable == 0
    assert word in format_report(report)


def test_unreadable_captions_json_is_a_folder_problem(tmp_path):
    picture(1).save(tmp_path / "a.png")
    (tmp_path / "captions.json").write_text("{not json")
    (problem,) = check_folder(tmp_path, resolution=8).problems
    assert problem.name.endswith("captions.json") and "JSON" in problem.problem


def test_bad_arguments_are_a_usage_error(tmp_path):
    with pytest.raises(SystemExit) as info:
        main([str(tmp_path), "--resolution", "0"])
    assert info.value.code == 2


def test_runs_as_a_module(messy):
    done = subprocess.run([sys.executable, "-m", "client.check_data", str(messy), "--resolution", "8"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "problem: f-truncated.png" in done.stdout
