"""Tests of client/smp_dpsgd.py: SMP-LoRA inside DP-SGD (LoRA defense ``smp-dp-sgd``)."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import RecordDict
from opacus.optimizers import DPOptimizer

import common.diffusion
from client.app import ATTACKER_KEY
from client.site_accountant import NoiseSourceDPOptimizer, load_history
from client.smp import ProxyAttacker, attacker_from_bytes, split_members_by_name
from client.smp_dpsgd import (
    ROWS_PER_MEMBER,
    MemberRowsDPOptimizer,
    attacker_features_count,
    per_member_smp_loss,
    smp_dpsgd_round,
)
from common import keys
from common.config import RunConfig
from common.data import SiteImages
from common.dp import NoiseSource
from common.dp.dpsgd import DPSGDBudget
from common.lora import lora_parameters, lora_state
from common.models import load_pipeline
from tests.client.helpers import (
    FixedDraws,
    clip_each_record,
    opacus_grad_samples,
    opacus_leftovers,
    perturbed_lora_pipe,
)
from tests.client.test_dpsgd_lora import SPEC, site_images

LAM = 0.5


@pytest.fixture(scope="module")
def pipe(tiny_sd_path):
    return perturbed_lora_pipe(tiny_sd_path, SPEC)

def config(**overrides) -> RunConfig:
    base = {"adapter": "lora", "defense": "smp-dp-sgd", "num-sites": 2, "site-dataset-size": 8, "rounds": 2,
            "local-steps": 2, "dpsgd-batch-size": 4, "lora-rank": 2, "lora-alpha": 2.0, "target-epsilon": 8.0,
            "smp-lambda": LAM}
    return RunConfig.from_run_config({**base, **overrides})


def test_config_defines_the_defense_once_and_validates_it():
    cfg = config()
    assert cfg.site_dpsgd and cfg.record_epsilon_target == 8.0
    with pytest.raises(ValueError, match="lora-text-encoder"):
        config(**{"lora-text-encoder": True})
    with pytest.raises(ValueError, match="aggregation"):
        config(aggregation="secure")


def test_the_split_by_name_moves_no_other_image_when_one_is_added_or_removed():
    names = [f"img-{i}.png" for i in range(40)]
    full = split_members_by_name(names, seed=5)
    fewer = split_members_by_name(names[:17] + names[18:], seed=5)

    def groups(splits, of):
        return {of[i]: k for k, part in enumerate((splits.member_aux, splits.member_te, splits.nonmember_aux,
                                                    splits.nonmember_te)) for i in part.tolist()}

    before, after = groups(full, names), groups(fewer, names[:17] + names[18:])
    assert len(before) == 40 and all(before[name] == k for name, k in after.items())
    assert len(set(before.values())) == 4  # every split is used at this size


def test_each_members_gradient_is_the_per_sample_gradient_of_its_own_smp_loss(pipe, monkeypatch):
    """Folding the two UNet rows of a member gives exactly the gradient of ℓ_i computed alone."""
    b = 3
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(b, 4, 8, 8, generator=gen)
    noise = torch.randn(2 * b, 4, 8, 8, generator=gen)
    timesteps = torch.tensor([10, 500, 990, 250, 700, 40])
    ids = pipe.tokenizer(["an image", "a cat", "a dog on a hill"], padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = pipe.text_encoder(ids)[0]
    with torch.random.fork_rng():
        torch.manual_seed(1)
        h = ProxyAttacker(attacker_features_count(pipe, 64)).eval().requires_grad_(False)
    params = lora_parameters(pipe, SPEC)

    loop = []
    for i in range(b):
        rows = [i, b + i]
        monkeypatch.setattr(common.diffusion, "torch", FixedDraws(noise[rows], timesteps[rows]))
        for p in params:
            p.grad = None
        per_member_smp_loss(h, pipe.unet, pipe.scheduler, latents[i:i + 1], hidden[i:i + 1], None, LAM).sum().backward()
        loop.append(torch.cat([p.grad.flatten() for p in params]))
    loop = torch.stack(loop)

    monkeypatch.setattr(common.diffusion, "torch", FixedDraws(noise, timesteps))
    rows = opacus_grad_samples(pipe, params, lambda unet: per_member_smp_loss(h, unet, pipe.scheduler, latents, hidden,
                                                                              None, LAM).mean())
    assert all(g.shape[0] == ROWS_PER_MEMBER * b for g in rows)  # Opacus sees rows, two per member
    folded = [g.reshape(ROWS_PER_MEMBER, b, *g.shape[1:]).mean(0) for g in rows]  # as MemberRowsDPOptimizer does
    per_sample = torch.stack([torch.cat([g[i].flatten() for g in folded]) for i in range(b)])
    for i in range(b):
        assert loop[i].norm() > 0
        rel = ((per_sample[i] - loop[i]).norm() / loop[i].norm()).item()
        assert rel < 1e-4, f"member {i}: relative error {rel}"
    assert opacus_leftovers(pipe) == []


def test_clipping_bounds_each_members_whole_gradient_and_each_attacker_images(pipe, monkeypatch):
    """Opacus' clipping, run on each record's gradient alone: the clipped norm is <= C (in
    float64) and the record's gradient scaled by min(1, C/||g||), for the adapter's per-member
    gradients (folded) and the attacker's per-image ones."""
    c = 1e-4  # small: every record's gradient is clipped
    lora_ids = {id(p) for p in lora_parameters(pipe, SPEC)}
    seen: dict[str, list[tuple[float, float]]] = {"adapter": [], "attacker": []}
    original = DPOptimizer.clip_and_accumulate

    def checked(self):
        which = "adapter" if {id(p) for p in self.params} == lora_ids else "attacker"
        assert which == "adapter" or isinstance(self, NoiseSourceDPOptimizer)
        seen[which].extend(clip_each_record(self, original, c, rtol=1e-4))

    monkeypatch.setattr(NoiseSourceDPOptimizer, "clip_and_accumulate", checked)  # under MemberRows' fold
    cfg = config(**{"dpsgd-max-grad-norm": c, "local-steps": 3, "dpsgd-batch-size": 8})  # q = 1: no empty batch
    smp_dpsgd_round(pipe, SPEC, site_images(8), cfg, state=RecordDict(), site_index=0, round_index=1,
                    attacker_state=None)
    for which in seen:
        assert seen[which] and all(before > c for before, _ in seen[which]), which
        # the clipped vector is float32: its float64 norm may exceed C by float32 rounding alone
        assert all(after <= c * (1 + 1e-6) for _, after in seen[which]), (which, max(a for _, a in seen[which]))
    assert opacus_leftovers(pipe) == []


