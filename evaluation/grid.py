"""The demo's comparison grid: base, DP-adapted and non-private samples side by side.

Each run's ``samples/`` folder holds ``base_XX.png`` and ``adapted_XX.png`` for the same
prompts and seeds (server/export.py), so the base row is the same in every run. This module
stacks the base row, the adapted row of each run and, per row, the share of images the style
classifier (evaluation/features.py) calls Noto, i.e. in the private set's style::

    python -m evaluation.grid outputs/demo outputs/demo-nonprivate --out outputs/demo-comparison/comparison.png \\
        [--kept outputs/demo-comparison/kept.json]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from evaluation.features import DEFAULT_DIR, load_style_net, style_probabilities
from evaluation.kept import inside_a_private_run, kept_text, measure_name

PROMPT_PREFIX = "an emoji of a "


def read_samples(run_dir: Path, kind: str) -> list[Image.Image]:
    paths = sorted((Path(run_dir) / "samples").glob(f"{kind}_*.png"))
    if not paths:
        raise FileNotFoundError(f"no {kind}_*.png in {run_dir}/samples")
    return [Image.open(p).convert("RGB") for p in paths]


def run_label(run_dir: Path) -> str:
    """Row label from the run's privacy.json (ASCII: PIL's default font has no Greek)."""
    privacy = json.loads((Path(run_dir) / "privacy.json").read_text())
    if not privacy.get("private"):
        return "non-private TI (eps = inf)"
    eps = privacy["epsilon"]["prv"]
    return f"DPAgg-TI, eps = {eps:.2f}" if math.isfinite(eps) else "DPAgg-TI"


def run_prompts(run_dir: Path) -> list[str]:
    config = json.loads((Path(run_dir) / "run_config.json").read_text())
    return [p.strip() for p in config["sample-prompts"].split("|") if p.strip()]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def compose(rows: Sequence[tuple[str, Sequence[Image.Image]]], headers: Sequence[str], *, cell: int = 128,
            label_width: int = 230, footer: Sequence[str] = ()) -> Image.Image:
    """A labelled grid: one row per ``(label, images)``, one column per header, and ``footer``
    lines of text below."""
    font = _font(15)
    top = 28
    cols = max(len(images) for _, images in rows)
    bottom = 22 * len(footer) + (8 if footer else 0)
    sheet = Image.new("RGB", (label_width + cols * cell, top + len(rows) * cell + bottom), "white")
    draw = ImageDraw.Draw(sheet)
    for c, text in enumerate(headers[:cols]):
        draw.text((label_width + c * cell + 4, 6), text[:18], fill="black", font=font)
    for r, (label, images) in enumerate(rows):
        y = top + r * cell
        for i, line in enumerate(label.split("\n")):
            draw.text((6, y + cell // 2 - 10 + 18 * i), line, fill="black", font=font)
        for c, image in enumerate(images):
            sheet.paste(image.resize((cell, cell), Image.NEAREST), (label_width + c * cell, y))
    for i, line in enumerate(footer):
        draw.text((6, top + len(rows) * cell + 6 + 22 * i), line, fill="black", font=font)
    return sheet


def kept_lines(kept: dict) -> list[str]:
    """The footer: each measure's kept fraction (:func:`evaluation.kept.compare`'s result)."""
    lines = [f"kept of the non-private improvement, {kept['held_out_images']} held-out images:"]
    lines += [f"  {measure_name(m, kept['held_out_style'])}: {kept_text(e)}" for m, e in kept["measures"].items()]
    return lines


def comparison(run_dirs: Sequence[Path], out: Path, *, classifier_dir: Path = DEFAULT_DIR,
               kept: dict | None = None) -> dict:
    """Write the grid to ``out`` (with the kept fractions of ``kept``, :mod:`evaluation.kept`,
    below it) and the per-row Noto-style shares to ``out`` with ``.json``."""
    base = read_samples(run_dirs[0], "base")
    rows = [("base model", base)] + [(run_label(d), read_samples(d, "adapted")) for d in run_dirs]
    shares: dict[str, float] = {}
    if (Path(classifier_dir) / "model.safetensors").is_file():
        net = load_style_net(classifier_dir)
        for label, images in rows:
            shares[label] = float(style_probabilities(net, images)[:, 1].mean())
        rows = [(f"{label}\nNoto style: {shares[label]:.0%}", images) for label, images in rows]
    headers = [p.removeprefix(PROMPT_PREFIX) for p in run_prompts(run_dirs[0])]
    out.parent.mkdir(parents=True, exist_ok=True)
    compose(rows, headers, footer=kept_lines(kept) if kept else ()).save(out)
    report = {"rows": [label.split("\n")[0] for label, _ in rows], "prompts": run_prompts(run_dirs[0]),
              "mean_noto_probability": shares, "runs": [str(d) for d in run_dirs]}
    out.with_suffix(".json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders, e.g. the DP run then the non-private run")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--kept", type=Path, help="kept.json of evaluation.kept, printed below the grid")
    args = parser.parse_args(argv)
    refusal = inside_a_private_run(args.out, args.runs)
    if refusal:
        parser.error(f"--out {refusal}")
    kept = json.loads(args.kept.read_text()) if args.kept else None
    report = comparison(args.runs, args.out, kept=kept)
    print(f"privadapt: comparison grid in {args.out}: {json.dumps(report['mean_noto_probability'], ensure_ascii=False)}")


if __name__ == "__main__":
    main()
