"""Which house style are a run's samples nearest to? Nearest real emoji, Twemoji or Noto.

For every sample image of each run folder (``samples/base_*.png`` and ``samples/adapted_*.png``,
server/export.py), its nearest neighbour by pixel L2 distance is looked up among ALL Twemoji and
ALL Noto emoji of the two npm packages (and their mirror images) at the sample's resolution; the
share of samples whose nearest real emoji is a Noto one is printed per row, with a 95%
Clopper-Pearson interval. The base model was pretrained on Twemoji and draws near-copies of it,
so its share is near 0; a share that grows after adaptation means the samples moved toward the
private set's house style or its concepts (a pixel neighbour cannot tell the two apart: look at
the pictures too). The style classifier (evaluation/features.py) is the other measure; on generated
32-pixel images it calls most base draws Noto (they are softer than the PNGs), so it is a poor
judge of this base's samples.

    .venv/bin/python scripts/style_nearest.py outputs/demo outputs/demo-nonprivate \\
        --twitter-dir PATH/emoji-datasource-twitter/package --google-dir PATH/emoji-datasource-google/package
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from common.emoji import list_emoji, load_pixels  # noqa: E402
from evaluation.grid import read_samples  # noqa: E402
from evaluation.metrics import clopper_pearson  # noqa: E402


def reference(twitter_dir: Path, google_dir: Path, resolution: int) -> tuple[torch.Tensor, np.ndarray]:
    """Every emoji of both sets and its mirror image, flattened, and its label (1 = Noto)."""
    sets = [load_pixels(list_emoji(twitter_dir, "twitter", skin_tones=False), resolution),
            load_pixels(list_emoji(google_dir, "google", skin_tones=False), resolution)]
    pixels = np.concatenate([np.concatenate([s, s[:, :, ::-1]]) for s in sets])
    labels = np.concatenate([np.full(2 * len(s), k) for k, s in enumerate(sets)])
    return torch.from_numpy(pixels).float().flatten(1), labels


def noto_share(images: list[Image.Image], ref: torch.Tensor, labels: np.ndarray, resolution: int) -> dict:
    x = torch.from_numpy(np.stack([np.asarray(im.resize((resolution, resolution), Image.BOX))
                                   for im in images])).float().flatten(1)
    nearest = torch.cdist(x, ref).argmin(dim=1).numpy()
    hits = int(labels[nearest].sum())
    lo, hi = clopper_pearson(hits, len(images))
    return {"samples": len(images), "nearest_is_noto": hits / len(images), "ci95": [round(lo, 3), round(hi, 3)]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", type=Path, nargs="+", help="run output folders (with samples/)")
    p.add_argument("--twitter-dir", type=Path, required=True)
    p.add_argument("--google-dir", type=Path, required=True)
    p.add_argument("--resolution", type=int, default=32)
    args = p.parse_args(argv)
    ref, labels = reference(args.twitter_dir, args.google_dir, args.resolution)
    # the base row is the same in every run (same prompts and seeds): read it from the first
    report = {"base": noto_share(read_samples(args.runs[0], "base"), ref, labels, args.resolution)}
    for run in args.runs:
        report[str(run)] = noto_share(read_samples(run, "adapted"), ref, labels, args.resolution)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
