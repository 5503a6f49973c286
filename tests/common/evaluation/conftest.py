"""Fixtures shared by the evaluation tests: the pretrained emoji base and the committed images."""

from __future__ import annotations

import pytest

from common.paths import REPO_ROOT

EMOJI_SD = REPO_ROOT / "assets" / "emoji-sd"
DEMO = REPO_ROOT / "data" / "demo"
HELDOUT = REPO_ROOT / "tests" / "data" / "twemoji-heldout"


@pytest.fixture(scope="session")
def emoji_pipe():
    """The committed pretrained 32x32 base, on the CPU in fp32 (read-only: do not attach adapters)."""
    from common.models import load_pipeline

    return load_pipeline(EMOJI_SD, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def demo_sites():
    from common.data import load_site_images

    return {i: load_site_images(DEMO / f"site-{i}", site=f"site-{i}", resolution=32) for i in range(4)}


@pytest.fixture(scope="session")
def heldout():
    from common.data import load_site_images

    return load_site_images(HELDOUT, site="heldout", resolution=32)


@pytest.fixture(scope="session")
def overfit_split(demo_sites):
    """16 members (site-0 and 4 of site-1) and 16 non-members (site-2 and 4 of site-3)."""
    from common.evaluation.fixtures import take

    return [demo_sites[0], take(demo_sites[1], 0, 4)], [demo_sites[2], take(demo_sites[3], 0, 4)]


@pytest.fixture(scope="session")
def overfit_run(tmp_path_factory, overfit_split):
    """A deliberately overfit non-private LoRA (rank 16, 200 steps of 8) on the 16 members
    (~2 min on 2 busy cores)."""
    from common.evaluation.fixtures import merge, overfit_lora_run

    return overfit_lora_run(tmp_path_factory.mktemp("overfit"), EMOJI_SD, merge(overfit_split[0], "train"),
                            resolution=32)
