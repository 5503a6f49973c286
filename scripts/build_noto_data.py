"""Build the main job's data (data/noto/): Noto emoji split into private site folders and a held-out set.

Provenance: the npm package ``emoji-datasource-google`` (16.0.0) ships Google's Noto Color Emoji
as 64x64 PNGs (images: Apache License 2.0; package metadata: MIT). The pool is every emoji of the
six categories of *things* that the embedded base model (``assets/emoji-sd``) was pretrained on
in Twemoji's style (Smileys & Emotion, Animals & Nature, Food & Drink, Travel & Places,
Activities, Objects; no skin-tone variants), less the concepts the demo's comparison grid draws.
Each image is flattened onto white and box-filtered to 32x32 (the base model's resolution).

* ``held-out/``: every pool concept whose short name hashes into the fifth that the committed
  style classifier (``scripts/train_style_classifier.py``) never saw, in either style. These
  images train nothing, so utility (held-out denoising loss, KID, style share) is measured on
  images neither the adapter nor the feature extractor has seen.
* ``site-0`` .. ``site-<K-1>``: ``--per-site`` x K of the other concepts, spread evenly over
  them in Unicode's order (which runs category by category) and dealt round-robin: the sites'
  "private" images. Spread, not the first ones: the sites' images then cover every category, as
  the held-out ones do, so members and non-members of a membership-inference evaluation come
  from the same distribution.

Captions come from the emoji names ("an emoji of a hamster face"), one ``captions.json`` per
folder. Rebuild (needs the npm registry once; the result is committed, so runs never need it)::

    cd "$(mktemp -d)" && npm pack emoji-datasource-google@16.0.0 && tar xzf emoji-datasource-google-16.0.0.tgz
    python scripts/build_noto_data.py --package-dir "$PWD/package" --out data/noto
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from common.emoji import SKIPPED_CATEGORIES, EmojiImage, caption, list_emoji, load_rgb  # noqa: E402

THINGS_ONLY = SKIPPED_CATEGORIES + ("People & Body", "Symbols")  # as scripts/pretrain_emoji_sd.py
# the comparison grid's concepts (scripts/demo.sh's sample prompts) stay out of both sets
GRID_CONCEPTS = {"cat", "cat2", "dog", "dog2", "heart", "sunny", "sun_with_face", "car", "red_car", "deciduous_tree",
                 "evergreen_tree", "pizza", "rocket"}
RESOLUTION = 32


def classifier_held_out(key: str) -> bool:
    """The concepts the style classifier was not trained on (train_style_classifier.held_out's hash rule)."""
    return hashlib.sha256(key.encode()).digest()[0] % 5 == 0


def write_folder(images: list[EmojiImage], folder: Path) -> None:
    """``images`` as 32x32 RGB PNGs named after their concept, with their captions.json."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    captions = {}
    for im in images:
        name = im.key.replace("_", "-") + ".png"
        Image.fromarray(load_rgb(im.path, RESOLUTION)).save(folder / name, optimize=True)
        captions[name] = caption(im.names)
    (folder / "captions.json").write_text(json.dumps(captions, indent=1, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "data" / "noto")
    parser.add_argument("--num-sites", type=int, default=4)
    parser.add_argument("--per-site", type=int, default=100)
    args = parser.parse_args(argv)

    pool = [im for im in list_emoji(args.package_dir, "google", skin_tones=False, skip_categories=THINGS_ONLY)
            if im.key not in GRID_CONCEPTS]
    held_out = [im for im in pool if classifier_held_out(im.key)]
    private = [im for im in pool if not classifier_held_out(im.key)]
    wanted = args.per_site * args.num_sites
    if len(private) < wanted:
        raise SystemExit(f"--per-site {args.per_site} x --num-sites {args.num_sites} = {wanted} images wanted, "
                         f"the pool has {len(private)}")
    # spread evenly over the pool (Unicode order runs category by category), so that the sites' images,
    # like the held-out ones, cover every category: members and non-members from the same distribution
    private = [private[i * len(private) // wanted] for i in range(wanted)]
    for site in range(args.num_sites):
        write_folder(private[site::args.num_sites], args.out / f"site-{site}")
    write_folder(held_out, args.out / "held-out")
    print(f"wrote {wanted} site images ({args.num_sites} x {args.per_site}) and {len(held_out)} held-out images "
          f"to {args.out}")


if __name__ == "__main__":
    main()
