"""Rebuild the embedded demo data (data/demo/) from the Noto emoji set.

Provenance: the npm package ``emoji-datasource-google`` (16.0.0) ships Google's Noto Color
Emoji as 64x64 PNGs (images: Apache License 2.0; package metadata: MIT). This script takes the
first four emoji (in Unicode's order) of each of twelve everyday subcategories (animals, plants,
food, vehicles, weather, faces, hearts, household things), flattens their transparency onto
white (RGBA -> RGB, a documented conversion), and splits them round-robin across the simulated
sites, with one caption per image made from the emoji's name ("an emoji of a hamster face").

The concepts that the demo's comparison grid draws (cat, dog, red heart, sun, car, tree, ...)
are left out on purpose: the private set then teaches a *style* (Noto's, while the base model
was pretrained on Twemoji), and the grid shows that style carried to concepts the sites never
held.

Rebuild (needs the npm registry once; the result is committed, so runs never need it)::

    cd "$(mktemp -d)" && npm pack emoji-datasource-google@16.0.0 && tar xzf emoji-datasource-google-16.0.0.tgz
    python scripts/build_demo_data.py --package-dir "$PWD/package" --out data/demo
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from common.emoji import caption, list_emoji, load_rgb  # noqa: E402

SUBCATEGORIES = ("animal-mammal", "animal-bird", "animal-marine", "plant-flower", "plant-other", "food-fruit",
                 "food-vegetable", "transport-ground", "sky & weather", "face-smiling", "heart", "household")
# the comparison grid's concepts (scripts/demo_compare.py) stay out of the private set
HELD_OUT = {"cat", "cat2", "dog", "dog2", "heart", "sunny", "sun_with_face", "car", "red_car", "deciduous_tree",
            "evergreen_tree", "fish", "tropical_fish", "pizza", "rocket", "house", "apple", "star"}


def choose(package_dir: Path, per_subcategory: int) -> list:
    entries = {e["short_name"]: e for e in json.loads((package_dir / "emoji.json").read_text())}
    by_sub = defaultdict(list)
    for im in list_emoji(package_dir, "google", skin_tones=False):
        sub = entries[im.key]["subcategory"]
        if sub in SUBCATEGORIES and im.key not in HELD_OUT and len(by_sub[sub]) < per_subcategory:
            by_sub[sub].append(im)
    return [im for sub in SUBCATEGORIES for im in by_sub[sub]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("data/demo"))
    parser.add_argument("--num-sites", type=int, default=4)
    parser.add_argument("--per-subcategory", type=int, default=4)
    args = parser.parse_args()

    chosen = choose(args.package_dir, args.per_subcategory)
    if len(chosen) != len(SUBCATEGORIES) * args.per_subcategory:
        raise SystemExit(f"only {len(chosen)} emoji found")
    for site in range(args.num_sites):
        site_dir = args.out / f"site-{site}"
        if site_dir.exists():
            for old in site_dir.iterdir():
                old.unlink()
        site_dir.mkdir(parents=True, exist_ok=True)
        captions = {}
        for im in chosen[site :: args.num_sites]:
            name = im.key.replace("_", "-")
            Image.fromarray(load_rgb(im.path, 64)).save(site_dir / f"{name}.png", optimize=True)
            captions[f"{name}.png"] = caption(im.names)
        (site_dir / "captions.json").write_text(json.dumps(captions, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(chosen)} images to {args.out}")


if __name__ == "__main__":
    main()
