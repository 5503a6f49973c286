"""Red team, issue 21 finding 3: one bad record must cost one record, and say nothing.

The attack: a site holds, among valid images named like private data, a truncated PNG, a
text file named ``.png`` and a copy of one of its images. Before the fix the site's loader
raised, the whole site left the release (a change of up to n_site * C from one record), and
privacy.json published the error: Ray's traceback, with colour codes, the absolute path and
the private file name. Now:

(a) the site's DPAgg-TI contribution equals the one computed from its valid images alone,
    with the same generators (the bad records are exactly absent);
(b) in a real Flower simulation the site still contributes, a site whose data folder is
    missing is reported with a generic reason only, and no file of the output folder holds a
    private file name, a site's folder path, a traceback or an ANSI colour code.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from client.dpagg import site_contribution
from common.config import RunConfig
from common.data import load_site_images
from common.dp import GaussianSumMechanism
from common.dp.sampling import sampling_generator
from common.models import load_pipeline
from common.paths import REPO_ROOT
from common.settings import ti_settings
from tests.simulation_process import simulate

DEMO = REPO_ROOT / "data/demo"
PRIVATE_MARK = "patient-"  # every file of the attacked site is named like private data
CORRUPT = "patient-0099-scan.png"  # a truncated PNG
TEXT = "patient-0100-notes.png"  # a text file with an image's name
COPY = "patient-0101-scan.png"  # the same pixels as patient-0042-scan.png
# an ANSI escape sequence, raw or as JSON / Python write it escaped (privacy.json held "\u001b[36m")
ANSI = re.compile(rb"(\x1b|\\u001b|\\x1b)\[", re.IGNORECASE)
PUBLISHED = ("privacy.json", "ledger.json", "run_config.json", "metrics.json", "README.md")


def valid_site(folder: Path, count: int = 5) -> list[str]:
    """``count`` demo images of site 1 under private-looking names (patient-0042-scan.png ...)."""
    folder.mkdir(parents=True)
    sources = sorted((DEMO / "site-1").glob("*.png"))[:count]
    names = [f"patient-{42 + i:04d}-scan.png" for i in range(count)]
    for source, name in zip(sources, names):
        shutil.copy(source, folder / name)
    return names


def attacked_site(folder: Path) -> list[str]:
    """The valid images plus a truncated PNG, a text file named .png and a copy."""
    names = valid_site(folder)
    whole = (folder / names[0]).read_bytes()
    (folder / CORRUPT).write_bytes(whole[: len(whole) // 2])
    (folder / TEXT).write_text("clinical notes of patient 0100, not an image\n")
    shutil.copy(folder / names[0], folder / COPY)
    return names


def test_a_site_with_bad_records_contributes_exactly_its_valid_images(tmp_path, tiny_sd_path):
    names = attacked_site(tmp_path / "attacked")
    valid_site(tmp_path / "valid")
    pipe = load_pipeline(tiny_sd_path, device="cpu")
    cfg = RunConfig.from_run_config({"ti-steps": 2})
    mechanism = GaussianSumMechanism(clip_norm=cfg.clip_norm, noise_multiplier=0.0)

    def contribution(folder: Path):
        images = load_site_images(folder, site="site-1", resolution=64)
        return images, site_contribution(pipe, images, ti_settings(cfg), mechanism, sample_rate=0.6, center=True,
                                         sampling=sampling_generator(11), training=torch.Generator().manual_seed(5))

    attacked, got = contribution(tmp_path / "attacked")
    valid, want = contribution(tmp_path / "valid")
    assert attacked.names == valid.names == tuple(names)
    assert torch.equal(attacked.pixels, valid.pixels) and attacked.captions == valid.captions
    assert {p.name for p in attacked.skipped} == {CORRUPT, TEXT, COPY}
    assert got.num_sampled == want.num_sampled >= 1 and got.total.abs().sum() > 0
    assert torch.equal(got.total, want.total)  # bit for bit: the bad records are absent


def leaks(out: Path, secrets: list[str]) -> list[str]:
    """Every (file, what) of the output folder that holds one of ``secrets``, a traceback,
    or (in a text file) an ANSI escape sequence."""
    found = []
    files = sorted(p for p in out.rglob("*") if p.is_file())
    for path in files:
        data = path.read_bytes()
        for secret in (*secrets, "Traceback"):
            if secret.encode() in data:
                found.append(f"{path.relative_to(out)}: {secret!r}")
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue  # binary (images, weights): an escape byte pair there is chance, not a log
        if ANSI.search(data):
            found.append(f"{path.relative_to(out)}: ANSI colour codes")
    return found


def test_a_simulation_keeps_bad_records_and_refusals_off_every_output(tmp_path, tiny_sd_path):
    data = tmp_path / "data"
    shutil.copytree(DEMO / "site-0", data / "site-0")
    attacked_site(data / "site-1")
    # site-2 has no data folder at all: it refuses the round
    out = tmp_path / "out"
    overrides = {"ti-steps": 2, "sample-steps": 2, "sample-prompts": "an emoji of a cat", "dataset-size": 24,
                 "model-path": str(tiny_sd_path), "data-path": str(data), "output-dir": str(out)}
    simulate(3, overrides)

    for name in PUBLISHED:
        assert (out / name).is_file(), name
    site_paths = [str(data / f"site-{i}") for i in range(3)]
    found = leaks(out, [PRIVATE_MARK, CORRUPT, TEXT, COPY, *site_paths])
    assert found == [], "published outputs leak site data or errors:\n" + "\n".join(found)

    # the run's wall time grows with the sites' secret sample counts: it stays in the server's log
    assert not [k for k in json.loads((out / "metrics.json").read_text()) if "second" in k or "time" in k]
    privacy = json.loads((out / "privacy.json").read_text())
    # the attacked site still contributes; the site without data is left out
    assert privacy["num_sites"] == 2 and privacy["sites_per_release"] == [2]
    assert [r["reason"] for r in privacy["rejected_replies"]] == ["site returned an error"]
    assert privacy["private"] and privacy["num_releases"] == 1