def test_the_added_noise_has_std_z_c_over_the_expected_batch(pipe, monkeypatch):
    """After Opacus' pre_step, grad - clipped sum / (qD) is the noise / (qD): its spread over
    every coordinate of every step matches z*C/(qD), for the adapter and for the attacker."""
    z, c = 2.0, 0.5
    lora_ids = {id(p) for p in lora_parameters(pipe, SPEC)}
    residuals: dict[bool, list[torch.Tensor]] = {True: [], False: []}
    original = NoiseSourceDPOptimizer.pre_step

    def recorded(self, closure=None):
        out = original(self, closure)
        for p in self.params:
            residuals[id(p) in lora_ids].append((p.grad - p.summed_grad / self.expected_batch_size).flatten().double())
        return out

    monkeypatch.setattr(NoiseSourceDPOptimizer, "pre_step", recorded)
    cfg = config(**{"dpsgd-max-grad-norm": c, "local-steps": 3, "privacy-randomness": "seeded-insecure"})
    budget = DPSGDBudget(target_epsilon=1e9, delta=1e-5, total_steps=6, noise_multiplier=z)
    smp_dpsgd_round(pipe, SPEC, site_images(8), cfg, state=RecordDict(), site_index=0, round_index=1,
                    attacker_state=None, budget=budget)
    expected = z * c / 4.0  # q*D = dpsgd-batch-size = 4
    for is_adapter, parts in residuals.items():
        noise = torch.cat(parts)
        n = noise.numel()
        assert n > 1000, is_adapter
        std = float(noise.std())
        assert abs(std / expected - 1) < 5 / math.sqrt(2 * n), (is_adapter, std, expected)  # 5 sigma
        assert abs(float(noise.mean())) < 5 * expected / math.sqrt(n)


