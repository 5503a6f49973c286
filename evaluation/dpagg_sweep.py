"""How DPAgg-TI's release depends on the clip bound C, the sampling rate q and the number of images N.

DPAgg-TI (Peetathawatchai et al., arXiv 2411.14639, Alg. 1) releases

    e = e_init + (sum over Poisson-sampled images i of clip_C(e_i - e_init) + N(0, (zC)^2 I)) / (qN),

z calibrated so that one release is (epsilon, delta)-DP for one image. Its error against the
non-private release of the same N images (q = 1, no noise) has two parts: the noise, of norm
about z(q)·C·sqrt(d)/(qN), and the sampling error of the Poisson sample. Both shrink as N
grows; C trades clipping bias against noise. This sweep learns every image's embedding once,
with a site's procedure and settings (:func:`client.ti.train_per_image_embeddings`),
then forms releases for a grid of (C, q, N) with the mechanism every run uses
(:class:`common.dp.GaussianSumMechanism`) and reports their distance to the non-private release.
With ``--utility`` it also scores, on held-out images, one release per N at the chosen (C, q)
against the non-private release of the same N images (:mod:`evaluation.kept`): the kept
fraction against N.

The releases formed here are measurements, not outputs to publish: their noise is seeded
(``--seed``), so anyone with the seed can remove it.

    python -m evaluation.dpagg_sweep --data data/noto --out outputs/dpagg-sweep --utility
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from pathlib import Path

import torch

from common.config import RunConfig, parse_overrides
from common.data import load_site_images
from common.dp import GaussianSumMechanism
from common.dp.noise import NoiseSource
from common.dp.plan import DPAggPlan, plan_dpagg
from common.dp.sampling import poisson_sample, sampling_generator
from common.textual_inversion import EMBEDS_FILE, initializer_vector, save_embedding

CLIPS = (0.25, 0.5, 1.0)
RATES = (0.25, 0.5, 1.0)
TRIALS = 50


def data_sites(data: Path) -> list[Path]:
    """The ``site-<k>`` folders of ``data``, in name order."""
    folders = sorted(p for p in data.glob("site-*") if p.is_dir())
    if not folders:
        raise FileNotFoundError(f"no site-<k> folders in {data}")
    return folders


def per_image_embeddings(cfg: RunConfig, data: Path, cache: Path) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Every site image's learnt embedding ``[N, d]`` (site by site, in file order), the
    initializer's ``[d]`` and each site's count; read from ``cache`` when it was made with the
    same settings, else learnt and written there."""
    from client.ti import train_per_image_embeddings
    from common.models import load_pipeline
    from common.settings import model_dir, ti_settings

    settings = ti_settings(cfg)
    folders = data_sites(data)
    key = {"settings": repr(settings), "model": cfg.model_path, "resolution": cfg.resolution, "seed": cfg.seed,
           "files": [sorted(p.name for p in folder.iterdir()) for folder in folders]}
    if cache.is_file():
        saved = torch.load(cache)
        if saved["key"] == key:
            return saved["embeddings"], saved["initializer"], saved["counts"]
    pipe = load_pipeline(model_dir(cfg), device="cpu")
    parts, counts = [], []
    for index, folder in enumerate(folders):
        images = load_site_images(folder, site=folder.name, resolution=cfg.resolution)
        gen = torch.Generator().manual_seed(cfg.seed + index)
        parts.append(train_per_image_embeddings(pipe, images.pixels, images.captions, settings, generator=gen))
        counts.append(len(images))
        print(f"privadapt: learnt {len(images)} embeddings of {folder}", flush=True)
    embeddings, init = torch.cat(parts), initializer_vector(pipe, settings).float()
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"key": key, "embeddings": embeddings, "initializer": init, "counts": counts}, cache)
    return embeddings, init, counts


def first_images(counts: list[int], per_site: int) -> torch.Tensor:
    """Indices of the first ``per_site`` images of every site."""
    starts = [sum(counts[:k]) for k in range(len(counts))]
    return torch.cat([torch.arange(s, s + min(per_site, c)) for s, c in zip(starts, counts)])


def release(deltas: torch.Tensor, cfg: RunConfig, plan: DPAggPlan | None, *, generator: torch.Generator,
            seed: int) -> torch.Tensor:
    """One DPAgg-TI release of the centred ``deltas`` (the caller adds the initializer back)
    with the run's C and the plan's z and q, N = len(deltas); without a plan, the non-private
    release (q = 1, no noise)."""
    q = plan.sample_rate if plan else 1.0
    mechanism = GaussianSumMechanism(cfg.clip_norm, plan.noise_multiplier if plan else 0.0, cfg.bound)
    keep = poisson_sample(len(deltas), q, generator)
    total = mechanism.bound_rows(deltas[keep]).sum(0)  # an empty sample sums to the zero vector
    noised, _ = mechanism.release({"e": total}, denominator=q * len(deltas), noise=NoiseSource.seeded(seed),
                                  sample_rate=q, unit="record")
    return noised["e"]


def release_errors(deltas: torch.Tensor, cfg: RunConfig, *, trials: int, seed: int) -> dict:
    """Relative distance and cosine of ``trials`` private releases to the non-private one."""
    gen = sampling_generator(seed)
    plan = plan_dpagg(cfg)
    target = release(deltas, cfg, None, generator=gen, seed=seed)
    errors, cosines = [], []
    for t in range(trials):
        noisy = release(deltas, cfg, plan, generator=gen, seed=seed + 1 + t)
        errors.append(float(torch.linalg.vector_norm(noisy - target) / torch.linalg.vector_norm(target)))
        cosines.append(float(torch.nn.functional.cosine_similarity(noisy, target, dim=0)))
    return {"clip_norm": cfg.clip_norm, "sample_rate": cfg.sampling_rate, "dataset_size": len(deltas),
            "noise_multiplier": plan.noise_multiplier, "nonprivate_norm": float(torch.linalg.vector_norm(target)),
            "expected_noise_norm": plan.noise_multiplier * cfg.clip_norm * math.sqrt(deltas.shape[1])
            / (plan.sample_rate * len(deltas)),
            "relative_error": sum(errors) / trials, "cosine": sum(cosines) / trials, "trials": trials}


