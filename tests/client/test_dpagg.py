import torch

from client.dpagg import site_contribution
from client.ti import train_per_image_embeddings
from common.data import SiteImages
from common.dp import GaussianSumMechanism
from common.dp.sampling import poisson_sample, privacy_sampling, sampling_generator
from common.models import load_pipeline
from common.paths import derive_seed
from common.textual_inversion import TISettings, initializer_vector


def test_poisson_sample_rate_and_full():
    gen = torch.Generator().manual_seed(0)
    assert poisson_sample(5, 1.0, gen).tolist() == [0, 1, 2, 3, 4]
    counts = [len(poisson_sample(1000, 0.3, gen)) for _ in range(50)]
    mean = sum(counts) / len(counts)
    # Binomial(1000, 0.3): sd of the mean over 50 draws is ~2.05
    assert abs(mean - 300) < 10


def test_sampling_generator_seeded_and_secure():
    a = torch.rand(4, generator=sampling_generator(7))
    b = torch.rand(4, generator=sampling_generator(7))
    assert torch.equal(a, b)
    # seeded-insecure: a generator from the run seed and the labels, replayable by anyone who knows it
    replayed = privacy_sampling(False, 3, "sample", 0, 1)
    expected = sampling_generator(derive_seed(3, "sample", 0, 1))
    assert torch.equal(torch.rand(4, generator=replayed), torch.rand(4, generator=expected))
    # os: no generator at all; every draw reads os.urandom and none repeats
    assert privacy_sampling(True, 3, "sample", 0, 1) is None
    assert not torch.equal(poisson_sample(64, 0.5, None), poisson_sample(64, 0.5, None))


def test_os_poisson_sample_has_the_rate():
    counts = [len(poisson_sample(1000, 0.3, None)) for _ in range(50)]
    # Binomial(1000, 0.3): sd of the mean over 50 draws is ~2.05; 10 is ~4.9 sd (p ~ 1e-6)
    assert abs(sum(counts) / len(counts) - 300) < 10
    assert poisson_sample(5, 1.0, None).tolist() == [0, 1, 2, 3, 4]


def test_site_sends_sum_of_bounded_centred_embeddings(tiny_sd_path):
    pipe = load_pipeline(tiny_sd_path, device="cpu")
    settings = TISettings(steps=2, learning_rate=5e-2)
    pixels = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    images = SiteImages(names=("a.png", "b.png", "c.png"), pixels=pixels, captions=(None, "a cat", None), site="s")
    mech = GaussianSumMechanism(clip_norm=0.01, noise_multiplier=0.0)
    out = site_contribution(pipe, images, settings, mech, sample_rate=1.0, center=True,
                            sampling=torch.Generator().manual_seed(0), training=torch.Generator().manual_seed(1))
    # the same embeddings, computed directly
    embeds = train_per_image_embeddings(pipe, pixels, [None, "a cat", None], settings,
                                        generator=torch.Generator().manual_seed(1))
    expected = mech.bound_rows(embeds - initializer_vector(pipe, settings)).sum(0)
    torch.testing.assert_close(out.total, expected)
    assert out.total.dtype == torch.float64
    assert out.num_sampled == 3
    assert out.num_clipped == 3  # lr 5e-2 moves every row far beyond C = 0.01
    assert torch.linalg.vector_norm(out.total) <= 3 * 0.01 * (1 + 1e-12)
