"""Evaluate one privadapt run: utility, membership inference, the audit's result, and a report.

    python -m simulations.evaluate outputs/demo --held-out data/heldout [--reference outputs/demo-nonprivate]

Writes into ``--out`` (default ``<run>/evaluation``): ``utility.json`` and ``grid.png``
(:mod:`evaluation.utility`), ``attacks.json`` (:func:`evaluation.attacks.run_attacks`,
unless ``--no-attacks``), ``audit.json`` and ``audit_no_noise.json`` (the one-run canary audit
of the run's release mechanism with its noise on, and off as the power check:
:func:`evaluation.audit.run_audit`, unless ``--no-audit``), then ``report.md`` with its
PNG plots (:mod:`evaluation.report`). What was not run is reported as "not run", with
the reason kept in ``skipped.json``.

Held-out images: private-distribution images that trained nothing. ``--held-out`` names a
folder of images (captions as for a site); without it, ``<data-path>/held-out`` of the run is
used if it exists (the sweep's data layout).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from common.data import load_site_images
from common.paths import resolve
from evaluation.report import render_run_report
from evaluation.utility import DEFAULT_TIMESTEPS, Run, evaluate_utility, read_run
from server.export import write_json

HELD_OUT_FOLDER = "held-out"


def held_out_folder(run: Run, given: Path | None) -> Path:
    """``given``, or the run's ``<data-path>/held-out``; a clear error if neither exists."""
    folder = given if given is not None else resolve(run.config.data_path) / HELD_OUT_FOLDER
    if not folder.is_dir():
        what = "--held-out folder" if given is not None else f"run's default held-out folder ({HELD_OUT_FOLDER}/ in its data-path)"
        raise FileNotFoundError(f"{what} not found: {folder}; pass --held-out DIR with private-distribution images "
                                "that did not train the adapter")
    return folder


def attack_members(run: Run, held_out: Path) -> list[Path] | None:
    """The member folders to attack against the held-out non-members; None for an MP-/SMP-LoRA
    run, which is attacked on its sites' own member / non-member splits (the SMP-LoRA paper's
    protocol). Any other run trained on every image of the sites that took part.

    Raises:
        ValueError: If ``held_out`` is one of those sites' folders (its images are members).
    """
    from common.config import PROXY_ATTACKER_DEFENSES
    from evaluation.splits import site_folders

    cfg = run.config
    if cfg.adapter == "lora" and cfg.defense in PROXY_ATTACKER_DEFENSES:
        return None
    members = site_folders(run.path, cfg)
    overlap = [str(f) for f in members if f.resolve() == held_out.resolve()]
    if overlap:
        raise ValueError(f"--held-out {held_out} is one of the run's own site folders {overlap}: its images trained "
                         "the adapter, so they cannot serve as non-members")
    return members


def run_attacks_into(run: Run, out_dir: Path, members: list[Path] | None, held_out: Path, *, seed: int) -> dict:
    """Membership and site inference (:func:`evaluation.attacks.run_attacks`) into ``attacks.json``."""
    from evaluation.attacks import run_attacks

    if members is None:
        result = run_attacks(run.path, seed=seed, progress=True)
    else:
        result = run_attacks(run.path, members, [held_out], seed=seed, progress=True)
    write_json(out_dir / "attacks.json", result)
    return result


def audit_into(run: Run, out_dir: Path, *, seed: int) -> str | None:
    """The canary audit with the noise on (``audit.json``) and off (``audit_no_noise.json``);
    returns why it could not run, or None."""
    from evaluation.audit import AuditSettings, run_audit

    settings = AuditSettings(seed=seed)
    try:
        write_json(out_dir / "audit.json", run_audit(run.path, settings=settings, noise=True))
        write_json(out_dir / "audit_no_noise.json", run_audit(run.path, settings=settings, noise=False))
    except ValueError as err:
        return f"the audit cannot replay this run's mechanism: {err}"
    return None


def evaluate(run_dir: Path, *, held_out: Path | None = None, reference: Path | None = None, out: Path | None = None,
             attacks: bool = True, audit: bool = True, draws: int = 4,
             timesteps: tuple[int, ...] = DEFAULT_TIMESTEPS, sample_steps: int | None = None, seed: int = 0,
             device: str = "cpu") -> Path:
    """Evaluate the run in ``run_dir``; returns the report's path."""
    run = read_run(run_dir)
    ref = read_run(reference) if reference is not None else None
    out_dir = out if out is not None else run.path / "evaluation"
    out_dir.mkdir(parents=True, exist_ok=True)
    folder = held_out_folder(run, held_out)
    members = attack_members(run, folder) if attacks else None  # checked before any long computation
    images = load_site_images(folder, site=HELD_OUT_FOLDER, resolution=run.config.resolution)
    utility = evaluate_utility(run, images, out_dir, reference=ref, timesteps=timesteps, draws=draws, seed=seed,
                               sample_steps=sample_steps, device=device)
    utility["held_out_folder"] = str(folder)
    write_json(out_dir / "utility.json", utility)
    skipped: dict[str, str] = {}
    for name in ("attacks.json", "audit.json", "audit_no_noise.json"):
        (out_dir / name).unlink(missing_ok=True)  # never report a figure from an earlier evaluation
    if attacks:
        run_attacks_into(run, out_dir, members, folder, seed=seed)
    else:
        skipped["attacks"] = "skipped (--no-attacks)"
    reason = audit_into(run, out_dir, seed=seed) if audit else "skipped (--no-audit)"
    if reason:
        skipped["audit"] = reason
    write_json(out_dir / "skipped.json", skipped)
    return render_run_report(run.path, out_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Evaluate a privadapt run and write its report.")
    parser.add_argument("run", type=Path, help="the run's output folder")
    parser.add_argument("--held-out", type=Path, help="folder of held-out private images (default: <data-path>/held-out)")
    parser.add_argument("--reference", type=Path, help="a non-private TI run, for the embedding cosine")
    parser.add_argument("--out", type=Path, help="where to write (default: <run>/evaluation)")
    parser.add_argument("--no-attacks", action="store_true", help="skip membership inference")
    parser.add_argument("--no-audit", action="store_true", help="skip the canary audit")
    parser.add_argument("--draws", type=int, default=4, help="noise draws per timestep for the denoising loss")
    parser.add_argument("--timesteps", default=",".join(map(str, DEFAULT_TIMESTEPS)), help="comma-separated")
    parser.add_argument("--sample-steps", type=int, help="denoising steps for generated images (default: the run's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        timesteps = tuple(int(t) for t in args.timesteps.split(",") if t.strip())
    except ValueError:
        parser.error(f"--timesteps must be comma-separated integers, got {args.timesteps!r}")
    report = evaluate(args.run, held_out=args.held_out, reference=args.reference, out=args.out,
                      attacks=not args.no_attacks, audit=not args.no_audit, draws=args.draws, timesteps=timesteps,
                      sample_steps=args.sample_steps, seed=args.seed, device=args.device)
    print(f"privadapt: report in {report}")


if __name__ == "__main__":
    main()