def write_release(folder: Path, cfg: RunConfig, vector: torch.Tensor, *, noised: bool, epsilon: float | None) -> Path:
    """A run-like folder holding one formed release, as :func:`evaluation.utility.read_run`
    reads it. Its privacy.json says ``private: false`` even for a noised release: the noise is
    seeded, so the epsilon it was calibrated to (``planned_epsilon``) does not hold."""
    folder.mkdir(parents=True, exist_ok=True)
    save_embedding(folder / EMBEDS_FILE, cfg.placeholder_token, vector.float())
    (folder / "run_config.json").write_text(json.dumps(cfg.to_run_config(), indent=1) + "\n")
    statement = {"private": False, "noised": noised, "planned_epsilon": epsilon,
                 "note": "formed by evaluation.dpagg_sweep from cached per-image embeddings with SEEDED noise: "
                         "a measurement, NOT private (anyone with the seed can remove the noise)"}
    (folder / "privacy.json").write_text(json.dumps(statement, indent=1) + "\n")
    return folder


def utility_curve(embeddings: torch.Tensor, init: torch.Tensor, counts: list[int], cfg: RunConfig, sizes: list[int], *,
                  held_out_dir: Path, out: Path, seed: int) -> list[dict]:
    """Kept fraction of each utility measure at each N (one private release per N)."""
    from evaluation.kept import HeldOut, kept_figures, score_models
    from evaluation.utility import read_run

    runs = {}
    for size in sizes:
        idx = first_images(counts, size // len(counts))
        deltas = embeddings[idx] - init
        sized = replace(cfg, dataset_size=len(idx))
        plan = plan_dpagg(sized)
        gen = sampling_generator(seed + size)
        for name, private in (("dp", True), ("nonprivate", False)):
            vector = init.double() + release(deltas, sized, plan if private else None, generator=gen, seed=seed + size)
            folder = write_release(out / "releases" / f"N{len(idx)}" / name, sized, vector, noised=private,
                                   epsilon=plan.planned_epsilon_prv if private else None)
            runs[f"{name}-{len(idx)}"] = read_run(folder)
    held_out = HeldOut.load(held_out_dir, cfg.resolution)
    scored = score_models(runs, held_out, seed=0, draws=4, timesteps=(100, 300, 500, 700, 900), sample_steps=None,
                          device="cpu")
    curve = []
    for key in runs:
        if key.startswith("dp-"):
            size = int(key.split("-")[1])
            curve.append({"dataset_size": size, "measures": kept_figures(scored, held_out, key, f"nonprivate-{size}")})
    return curve


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/noto"), help="folder of site-<k>/ image folders")
    parser.add_argument("--run-config", default="", help="run-config overrides (the demo's TI settings by default)")
    parser.add_argument("--out", type=Path, default=Path("outputs/dpagg-sweep"))
    parser.add_argument("--sizes", default="48,100,200,400", help="N values (split evenly over the sites)")
    parser.add_argument("--trials", type=int, default=TRIALS)
    parser.add_argument("--utility", action="store_true", help="also score one release per N on --held-out")
    parser.add_argument("--held-out", type=Path, help="held-out images (default: <data>/held-out)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cfg = RunConfig.from_run_config({"model-path": "assets/emoji-sd", "resolution": 32, "initializer-token": "flat",
                                     "ti-steps": 50, "learning-rate": 0.01, "clip-norm": 0.5, "sampling-rate": 1.0,
                                     **parse_overrides(args.run_config)})
    sizes = [int(s) for s in args.sizes.split(",")]
    embeddings, init, counts = per_image_embeddings(cfg, args.data, args.out / "embeddings.pt")
    grid = []
    for size in sizes:
        idx = first_images(counts, size // len(counts))
        for clip in CLIPS:
            for rate in RATES:
                point = replace(cfg, clip_norm=clip, sampling_rate=rate, dataset_size=len(idx))
                grid.append(release_errors(embeddings[idx] - init, point, trials=args.trials, seed=args.seed))
                g = grid[-1]
                print(f"N={g['dataset_size']:4d} C={clip:<5} q={rate:<5} z={g['noise_multiplier']:.2f} "
                      f"noise/non-private norm {g['expected_noise_norm'] / g['nonprivate_norm']:.2f}  "
                      f"relative error {g['relative_error']:.3f}  cosine {g['cosine']:.3f}", flush=True)
    result = {"epsilon": cfg.target_epsilon, "delta": cfg.target_delta, "dimension": int(embeddings.shape[1]),
              "ti": {"steps": cfg.ti_steps, "learning_rate": cfg.learning_rate}, "grid": grid}
    if args.utility:
        result["utility"] = utility_curve(embeddings, init, counts, cfg, sizes,
                                          held_out_dir=args.held_out or args.data / "held-out", out=args.out,
                                          seed=args.seed)
        for point in result["utility"]:
            kept = {m: (None if e["kept"] is None else round(e["kept"], 2)) for m, e in point["measures"].items()}
            print(f"N={point['dataset_size']}: kept {kept}", flush=True)
    (args.out / "sweep.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"privadapt: wrote {args.out / 'sweep.json'}")


if __name__ == "__main__":
    main()