def test_rounds_train_only_the_adapter_spend_twice_the_steps_and_keep_h_on_the_site(pipe):
    state = RecordDict()
    cfg = config()
    frozen = {n: p.detach().clone() for n, p in pipe.unet.named_parameters() if "lora_" not in n}
    before = lora_state(pipe, SPEC)
    m1, h1 = smp_dpsgd_round(pipe, SPEC, site_images(8), cfg, state=state, site_index=1, round_index=1,
                             attacker_state=None)
    after = lora_state(pipe, SPEC)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(p, frozen[n]) for n, p in pipe.unet.named_parameters() if "lora_" not in n)
    # the accountant composes the attacker's and the adapter's step: 2 x local-steps per round
    assert m1[keys.SITE_STEPS] == 4 and [r.steps for r in load_history(state)] == [4]
    assert m1[keys.SITE_SAMPLE_RATE] == 0.5 and m1[keys.SITE_NOISE_MULTIPLIER] > 0
    h, _ = attacker_from_bytes(h1, attacker_features_count(pipe, 64))
    m2, h2 = smp_dpsgd_round(pipe, SPEC, site_images(8), cfg, state=state, site_index=1, round_index=2,
                             attacker_state=h1)
    h_next, _ = attacker_from_bytes(h2, attacker_features_count(pipe, 64))
    assert any(not torch.equal(a, b) for a, b in zip(h.state_dict().values(), h_next.state_dict().values()))
    assert m1[keys.SITE_EPSILON] < m2[keys.SITE_EPSILON] <= 8.0 + 1e-9
    with pytest.raises(ValueError, match="above its target"):
        smp_dpsgd_round(pipe, SPEC, site_images(8), cfg, state=state, site_index=1, round_index=3, attacker_state=h2)
    assert opacus_leftovers(pipe) == [] and not pipe.unet.training


def test_a_site_without_images_takes_noise_only_steps(pipe):
    before = lora_state(pipe, SPEC)
    empty = SiteImages(names=(), pixels=torch.zeros(0, 3, 64, 64), captions=(), site="s")
    metrics, attacker = smp_dpsgd_round(pipe, SPEC, empty, config(), state=RecordDict(), site_index=1, round_index=1,
                                        attacker_state=None)
    assert any(not torch.equal(before[k], v) for k, v in lora_state(pipe, SPEC).items())
    assert metrics[keys.SITE_STEPS] == 4 and math.isnan(metrics[keys.DIAG_ATTACKER_ACCURACY]) and attacker


def test_the_reply_holds_the_adapter_delta_only_and_h_stays_in_the_sites_state(tmp_path, tiny_sd_path,
                                                                                 task_identity):
    """Through the real ClientApp handler and server code: every reply holds the adapter's
    delta and the public spend, nothing else; h's bytes are in each site's context.state."""
    from tests.privacy.test_reply_contents import allowed_fields, reply_fields, run_and_collect

    grid, result = run_and_collect(tmp_path, tiny_sd_path, "lora-smp-dp-sgd", opt_in=False)
    sent = set(grid.sent_to_sites[0].content[keys.ARRAYS].keys())
    for reply in grid.replies:
        assert reply_fields(reply) == allowed_fields("lora-smp-dp-sgd", grid, ())
        assert set(reply.content[keys.ARRAYS].keys()) == sent  # the adapter's layout, as the server sent it
    for context in grid.contexts.values():
        saved = bytes(context.state[ATTACKER_KEY]["state"])
        h, _ = attacker_from_bytes(saved, attacker_features_count(load_pipeline(str(tiny_sd_path), device="cpu"), 64))
        sizes = {v.numel() for v in h.state_dict().values()}
        for reply in grid.replies:  # no array of the reply has the size of one of h's tensors
            assert not sizes & {int(a.numpy().size) for a in reply.content[keys.ARRAYS].values()}
    privacy = result["privacy"]
    assert privacy["unit"] == "site and record" and "non-members" in privacy["record_covers"]
    assert "SMP-LoRA (inside DP-SGD)" in privacy["statement"] and "non-members" in privacy["statement"]


def test_member_rows_optimizer_folds_rows_before_opacus_clips():
    """A toy check of the fold alone: rows (i, B+i) become member i's mean, then clip."""
    p = torch.nn.Parameter(torch.zeros(2))
    opt = MemberRowsDPOptimizer(torch.optim.SGD([p], lr=1.0), rows_per_member=2, noise=NoiseSource.seeded(0),
                                noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=1.0)
    p.grad_sample = torch.tensor([[6.0, 0.0], [0.0, 0.2], [0.0, 0.0], [0.0, 0.2]], dtype=torch.float32)
    p.grad = torch.zeros(2)
    opt.step()
    # member 0: (3, 0) clipped to (1, 0); member 1: (0, 0.2) kept; sum (1, 0.2), lr 1
    torch.testing.assert_close(p.detach(), torch.tensor([-1.0, -0.2]), rtol=1e-5, atol=1e-6)
