"""Sweep epsilon for each method, evaluate every run, and draw the privacy-utility curves.

    python -m simulations.sweep --out outputs/sweep                       # the full grid (hours on a CPU)
    python -m simulations.sweep --out outputs/sweep-small --methods dpagg-ti,lora \\
        --epsilons 1,inf --run-config "ti-steps=20 rounds=1 local-steps=5" --draws 1 --sample-steps 5

Each (method, epsilon) pair is one real Flower simulation (:func:`simulations.run.simulate`)
on the embedded pretrained base ``assets/emoji-sd`` by default, followed by
``simulations.evaluate`` (utility, attacks unless ``--no-attacks``, report). The sites' data is
split once: the last ``--held-out-per-site`` images of every site of ``--data`` go to a common
``held-out/`` folder that trains nothing and serves the utility figures (and the non-members of
the attacks); the rest are the sites' private training images. ``--held-out DIR`` gives that
folder instead (``data/noto/held-out``: 216 images), and the sites train on all of theirs.
Within a method, the non-private run (epsilon = inf) is run first and is the reference of the
TI embedding cosine. ``--resume`` keeps finished runs.
Writes ``sweep.json`` and ``sweep_report.md`` (:mod:`evaluation.sweep_report`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from common.config import parse_overrides
from common.data import CAPTIONS_FILE, image_files
from common.paths import resolve
from evaluation.sweep_report import SWEEP_FILE, render_sweep_report
from server.export import write_json
from simulations.evaluate import HELD_OUT_FOLDER, evaluate
from simulations.run import simulate

log = logging.getLogger("privadapt.sweep")

METHODS: dict[str, dict[str, object]] = {
    "dpagg-ti": {"adapter": "ti", "ti-method": "dpagg"},
    "dp-sgd-ti": {"adapter": "ti", "ti-method": "dp-sgd"},
    "smp-lora": {"adapter": "lora", "defense": "smp-lora"},
    "mp-lora": {"adapter": "lora", "defense": "mp-lora"},
    "lora": {"adapter": "lora", "defense": "none"},
    "dp-sgd-lora": {"adapter": "lora", "defense": "dp-sgd"},
    "ffa-dp-sgd-lora": {"adapter": "lora", "defense": "dp-sgd", "lora-variant": "ffa"},
    "smp-dp-sgd-lora": {"adapter": "lora", "defense": "smp-dp-sgd"},
}
# record-level DP-SGD variants: without privacy they are the plain method (lora, FFA-LoRA, SMP-LoRA), so
# the sweep runs them at finite epsilons only
PRIVATE_ONLY = ("dp-sgd-lora", "ffa-dp-sgd-lora", "smp-dp-sgd-lora")
DEFAULT_METHODS = ("dpagg-ti", "smp-lora", "mp-lora", "lora", "dp-sgd-lora")
DEFAULT_EPSILONS = (0.5, 1.0, 2.0, 4.0, 8.0, math.inf)
BASE = {"model-path": "assets/emoji-sd", "resolution": 32}


def parse_epsilons(text: str) -> list[float]:
    values = []
    for item in text.split(","):
        try:
            eps = float(item)
        except ValueError:
            raise ValueError(f"--epsilons: {item!r} is not a number (use e.g. 0.5,1,inf)") from None
        if not eps > 0:
            raise ValueError(f"--epsilons: {item!r} must be > 0")
        values.append(eps)
    return values


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"--methods: unknown {unknown or 'empty list'}; choose from {sorted(METHODS)}")
    return methods


def copy_folder(source: Path, dest: Path, names: Sequence[str], captions: dict, *, prefix: str = "") -> dict[str, str]:
    """Copy the images ``names`` of ``source`` into ``dest`` (renamed ``prefix + name``);
    returns their captions under the new names."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copyfile(source / name, dest / f"{prefix}{name}")
    return {f"{prefix}{n}": captions[n] for n in names if n in captions}


def read_captions(folder: Path) -> dict:
    return json.loads((folder / CAPTIONS_FILE).read_text()) if (folder / CAPTIONS_FILE).is_file() else {}


def split_sites(source: Path, dest: Path, *, num_sites: int, held_out_per_site: int, held_out: Path | None = None) -> int:
    """Copy ``site-0..num_sites-1`` of ``source`` into ``dest`` and make ``dest/held-out``: the
    images of ``held_out`` when given (the sites are then copied whole), else the last
    ``held_out_per_site`` images of each site (file-name order); returns the training image count."""
    if held_out is None and held_out_per_site < 1:
        raise ValueError("--held-out-per-site must be >= 1: utility needs images that trained nothing")
    held = dest / HELD_OUT_FOLDER
    if dest.exists():
        shutil.rmtree(dest)
    held.mkdir(parents=True)
    held_captions: dict[str, str] = {}
    total = 0
    for k in range(num_sites):
        site = source / f"site-{k}"
        if not site.is_dir():
            raise FileNotFoundError(f"--data {source} has no site-{k} folder (num-sites {num_sites})")
        names, captions = image_files(site, site.name), read_captions(site)
        cut = len(names) if held_out is not None else len(names) - held_out_per_site
        if cut < 1:
            raise ValueError(f"{site} has {len(names)} images: too few to hold out {held_out_per_site}")
        kept = copy_folder(site, dest / site.name, names[:cut], captions)
        (dest / site.name / CAPTIONS_FILE).write_text(json.dumps(kept, indent=1))
        held_captions.update(copy_folder(site, held, names[cut:], captions, prefix=f"{site.name}-"))
        total += cut
    if held_out is not None:
        if not held_out.is_dir():
            raise FileNotFoundError(f"--held-out {held_out} is not a folder")
        held_captions.update(copy_folder(held_out, held, image_files(held_out, HELD_OUT_FOLDER), read_captions(held_out)))
    (held / CAPTIONS_FILE).write_text(json.dumps(held_captions, indent=1))
    return total


