"""Site-level membership inference: did site j take part in the run?

The site-level analogue of the loss attack (the unit of DP-FedAvg is the site, McMahan et al.
2018): a site's score is the mean over its images of the per-image membership score, and the
sites of the population are labelled by whether their images were trained on (a site that
took part) or not. With only a handful of sites the AUC's interval is wide: the figure says
whether the attack can be trusted at all more than how strong it is.
"""

from __future__ import annotations

import numpy as np


def site_scores(image_scores: np.ndarray, labels: np.ndarray, sites: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(mean score per site, 1 if the site's images are members, site names), sorted by name.

    Raises ValueError if a site mixes members and non-members (it half took part)."""
    names = sorted(set(sites))
    sites_arr = np.asarray(sites)
    scores, site_labels = [], []
    for name in names:
        rows = sites_arr == name
        kinds = set(labels[rows].tolist())
        if len(kinds) > 1:
            raise ValueError(f"site {name!r} holds members and non-members: site-level inference needs sites that "
                             "took part whole or not at all")
        scores.append(float(image_scores[rows].mean()))
        site_labels.append(kinds.pop())
    return np.asarray(scores), np.asarray(site_labels), names
