import functools
import math

import pytest
import torch
from torch import nn

from client.smp import (
    ProxyAttacker,
    adaptation_and_ce,
    attack_features,
    attacker_accuracy,
    attacker_from_bytes,
    attacker_step,
    attacker_to_bytes,
    frozen,
    make_attacker_optimizer,
    member_ce,
    mp_loss,
    smp_loss,
    split_members,
)
from common.diffusion import encode_latents
from common.lora import LoRASpec, attach_lora
from common.models import load_pipeline

LAM, DELTA = 0.05, 1e-5


@pytest.fixture(scope="module")
def pipe(tiny_sd_path):
    pipe = load_pipeline(tiny_sd_path, device="cpu")
    attach_lora(pipe, LoRASpec(rank=2, alpha=2.0), seed=0)
    return pipe


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@functools.lru_cache(maxsize=None)
def batch(pipe, n: int, seed: int = 0):
    """Latents [n, 4, 8, 8] and text hidden states of n random images (cached: treat as read-only)."""
    pixels = torch.rand(n, 3, 64, 64, generator=gen(seed)) * 2 - 1
    latents = encode_latents(pipe.vae, pixels).mean
    ids = pipe.tokenizer(["an image"] * n, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = pipe.text_encoder(ids)[0]
    return latents, hidden


# ---- splits --------------------------------------------------------------------------------

def test_splits_are_disjoint_cover_and_follow_the_seed():
    s = split_members(20, seed=3)
    parts = [s.member_aux, s.member_te, s.nonmember_aux, s.nonmember_te]
    assert [len(p) for p in parts] == [5, 5, 5, 5]
    assert sorted(torch.cat(parts).tolist()) == list(range(20))
    assert torch.equal(s.members, torch.cat([s.member_aux, s.member_te]).sort().values)
    again = split_members(20, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(parts, [again.member_aux, again.member_te, again.nonmember_aux,
                                                          again.nonmember_te]))
    assert not torch.equal(split_members(20, seed=4).members, s.members)


def test_split_fractions():
    s = split_members(10, member_fraction=0.6, aux_fraction=0.5, seed=0)
    assert (len(s.member_aux), len(s.member_te), len(s.nonmember_aux), len(s.nonmember_te)) == (3, 3, 2, 2)


@pytest.mark.parametrize("n", [0, 1, 3])
def test_too_few_images_name_the_empty_split(n):
    with pytest.raises(ValueError, match=r"too few for the member/non-member splits: .*_(aux|te) would be empty"):
        split_members(n, seed=0)


def test_fractions_must_be_open_interval():
    with pytest.raises(ValueError, match="member_fraction"):
        split_members(10, member_fraction=1.0, seed=0)


# ---- losses --------------------------------------------------------------------------------

def test_losses_match_their_formulas_on_hand_numbers():
    l_ada, ce = torch.tensor(2.0, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)
    assert float(smp_loss(l_ada, ce, 0.1)) == pytest.approx(2.0 / 1.05001, rel=1e-12)
    assert float(smp_loss(l_ada, ce, 0.1, delta=0.0)) == pytest.approx(2.0 / 1.05, rel=1e-12)
    assert float(mp_loss(l_ada, ce, 0.1)) == pytest.approx(1.95, rel=1e-12)
    # lambda = 0: both are plain LoRA (up to SMP's delta)
    assert float(mp_loss(l_ada, ce, 0.0)) == 2.0
    assert float(smp_loss(l_ada, ce, 0.0)) == pytest.approx(2.0 / (1 + DELTA), rel=1e-12)


def test_member_ce_is_minus_mean_log_member_probability():
    # softmax member probabilities 3/4 and 1/4
    logits = torch.tensor([[0.0, math.log(3.0)], [math.log(3.0), 0.0]], dtype=torch.float64)
    ce = member_ce(lambda _: logits, torch.zeros(2, 1))
    assert float(ce) == pytest.approx(-(math.log(0.75) + math.log(0.25)) / 2, rel=1e-12)


def toy_problem():
    """A differentiable L_ada(θ) and G(θ) = -CE_h(member | features(θ)) with a real h."""
    torch.manual_seed(0)
    theta = torch.randn(5, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 5, dtype=torch.float64)
    h = ProxyAttacker(5).double().eval()

    def terms():
        l_ada = ((x @ theta) ** 2).mean() + 0.3
        features = x * theta  # [3, 5]
        return l_ada, member_ce(h, features)

    return theta, terms


def grad(value: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    return torch.autograd.grad(value, theta)[0]


def test_smp_gradient_is_the_rescaled_adaptation_gradient_plus_the_gain_term():
    theta, terms = toy_problem()
    l_ada, ce = terms()
    g = -ce
    got = grad(smp_loss(l_ada, ce, LAM), theta)
    l_ada, ce = terms()
    grad_l = grad(l_ada, theta)
    l_ada, ce = terms()
    grad_g = grad(-ce, theta)
    denom = 1 - LAM * g.detach() + DELTA
    expected = grad_l / denom + l_ada.detach() * LAM * grad_g / denom**2
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    # the gain term matters here: without it the two would differ
    assert not torch.allclose(got, grad_l / denom, rtol=1e-6, atol=0)


def test_smp_with_gain_held_fixed_only_rescales_the_adaptation_gradient():
    theta, terms = toy_problem()
    l_ada, ce = terms()
    got = grad(smp_loss(l_ada, ce.detach(), LAM), theta)
    l_ada, ce = terms()
    expected = grad(l_ada, theta) / (1 + LAM * ce.detach() + DELTA)
    torch.testing.assert_close(got, expected, rtol=1e-15, atol=0)


def test_mp_gradient_adds_lambda_grad_g():
    theta, terms = toy_problem()
    l_ada, ce = terms()
    got = grad(mp_loss(l_ada, ce, LAM), theta)
    l_ada, ce = terms()
    grad_l = grad(l_ada, theta)
    l_ada, ce = terms()
    torch.testing.assert_close(got, grad_l + LAM * grad(-ce, theta), rtol=1e-12, atol=0)


# ---- the attacker -------------------------------------------------------------------------

def test_attacker_architecture_follows_the_paper():
    h = ProxyAttacker(256)
    linears = [m for m in h.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(256, 512), (512, 256), (256, 2)]
    assert [m.p for m in h.modules() if isinstance(m, nn.Dropout)] == [0.5, 0.5]
    assert sum(isinstance(m, nn.ReLU) for m in h.modules()) == 2
    opt = make_attacker_optimizer(h)
    assert isinstance(opt, torch.optim.Adam)
    assert (opt.param_groups[0]["lr"], opt.param_groups[0]["weight_decay"]) == (1e-5, 1e-4)


def test_attack_features_shape_sign_and_draw(pipe):
    latents, hidden = batch(pipe, 3)
    f = attack_features(pipe.unet, pipe.scheduler, latents, hidden, gen(0), grad=False)
    assert f.shape == (3, 4 * 8 * 8) and f.dtype == torch.float32
    assert (f >= 0).all() and not f.requires_grad
    assert torch.equal(f, attack_features(pipe.unet, pipe.scheduler, latents, hidden, gen(0), grad=False))
    assert not torch.allclose(f, attack_features(pipe.unet, pipe.scheduler, latents, hidden, gen(1), grad=False))


def test_attack_features_depend_on_the_timestep(pipe, monkeypatch):
    latents, hidden = batch(pipe, 2)
    draws = []
    real_randint = torch.randint

    def fixed_timestep(low, high, size, **kwargs):
        real_randint(low, high, size, **kwargs)  # keep the generator's stream in step
        return torch.full(size, draws[-1], dtype=torch.long)

    monkeypatch.setattr(torch, "randint", fixed_timestep)
    out = []
    for t in (10, 900):
        draws.append(t)
        out.append(attack_features(pipe.unet, pipe.scheduler, latents, hidden, gen(0), grad=False))
    assert not torch.allclose(out[0], out[1])


def test_attack_features_with_grad_reach_the_adapter(pipe):
    latents, hidden = batch(pipe, 2)
    f = attack_features(pipe.unet, pipe.scheduler, latents, hidden, gen(0), grad=True)
    assert f.requires_grad


def test_fused_pass_equals_two_separate_passes_with_the_same_draws(pipe):
    latents, hidden = batch(pipe, 2)
    h = ProxyAttacker(256).eval()
    l_ada, ce = adaptation_and_ce(h, pipe.unet, pipe.scheduler, latents, hidden, gen(5))
    # replay the draws of one call of 2B (noise, then timesteps), run the halves through the UNet separately
    g = gen(5)
    noise = torch.randn((4, 4, 8, 8), generator=g)
    steps = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (4,), generator=g)

    def half(rows):
        noisy = pipe.scheduler.add_noise(latents, noise[rows], steps[rows])
        pred = pipe.unet(noisy, steps[rows], hidden).sample
        return (pred.float() - noise[rows]) ** 2

    with torch.no_grad():
        first, second = half(slice(0, 2)), half(slice(2, 4))
        torch.testing.assert_close(l_ada.detach(), first.mean(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ce.detach(), member_ce(h, second.flatten(1)), rtol=1e-5, atol=1e-6)


def test_frozen_attacker_gets_no_gradient_and_is_restored(pipe):
    latents, hidden = batch(pipe, 2)
    h = ProxyAttacker(256).train()
    with frozen(h):
        assert not h.training
        l_ada, ce = adaptation_and_ce(h, pipe.unet, pipe.scheduler, latents, hidden, gen(0))
        smp_loss(l_ada, ce, LAM).backward()
    assert h.training and all(p.requires_grad for p in h.parameters())
    assert all(p.grad is None for p in h.parameters())
    for p in pipe.unet.parameters():
        p.grad = None


def test_attacker_step_moves_h_only(pipe):
    members, m_hidden = batch(pipe, 2, seed=1)
    nonmembers, nm_hidden = batch(pipe, 2, seed=2)
    torch.manual_seed(0)
    h = ProxyAttacker(256)
    opt = make_attacker_optimizer(h, lr=1e-3)
    before_h = {k: v.clone() for k, v in h.state_dict().items()}
    before_unet = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    loss = attacker_step(h, opt, pipe.unet, pipe.scheduler, members, m_hidden, nonmembers, nm_hidden, gen(0))
    assert math.isfinite(loss) and loss > 0
    assert any(not torch.equal(before_h[k], v) for k, v in h.state_dict().items())
    assert all(torch.equal(before_unet[k], v) for k, v in pipe.unet.state_dict().items())  # LoRA included
    assert all(p.grad is None for p in pipe.unet.parameters())
    with pytest.raises(ValueError, match="balanced"):
        attacker_step(h, opt, pipe.unet, pipe.scheduler, members, m_hidden, nonmembers[:1], nm_hidden[:1], gen(0))


def test_attacker_step_is_reproducible_from_the_generator(pipe):
    members, m_hidden = batch(pipe, 2, seed=1)
    nonmembers, nm_hidden = batch(pipe, 2, seed=2)
    out = []
    for global_seed in (0, 1):  # the global RNG must not matter (dropout is seeded from the generator)
        torch.manual_seed(7)
        h = ProxyAttacker(256)
        opt = make_attacker_optimizer(h, lr=1e-3)
        torch.manual_seed(global_seed)
        attacker_step(h, opt, pipe.unet, pipe.scheduler, members, m_hidden, nonmembers, nm_hidden, gen(3))
        out.append(h.state_dict())
    assert all(torch.equal(out[0][k], out[1][k]) for k in out[0])


def test_balanced_accuracy_of_an_attacker_that_always_says_member(pipe):
    members, m_hidden = batch(pipe, 3, seed=1)
    nonmembers, nm_hidden = batch(pipe, 1, seed=2)
    h = ProxyAttacker(256)
    with torch.no_grad():
        h.net[-1].weight.zero_()
        h.net[-1].bias.copy_(torch.tensor([0.0, 1.0]))
    acc = attacker_accuracy(h, pipe.unet, pipe.scheduler, members, m_hidden, nonmembers, nm_hidden, gen(0),
                            batch_size=2)
    # TPR 1, TNR 0: balanced accuracy 1/2 (plain accuracy would be 3/4)
    assert acc == 0.5 and not h.training


def test_attacker_bytes_round_trip_weights_and_adam_state(pipe):
    members, m_hidden = batch(pipe, 2, seed=1)
    nonmembers, nm_hidden = batch(pipe, 2, seed=2)
    h = ProxyAttacker(256)
    opt = make_attacker_optimizer(h)
    for seed in range(2):
        attacker_step(h, opt, pipe.unet, pipe.scheduler, members, m_hidden, nonmembers, nm_hidden, gen(seed))
    h2, opt2 = attacker_from_bytes(attacker_to_bytes(h, opt), 256)
    assert all(torch.equal(v, h2.state_dict()[k]) for k, v in h.state_dict().items())
    state, state2 = opt.state_dict(), opt2.state_dict()
    assert state["param_groups"] == state2["param_groups"]
    assert state["state"].keys() == state2["state"].keys()
    for key, moments in state["state"].items():
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(moments[name], state2["state"][key][name])
    assert float(state2["state"][0]["step"]) == 2
    with pytest.raises(ValueError, match="reads 256 features"):
        attacker_from_bytes(attacker_to_bytes(h, opt), 1024)
    with pytest.raises(ValueError, match="cannot be read"):
        attacker_from_bytes(b"not a checkpoint", 256)

