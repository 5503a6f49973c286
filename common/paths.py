"""Where things are: the repository root, and relative paths resolved against it."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def resolve(path: str | Path) -> Path:
    """Absolute paths stay; relative ones are taken from the app's root folder, so runs
    behave the same whatever the working directory of the Flower process is."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else REPO_ROOT / p


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed derived deterministically from a run seed and labels (site, round)."""
    import hashlib

    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
