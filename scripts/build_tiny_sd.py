"""Build the embedded tiny, randomly initialised Stable Diffusion pipeline (offline).

The model is for plumbing tests only: its weights are random and it cannot draw pictures.
Without ``--out`` it goes to the default cache (``$PRIVADAPT_CACHE/tiny-sd`` or
``<repo>/.cache/tiny-sd``), where :func:`common.tiny_sd.tiny_sd_dir` finds it. Rebuilding with
the same parameters is a no-op.

    python scripts/build_tiny_sd.py [--out DIR] [--seed N] [--resolution 64]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from common.tiny_sd import build_tiny_sd, default_cache_root  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the cache)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--resolution", type=int, default=64, help="image side in pixels (multiple of 8)")
    args = parser.parse_args(argv)

    out = args.out if args.out is not None else default_cache_root() / "tiny-sd"
    path = build_tiny_sd(out, seed=args.seed, resolution=args.resolution)
    print(f"tiny SD (seed={args.seed}, {args.resolution}x{args.resolution}) at {path.resolve()}")


if __name__ == "__main__":
    main()
