"""Poisson sampling: the sampling scheme every privadapt accountant assumes.

Each record (an image, or a site) is kept independently with probability q. This matches the
add/remove-one adjacency of Opacus' RDP and PRV accountants (Mironov, Talwar, Zhang 2019;
Zhu, Dong, Wang 2022, "Optimal accounting of differential privacy via characteristic
function", Sec. 5). The draws must stay secret for the amplification to hold.

Notes:
    What each mode is for (run-config key ``privacy-randomness``, as for the noise in
    :mod:`common.dp.noise`):

    - ``"os"`` (the default, and the only private choice): the sampling source is ``None``
      and every Bernoulli draw reads ``os.urandom`` directly; no generator state or seed
      exists, so nobody can replay who or what was sampled.
    - ``"seeded-insecure"``: a ``torch.Generator`` seeded from the run seed and a label, for
      tests and replayable research. Anyone who knows the run seed (it is in
      ``run_config.json``) can replay the sample, which voids the amplification by sampling:
      such a run claims no DP.
"""

from __future__ import annotations

import torch

from common.dp.noise import urandom_uniform
from common.paths import derive_seed

# The source of Poisson draws: a seeded generator (replayable, NOT private) or None (os.urandom).
SamplingSource = torch.Generator | None


def sampling_generator(seed: int) -> torch.Generator:
    """A seeded CPU generator for Poisson sampling: replayable, so NOT private."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed) % (2**63))
    return gen


def privacy_sampling(secret: bool, seed: int, *labels: int | str) -> SamplingSource:
    """The sampling source of one privacy mechanism: ``None`` (every draw from ``os.urandom``)
    when ``secret`` (``privacy-randomness = "os"``), else a generator seeded with
    ``derive_seed(seed, *labels)`` (``"seeded-insecure"``: replayable, NOT private)."""
    return None if secret else sampling_generator(derive_seed(seed, *labels))


def uniforms(n: int, source: SamplingSource) -> torch.Tensor:
    """n uniforms on [0, 1): float64 from ``os.urandom`` when ``source`` is None, else the generator's."""
    if source is None:
        return torch.from_numpy(urandom_uniform(n))
    return torch.rand(n, generator=source)


def poisson_sample(n: int, rate: float, source: SamplingSource) -> torch.Tensor:
    """Indices of the records kept by independent Bernoulli(rate) draws (Poisson sampling)."""
    if rate >= 1.0:
        return torch.arange(n)
    return torch.nonzero(uniforms(n, source) < rate).flatten()
