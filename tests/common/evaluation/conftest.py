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