def site_sizes(data_dir: Path, num_sites: int) -> list[int]:
    """The number of training images of each of ``site-0..num_sites-1`` in ``data_dir``."""
    return [len(image_files(data_dir / f"site-{k}", f"site-{k}")) for k in range(num_sites)]


def eps_name(eps: float) -> str:
    return "inf" if math.isinf(eps) else f"{eps:g}"


def plan(methods: Sequence[str], epsilons: Sequence[float]) -> list[tuple[str, float]]:
    """Every (method, epsilon), the non-private run of each method first (the TI reference);
    the :data:`PRIVATE_ONLY` methods at finite epsilons only."""
    ordered = sorted(set(epsilons), key=lambda e: (not math.isinf(e), e))
    return [(m, e) for m in methods for e in ordered if not (math.isinf(e) and m in PRIVATE_ONLY)]


def sweep(out: Path, *, methods: Sequence[str] = DEFAULT_METHODS, epsilons: Sequence[float] = DEFAULT_EPSILONS,
          num_sites: int = 4, data: Path = Path("data/demo"), held_out_per_site: int = 3, held_out: Path | None = None,
          overrides: dict | None = None, attacks: bool = True, draws: int = 4, sample_steps: int | None = None,
          resume: bool = False, progress: bool = True) -> Path:
    """Run and evaluate the grid; returns the sweep report's path."""
    out, data = out.resolve(), resolve(data)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = out / "data"
    if not (resume and (data_dir / HELD_OUT_FOLDER).is_dir()):
        split_sites(data, data_dir, num_sites=num_sites, held_out_per_site=held_out_per_site,
                    held_out=resolve(held_out) if held_out is not None else None)
    sizes = site_sizes(data_dir, num_sites)
    # the experimenter, as operator, declares the public sizes of the split it made: N for
    # DPAgg-TI's denominator, the largest site for DP-SGD's q (num-sites K: simulate declares it)
    # the sweep measures the privacy-utility curve, including its points that carry no signal (site-level
    # DP over a few sites): their runs are not refused; each privacy.json's signal_to_noise says how far off they are
    common = {**BASE, "data-path": str(data_dir), "dataset-size": sum(sizes), "site-dataset-size": max(sizes),
              "max-noise-to-signal": "inf", **(overrides or {})}
    entries: list[dict] = []
    references: dict[str, Path] = {}
    bar = tqdm(plan(methods, epsilons), desc="sweep", unit="run", disable=not progress)
    for method, eps in bar:
        bar.set_postfix_str(f"{method} eps={eps_name(eps)}")
        run_dir = out / "runs" / f"{method}-eps-{eps_name(eps)}"
        if not (resume and (run_dir / "privacy.json").is_file()):
            simulate(num_sites, {**common, **METHODS[method], "target-epsilon": "inf" if math.isinf(eps) else eps,
                                 "output-dir": str(run_dir)})
        if math.isinf(eps):
            references[method] = run_dir
        ref = references.get(method) if METHODS[method]["adapter"] == "ti" and not math.isinf(eps) else None
        eval_dir = run_dir / "evaluation"
        evaluate(run_dir, held_out=data_dir / HELD_OUT_FOLDER, reference=ref, out=eval_dir, attacks=attacks,
                 draws=draws, sample_steps=sample_steps)
        entries.append({"method": method, "target_epsilon": "inf" if math.isinf(eps) else eps, "run": str(run_dir),
                        "evaluation": str(eval_dir)})
        write_json(out / SWEEP_FILE, {"runs": entries, "num_sites": num_sites, "overrides": common})
    return render_sweep_report(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="privadapt privacy-utility sweep (epsilon x method).")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated, from {sorted(METHODS)}")
    parser.add_argument("--epsilons", default="0.5,1,2,4,8,inf")
    parser.add_argument("--num-sites", type=int, default=4)
    parser.add_argument("--data", type=Path, default=Path("data/demo"), help="folder with site-<k>/ image folders")
    parser.add_argument("--held-out-per-site", type=int, default=3)
    parser.add_argument("--held-out", type=Path, help="a folder of held-out images (e.g. data/noto/held-out): the "
                        "sites are then used whole and --held-out-per-site is ignored")
    parser.add_argument("--run-config", default="", help='extra run-config overrides, e.g. "ti-steps=50 rounds=2"')
    parser.add_argument("--no-attacks", action="store_true")
    parser.add_argument("--draws", type=int, default=4)
    parser.add_argument("--sample-steps", type=int)
    parser.add_argument("--resume", action="store_true", help="keep runs that already finished")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        methods, epsilons = parse_methods(args.methods), parse_epsilons(args.epsilons)
    except ValueError as err:
        parser.error(str(err))
    report = sweep(args.out, methods=methods, epsilons=epsilons, num_sites=args.num_sites, data=args.data,
                   held_out_per_site=args.held_out_per_site, held_out=args.held_out, overrides=parse_overrides(args.run_config),
                   attacks=not args.no_attacks, draws=args.draws, sample_steps=args.sample_steps, resume=args.resume)
    print(f"privadapt: sweep report in {report}")


if __name__ == "__main__":
    main()
