"""How much of the non-private improvement a DP release keeps, on held-out private-distribution images.

DPAgg-TI (Peetathawatchai et al., arXiv 2411.14639, Sec. 5) judges its epsilon = 1 release by
how close it comes to non-private textual inversion. privadapt makes that a number per utility
measure m of :mod:`evaluation.utility`, with the base model, the DP run and a non-private run of
the same job scored on the same held-out images, prompts, noise draws and seeds::

    kept(m) = (m_DP - m_base) / (m_nonprivate - m_base)

1 means the DP release moves the measure as far as the non-private one, 0 not at all; above 1
it moved it further. The measures: held-out denoising loss and KID (lower is better) and the
share of generated images the style classifier puts in the held-out images' style (higher is
better). A measure the non-private run did not improve has no kept fraction (``None``, with the
reason), since a ratio to a non-improvement says nothing.

The loss and style fractions come with a 95 % paired-bootstrap interval over the held-out
images (one resample of image indices serves all three models). KID is a set statistic whose
unbiased estimator assumes distinct samples, so its fraction has no bootstrap interval; its
spread over subsets is reported per model instead.

    python -m evaluation.kept outputs/demo outputs/demo-nonprivate --held-out data/noto/held-out \\
        --out outputs/demo-comparison/kept.json

The result holds figures of the non-private run, which carry no guarantee: it belongs next to
the runs, never inside the DP run's folder that is published.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.data import SiteImages, load_site_images
from evaluation.features import STYLES, StyleNet, embed, kid, load_style_net, style_probabilities
from evaluation.utility import (DEFAULT_TIMESTEPS, Run, apply_adapter, generate, held_out_errors, pil_images, prompts_for,
                                read_run)

MEASURES = {"denoising_loss": "lower", "kid": "lower", "style_share": "higher"}
BOOTSTRAP = 2000


def kept_fraction(base: float, private: float, nonprivate: float, *, better: str) -> tuple[float | None, str | None]:
    """``(kept, None)``, or ``(None, why)`` when the non-private run did not improve on the base."""
    if better not in ("lower", "higher"):
        raise ValueError(f"better must be 'lower' or 'higher', got {better!r}")
    sign = -1.0 if better == "lower" else 1.0
    gain = sign * (nonprivate - base)
    if not gain > 0:
        return None, f"the non-private run did not improve on the base ({base:.4g} -> {nonprivate:.4g})"
    return sign * (private - base) / gain, None


def bootstrap_interval(per_image: dict[str, np.ndarray], better: str, *, resamples: int = BOOTSTRAP, seed: int = 0,
                       confidence: float = 0.95) -> list[float] | None:
    """Percentile interval of the kept fraction of per-image scores (keys base, dp, nonprivate)
    under a paired bootstrap; None when too few resamples have a non-private improvement."""
    rng = np.random.default_rng(seed)
    n = len(per_image["base"])
    fractions = []
    for _ in range(resamples):
        idx = rng.integers(0, n, n)
        kept, _ = kept_fraction(*(float(per_image[k][idx].mean()) for k in ("base", "dp", "nonprivate")), better=better)
        if kept is not None:
            fractions.append(kept)
    if len(fractions) < confidence * resamples:  # the denominator's sign is itself uncertain
        return None
    tail = (1 - confidence) / 2 * 100
    return [float(np.percentile(fractions, tail)), float(np.percentile(fractions, 100 - tail))]


@dataclass(frozen=True)
class HeldOut:
    """The held-out images and what the style classifier makes of them."""

    images: SiteImages
    net: StyleNet
    features: torch.Tensor  # the classifier's penultimate features of the images
    style: int  # their majority style, an index into STYLES

    @classmethod
    def load(cls, folder: Path, resolution: int) -> "HeldOut":
        images = load_site_images(folder, site="held-out", resolution=resolution)
        if len(images) < 2:
            raise ValueError(f"need at least 2 held-out images in {folder}, got {len(images)}")
        net = load_style_net()
        reference = pil_images(images)
        calls = style_probabilities(net, reference).argmax(-1).numpy()
        return cls(images, net, embed(net, reference), int(np.bincount(calls, minlength=len(STYLES)).argmax()))


def score_models(runs: dict[str, Run], held_out: HeldOut, *, seed: int, draws: int, timesteps: Sequence[int],
                 sample_steps: int | None, device: str) -> dict[str, dict]:
    """Per-image denoising loss and style calls, and the generated images' features, of the
    base model (``"base"``) and of each run's adapted model, on the held-out images: the same
    noise draws and seeds for every model."""
    from common.models import load_pipeline
    from common.settings import model_dir

    first = next(iter(runs.values()))
    steps = sample_steps or first.config.sample_steps
    scored: dict[str, dict] = {}
    for name, run in (("base", first), *runs.items()):
        pipe = load_pipeline(model_dir(run.config), device=device)
        adapted = name != "base"
        if adapted:
            apply_adapter(run, pipe)
        errors = held_out_errors(run, pipe, held_out.images, adapted=adapted, timesteps=timesteps, draws=draws,
                                 seed=seed)
        images = generate(pipe, prompts_for(run, held_out.images.captions, adapted=adapted), seed=seed, steps=steps,
                          guidance=first.config.sample_guidance)
        scored[name] = {"loss": errors.mean((1, 2)).double().numpy(), "features": embed(held_out.net, images),
                        "style": (style_probabilities(held_out.net, images).argmax(-1).numpy() == held_out.style)
                        .astype(float)}
    return scored


def kept_figures(scored: dict[str, dict], held_out: HeldOut, private: str, nonprivate: str, *,
                 seed: int = 0) -> dict[str, dict]:
    """Base, private and non-private value of each measure, and the kept fraction."""
    models = {"base": "base", "dp": private, "nonprivate": nonprivate}
    figures: dict[str, dict] = {}
    for measure, better in MEASURES.items():
        if measure == "kid":
            values, spread = {}, {}
            for role, name in models.items():
                values[role], spread[role] = kid(scored[name]["features"], held_out.features, seed=seed)
            entry: dict = {**values, "kid_std_over_subsets": spread, "interval": None}
        else:
            key = "loss" if measure == "denoising_loss" else "style"
            per_image = {role: scored[name][key] for role, name in models.items()}
            values = {role: float(v.mean()) for role, v in per_image.items()}
            entry = {**values, "interval": bootstrap_interval(per_image, better, seed=seed)}
        entry["kept"], entry["why_none"] = kept_fraction(values["base"], values["dp"], values["nonprivate"],
                                                         better=better)
        entry["better"] = better
        figures[measure] = entry
    return figures


def compare(private: Path, nonprivate: Path, held_out_dir: Path, *, seed: int = 0, draws: int = 4,
            timesteps: Sequence[int] = DEFAULT_TIMESTEPS, sample_steps: int | None = None, device: str = "cpu") -> dict:
    """Base, DP and non-private figures on ``held_out_dir`` and the kept fraction of each measure.

    Raises:
        ValueError: If the first run is not private or the second is, or they adapt different
            base models.
    """
    dp, np_run = read_run(private), read_run(nonprivate)
    if not dp.privacy.get("private"):
        raise ValueError(f"{private} is not a private run (privacy.json says private = false)")
    if np_run.privacy.get("private"):
        raise ValueError(f"{nonprivate} is a private run; the reference must be non-private (target-epsilon = inf)")
    if (dp.config.model_path, dp.config.resolution) != (np_run.config.model_path, np_run.config.resolution):
        raise ValueError(f"the runs adapt different models: {dp.config.model_path} at {dp.config.resolution} px vs "
                         f"{np_run.config.model_path} at {np_run.config.resolution} px")
    held_out = HeldOut.load(held_out_dir, dp.config.resolution)
    scored = score_models({"dp": dp, "nonprivate": np_run}, held_out, seed=seed, draws=draws, timesteps=timesteps,
                          sample_steps=sample_steps, device=device)
    return {"dp_run": str(private), "nonprivate_run": str(nonprivate), "held_out": str(held_out_dir),
            "held_out_images": len(held_out.images), "held_out_style": STYLES[held_out.style],
            "epsilon": dp.privacy["epsilon"], "delta": dp.privacy.get("delta"),
            "measures": kept_figures(scored, held_out, "dp", "nonprivate", seed=seed),
            "seed": seed, "noise_draws": draws, "timesteps": [int(t) for t in timesteps],
            "sample_steps": sample_steps or dp.config.sample_steps, "interval": "95% paired bootstrap over held-out images",
            "definition": "kept = (m_DP - m_base) / (m_nonprivate - m_base)"}


def inside_a_private_run(out: Path, runs: Sequence[Path]) -> str | None:
    """Why ``out`` must not be written, if it lies inside the folder of one of ``runs`` that is
    private: a comparison holds figures of a non-private run, which carry no guarantee and must
    not travel with a published release."""
    for run in runs:
        privacy = Path(run) / "privacy.json"
        private = not privacy.is_file() or json.loads(privacy.read_text()).get("private", True)
        if private and Path(out).resolve().is_relative_to(Path(run).resolve()):
            return (f"{out} is inside the private run's folder {run}: the comparison holds non-private figures, "
                    "which must not travel with the published release")
    return None


def measure_name(measure: str, style: str) -> str:
    return {"denoising_loss": "held-out denoising loss", "kid": "KID to held-out images",
            "style_share": f"share drawn in {style} style"}[measure]


def kept_text(entry: dict) -> str:
    """A measure's kept fraction and interval as text, or why it has none."""
    if entry["kept"] is None:
        return "n/a: " + entry["why_none"]
    text = f"{entry['kept']:.2f}"
    if entry["interval"] is not None:
        text += f" (95% CI {entry['interval'][0]:.2f} to {entry['interval'][1]:.2f})"
    return text


