"""Rebuild the embedded demo data (data/demo/) from the Noto emoji set.

Provenance: the npm package ``emoji-datasource-google`` (16.0.0) ships Google's Noto Color
Emoji as 64x64 PNGs (images: Apache License 2.0; package metadata: MIT). This script takes
animal emoji from it, flattens their transparency onto white (RGBA -> RGB, a documented
conversion), and splits them round-robin across the simulated sites, with one caption per
image made from the emoji's name.

Rebuild (needs the npm registry once; the result is committed, so runs never need it)::

    cd "$(mktemp -d)" && npm pack emoji-datasource-google@16.0.0 && tar xzf emoji-datasource-google-16.0.0.tgz
    python scripts/build_demo_data.py --package-dir "$PWD/package" --out data/demo
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image

SUBCATEGORIES = ("animal-mammal", "animal-bird", "animal-marine")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("data/demo"))
    parser.add_argument("--num-sites", type=int, default=4)
    parser.add_argument("--per-site", type=int, default=12)
    args = parser.parse_args()

    emoji = json.loads((args.package_dir / "emoji.json").read_text())
    chosen = sorted(
        (e for e in emoji if e["has_img_google"] and e["subcategory"] in SUBCATEGORIES),
        key=lambda e: e["sort_order"],
    )[: args.num_sites * args.per_site]
    if len(chosen) < args.num_sites * args.per_site:
        raise SystemExit(f"only {len(chosen)} animal emoji found")
    for site in range(args.num_sites):
        site_dir = args.out / f"site-{site}"
        site_dir.mkdir(parents=True, exist_ok=True)
        captions = {}
        for e in chosen[site :: args.num_sites]:
            src = args.package_dir / "img" / "google" / "64" / e["image"]
            rgba = Image.open(src).convert("RGBA")
            rgb = Image.new("RGB", rgba.size, (255, 255, 255))
            rgb.paste(rgba, mask=rgba.getchannel("A"))
            name = e["short_name"].replace("_", "-")
            rgb.save(site_dir / f"{name}.png", optimize=True)
            captions[f"{name}.png"] = "an emoji of a " + e["name"].lower().replace(" face", "")
        (site_dir / "captions.json").write_text(json.dumps(captions, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(chosen)} images to {args.out}")


if __name__ == "__main__":
    main()
