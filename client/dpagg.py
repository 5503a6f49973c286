"""A site's DPAgg-TI contribution: sample, learn per-image embeddings, bound, sum.

Peetathawatchai et al. 2024 (arXiv 2411.14639), Alg. 1, split across sites: each site
Poisson-samples its images at the public rate q, learns one embedding per sampled image,
bounds each (optionally after centring on the initializer token's embedding) to L2 norm C,
and sends ONLY the sum. The server adds the noise once over all sites' sums. Nothing else
derived from the images leaves the site.

Timing: the work of the batched run grows with the number of sampled images, which is secret
(the amplification by sampling assumes it). Where the server sees a site's reply time but
not its sum (``secure`` and ``distributed`` aggregation) the site pads the run to a public
capacity (``pad_to``, :func:`client.ti.plan_rows`), so that the time does not depend on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from client.ti import train_per_image_embeddings
from common.data import SiteImages
from common.dp import GaussianSumMechanism
from common.dp.sampling import SamplingSource, poisson_sample
from common.textual_inversion import TISettings, initializer_vector


@dataclass(frozen=True)
class SiteContribution:
    """What the site sends (``total``) and what it keeps for its own log (the rest)."""

    total: torch.Tensor  # float64 [D]: the sum of bounded embeddings, the only thing sent
    num_sampled: int
    num_clipped: int


def site_contribution(
    pipe,
    images: SiteImages,
    settings: TISettings,
    mechanism: GaussianSumMechanism,
    *,
    sample_rate: float,
    center: bool,
    sampling: SamplingSource,
    training: torch.Generator,
    pad_to: int = 0,
) -> SiteContribution:
    """Run the site's half of one DPAgg-TI release; ``pad_to`` > 0 pads the batched run to
    that public capacity (the same work whatever the number sampled; the sum is unchanged)."""
    keep = poisson_sample(len(images.names), sample_rate, sampling)
    embeds = train_per_image_embeddings(
        pipe, images.pixels[keep], [images.captions[i] for i in keep.tolist()], settings, generator=training,
        pad_to=pad_to,
    )
    if center:
        embeds = embeds - initializer_vector(pipe, settings)
    bounded = mechanism.bound_rows(embeds)
    norms = torch.linalg.vector_norm(embeds.double(), dim=1)
    return SiteContribution(
        total=bounded.sum(dim=0),
        num_sampled=len(keep),
        num_clipped=int((norms > mechanism.clip_norm).sum()),
    )