def table(result: dict) -> str:
    """The comparison as aligned text lines."""
    lines = [f"{'measure':<30}{'base':>9}{'DP':>9}{'non-private':>13}   kept of the non-private improvement"]
    for measure, entry in result["measures"].items():
        lines.append(f"{measure_name(measure, result['held_out_style']):<30}{entry['base']:>9.4f}{entry['dp']:>9.4f}"
                     f"{entry['nonprivate']:>13.4f}   {kept_text(entry)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dp_run", type=Path, help="the private run's output folder")
    parser.add_argument("nonprivate_run", type=Path, help="the same job's non-private run (target-epsilon = inf)")
    parser.add_argument("--held-out", type=Path, required=True, help="folder of held-out private-distribution images")
    parser.add_argument("--out", type=Path, required=True,
                        help="where to write the figures (JSON), outside the DP run's folder")
    parser.add_argument("--draws", type=int, default=4, help="noise draws per timestep for the denoising loss")
    parser.add_argument("--sample-steps", type=int, help="denoising steps for generated images (default: the run's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    out = args.out
    refusal = inside_a_private_run(out, [args.dp_run])
    if refusal:
        parser.error(f"--out {refusal}")
    result = compare(args.dp_run, args.nonprivate_run, args.held_out, seed=args.seed, draws=args.draws,
                     sample_steps=args.sample_steps, device=args.device)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    eps = result["epsilon"].get("prv")
    print(f"privadapt: base | DP (epsilon = {eps:.2f}) | non-private on {result['held_out_images']} held-out images "
          f"({out}):\n{table(result)}")


if __name__ == "__main__":
    main()
