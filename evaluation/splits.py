"""The member / non-member images an attack is scored on, as one labelled population.

Either given explicitly (folders or loaded :class:`common.data.SiteImages`: members trained on,
non-members from the same distribution never trained on), or rebuilt from a run: an MP-LoRA /
SMP-LoRA site splits its images with :func:`client.smp.split_members` under the seed
``derive_seed(run seed, "member-split", site index)`` (fixed across rounds), so the same call
gives back D^m_aux, D^m_te, D^nm_aux, D^nm_te of every site.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from common.config import PROXY_ATTACKER_DEFENSES, RECORD_DP_DEFENSES, RunConfig
from common.data import SiteImages, load_site_images
from common.paths import derive_seed, resolve


@dataclass(frozen=True)
class Population:
    """Images with membership labels (1 member, 0 non-member), their site, and whether each
    is in the auxiliary split (D_aux: what a trained attacker such as h' may learn from)."""

    pixels: torch.Tensor
    captions: tuple[str | None, ...]
    labels: np.ndarray
    sites: tuple[str, ...]
    aux: np.ndarray

    def __len__(self) -> int:
        return len(self.captions)

    def subset(self, mask: np.ndarray) -> "Population":
        idx = np.flatnonzero(mask)
        return Population(self.pixels[torch.from_numpy(idx)], tuple(self.captions[i] for i in idx), self.labels[idx],
                          tuple(self.sites[i] for i in idx), self.aux[idx])


def load_folders(folders: Sequence[str | Path], resolution: int) -> list[SiteImages]:
    """Every image of each folder (named after the folder)."""
    if not folders:
        raise ValueError("no image folder given")
    return [load_site_images(f, site=Path(f).name, resolution=resolution) for f in folders]


def population(members: Sequence[SiteImages], non_members: Sequence[SiteImages], *, aux_fraction: float = 0.5,
               seed: int = 0) -> Population:
    """Members and non-members as one population; within each class a random
    ``aux_fraction`` (seeded) is marked auxiliary."""
    if not members or not non_members:
        raise ValueError("membership inference needs at least one member and one non-member image set")
    pixels, captions, labels, sites = [], [], [], []
    for label, sets in ((1, members), (0, non_members)):
        for images in sets:
            pixels.append(images.pixels)
            captions += images.captions
            labels += [label] * len(images)
            sites += [images.site] * len(images)
    labels_arr = np.asarray(labels)
    shapes = {tuple(p.shape[1:]) for p in pixels}
    if len(shapes) > 1:
        raise ValueError(f"members and non-members have different image shapes {sorted(shapes)}")
    rng = np.random.default_rng(seed)
    aux = np.zeros(labels_arr.size, dtype=bool)
    for label in (0, 1):
        idx = np.flatnonzero(labels_arr == label)
        aux[rng.choice(idx, int(round(idx.size * aux_fraction)), replace=False)] = True
    return Population(torch.cat(pixels), tuple(captions), labels_arr, tuple(sites), aux)


def run_config(run_dir: str | Path) -> RunConfig:
    path = Path(run_dir) / "run_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a privadapt run's output folder?")
    return RunConfig.from_run_config(json.loads(path.read_text()))


def site_folders(run_dir: str | Path, cfg: RunConfig) -> list[Path]:
    """The simulated sites' data folders ``<data-path>/site-<i>`` for i < the run's site count
    (``num_sites`` in a TI run's privacy.json, ``num_sites_declared``, the public K, in a LoRA run's)."""
    privacy_path = Path(run_dir) / "privacy.json"
    privacy = json.loads(privacy_path.read_text()) if privacy_path.is_file() else {}
    count = privacy.get("num_sites_declared") or privacy.get("num_sites")
    root = resolve(cfg.data_path)
    if not count:
        count = len(sorted(root.glob("site-*")))
    folders = [root / f"site-{i}" for i in range(int(count))]
    missing = [str(f) for f in folders if not f.is_dir()]
    if missing:
        raise FileNotFoundError(f"the run's site folders are missing: {missing}")
    return folders


def run_splits(run_dir: str | Path) -> Population:
    """The member / non-member population of an MP-LoRA, SMP-LoRA or SMP-in-DP-SGD run, rebuilt exactly as
    its sites split their data (members: D^m_aux ∪ D^m_te; aux: D^m_aux ∪ D^nm_aux)."""
    from client.smp import split_members, split_members_by_name

    cfg = run_config(run_dir)
    if cfg.adapter != "lora" or cfg.defense not in PROXY_ATTACKER_DEFENSES:
        raise ValueError(f"run {run_dir} (adapter {cfg.adapter!r}, defense {cfg.defense!r}) trained on every image of "
                         "its sites: give non-members from the same distribution explicitly")
    pixels, captions, labels, sites, aux = [], [], [], [], []
    for index, folder in enumerate(site_folders(run_dir, cfg)):
        images = load_site_images(folder, site=f"site-{index}", resolution=cfg.resolution)
        seed = derive_seed(cfg.seed, "member-split", index)
        splits = (split_members_by_name(images.names, member_fraction=cfg.member_fraction,
                                        aux_fraction=cfg.aux_fraction, seed=seed)  # smp-dp-sgd: stable per image
                  if cfg.defense in RECORD_DP_DEFENSES else
                  split_members(len(images), member_fraction=cfg.member_fraction, aux_fraction=cfg.aux_fraction,
                                seed=seed))
        for part, label, is_aux in ((splits.member_aux, 1, True), (splits.member_te, 1, False),
                                    (splits.nonmember_aux, 0, True), (splits.nonmember_te, 0, False)):
            pixels.append(images.pixels[part])
            captions += [images.captions[i] for i in part.tolist()]
            labels += [label] * part.numel()
            sites += [images.site] * part.numel()
            aux += [is_aux] * part.numel()
    return Population(torch.cat(pixels), tuple(captions), np.asarray(labels), tuple(sites), np.asarray(aux))
