"""End-to-end tests of server/secagg.py with client/secagg.py, in process.

A fake Grid delivers each message to ``handle_secagg`` of a simulated site (its own Context)
and can make a site drop out from a given stage on, or tamper with what the server sends.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto, recorddict_from_proto, recorddict_to_proto

from client.secagg import handle_secagg
from common import keys
from common.dp.noise import NoiseSource
from common.secagg import protocol as P
from common.secagg.distributed_noise import suggest_clip_range
from common.secagg.quantization import flatten_tree
from common.secagg.release import distributed_release
from server.secagg import SecureAggregationError, default_threshold, secure_sum

SHAPES = {"unet.b.lora_B.weight": (4, 2), "unet.a.lora_A.weight": (2, 5)}
NODES = [101, 102, 103, 104, 105]


def contribution(node: int, shapes=SHAPES, norm: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(node)
    tree = {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()}
    scale = norm / math.sqrt(sum(float((v * v).sum()) for v in tree.values()))
    return {k: v * scale for k, v in tree.items()}


def plain_sum(nodes, contributions) -> dict[str, torch.Tensor]:
    return {k: sum(contributions[n][k] for n in nodes) for k in contributions[nodes[0]]}


class Site:
    def __init__(self, node: int, tree: dict[str, torch.Tensor]) -> None:
        self.node, self.tree = node, tree
        self.context = Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})
        self.calls = 0
        self.setup_message: Message | None = None

    def contribute(self) -> dict[str, torch.Tensor]:
        self.calls += 1
        return self.tree


class FakeGrid:
    """Dispatches each message to its site's ``handle_secagg``; records what the server sees.

    Messages and the site's ``context.state`` go through Flower's protobuf encoding, as they
    do between SuperLink, SuperNode and a fresh ClientApp process.

    ``drop_from[node] = stage``: the node gives no answer from that stage on (it went away).
    ``tamper(stage, node, config)``: lets a test rewrite what the server sends.
    """

    def __init__(self, sites: dict[int, Site], drop_from: dict[int, str] | None = None, noise_seed: int | None = None,
                 tamper=None) -> None:
        self.sites, self.drop_from, self.tamper = sites, drop_from or {}, tamper
        self.noise_seed = noise_seed
        self.received: list[tuple[str, Message]] = []
        self.errors: list[str] = []

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            node, stage = msg.metadata.dst_node_id, str(msg.content[keys.CONFIG][P.STAGE])
            assert msg.metadata.message_type == "train"
            if node in self.drop_from and P.STAGES.index(stage) >= P.STAGES.index(self.drop_from[node]):
                continue
            msg = message_from_proto(message_to_proto(msg))
            if self.tamper is not None:
                self.tamper(stage, node, msg.content[keys.CONFIG])
            site = self.sites[node]
            site.context.state = recorddict_from_proto(recorddict_to_proto(site.context.state))
            if stage == P.SETUP:
                site.setup_message = msg
            noise = NoiseSource.seeded(self.noise_seed + node) if self.noise_seed is not None else None
            try:
                reply = handle_secagg(msg, site.context, site.contribute, noise=noise)
            except ValueError as err:  # what Flower turns into an error reply
                self.errors.append(f"{node}/{stage}: {err}")
                continue
            reply = message_from_proto(message_to_proto(reply))
            self.received.append((stage, reply))
            replies.append(reply)
        return replies


def make(nodes=NODES, shapes=SHAPES, **grid_kw):
    trees = {n: contribution(n, shapes) for n in nodes}
    return FakeGrid({n: Site(n, trees[n]) for n in nodes}, **grid_kw), trees


def run(grid, nodes=NODES, threshold=3, stage_config=None, clip_range=2.0, payload=None, shapes=SHAPES, **kw):
    return secure_sum(grid, nodes, shapes=shapes, clip_range=clip_range, threshold=threshold, round_id=4, timeout=5.0,
                      stage_config=stage_config or {}, payload=payload, **kw)


def assert_sum_close(result, expected, survivors: int):
    bound = result.spec.sum_error_bound(survivors, magnitude=10.0)
    for k in SHAPES:
        assert result.total[k].dtype == torch.float64 and tuple(result.total[k].shape) == SHAPES[k]
        assert (result.total[k] - expected[k]).abs().max().item() <= bound


@pytest.mark.parametrize("bits", [32, 64])
def test_noise_off_equals_the_plain_sum_within_quantization_error(bits):
    grid, trees = make()
    result = run(grid, modulus_bits=bits)
    assert result.survivors == NODES and result.entered == NODES and result.dropped == []
    assert_sum_close(result, plain_sum(NODES, trees), survivors=5)
    assert all(site.calls == 1 for site in grid.sites.values())  # contribution_fn called once
    assert result.noise_shares == 0 and result.achieved_noise_multiplier(1.0) == 0.0
    if bits == 32:  # a coarse grid: the error is visible and still within the stated bound
        err = max((result.total[k] - plain_sum(NODES, trees)[k]).abs().max().item() for k in SHAPES)
        assert 0 < err <= 5 / (2 * result.spec.scale)
    assert all(not site.context.state for site in grid.sites.values())  # secrets forgotten


def test_the_server_sees_only_masked_vectors():
    grid, trees = make()
    result = run(grid)
    spec = result.spec
    order = dict(sorted(SHAPES.items()))
    masked = {reply.metadata.src_node_id: reply for stage, reply in grid.received if stage == P.MASKED_INPUT}
    assert sorted(masked) == NODES
    for stage, reply in grid.received:
        arrays = [rec for rec in reply.content.values() if isinstance(rec, ArrayRecord)]
        if stage != P.MASKED_INPUT:
            assert not arrays  # keys, ciphertexts and shares only
            continue
        assert list(arrays[0]) == [P.MASKED] and len(arrays) == 1
        vector = arrays[0][P.MASKED].numpy()
        assert vector.dtype == np.uint64  # M = 2^64
        plain = flatten_tree(trees[reply.metadata.src_node_id], order)
        assert not np.array_equal(vector, spec.encode(plain))
        # read as if unmasked, a masked vector is far from the site's contribution
        assert np.abs(spec.decode_sum(vector) - plain).max() > 1.0


def test_a_site_dropping_after_keys_were_shared_is_survived():
    grid, trees = make(drop_from={103: P.MASKED_INPUT})  # received its shares, never sent a vector
    result = run(grid)
    assert result.entered == NODES and 103 in result.dropped and 103 not in result.survivors
    assert_sum_close(result, plain_sum(result.survivors, trees), survivors=4)


def test_dropouts_at_every_stage_are_survived():
    drops = {101: P.SETUP, 102: P.SHARE_KEYS, 103: P.MASKED_INPUT, 104: P.UNMASK}
    nodes = NODES + [106, 107]
    grid, trees = make(nodes=nodes, drop_from=drops)
    result = run(grid, nodes=nodes, threshold=3)
    assert result.entered == [103, 104, 105, 106, 107]  # 101 and 102 never entered masking
    assert result.survivors == [104, 105, 106, 107]  # 104 sent its vector, then missed unmask
    assert result.dropped == [101, 102, 103]
    assert result.stages[P.UNMASK] == [105, 106, 107]
    assert_sum_close(result, plain_sum(result.survivors, trees), survivors=4)


def test_too_many_dropouts_fail_with_a_clear_error():
    grid, _ = make(drop_from={102: P.MASKED_INPUT, 103: P.MASKED_INPUT, 104: P.MASKED_INPUT})
    with pytest.raises(SecureAggregationError, match=r"2 site\(s\) sent masked inputs, fewer than the threshold 3"):
        run(grid)
    grid, _ = make(nodes=[1, 2])
    with pytest.raises(SecureAggregationError, match="2 site.* fewer than the threshold 3"):
        run(grid, nodes=[1, 2], threshold=3)
    with pytest.raises(ValueError, match="threshold must be >= 2"):
        run(make()[0], threshold=1)


def test_setup_carries_the_payload_and_the_stage_config():
    grid, trees = make()
    payload = RecordDict({keys.ARRAYS: ArrayRecord(array_dict={"w": Array(np.ones(3, dtype=np.float32))}),
                          keys.CONFIG: ConfigRecord({keys.METHOD: "lora"})})
    run(grid, payload=payload, stage_config={keys.ROUND: 4, keys.DEFENSE: "none"}, setup_timeout=60.0)
    msg = grid.sites[101].setup_message
    config = msg.content[keys.CONFIG]
    assert config[keys.METHOD] == "lora" and config[keys.DEFENSE] == "none" and config[P.STAGE] == P.SETUP
    assert msg.content[keys.ARRAYS]["w"].numpy().tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="secagg-"):
        run(grid, stage_config={P.THRESHOLD: 1})
    with pytest.raises(ValueError, match="distributed-noise-split"):
        run(grid, stage_config={P.NOISE_STD: 1.0, P.NOISE_SPLIT: "some"})


def test_no_sampled_site_means_no_sum():
    result = run(FakeGrid({}), nodes=[])
    assert result.total is None and result.survivors == [] and result.entered == []
    assert default_threshold(5) == 3 and default_threshold(2) == 2


@pytest.mark.parametrize("split, shares", [("entered", 5), ("threshold", 3)])
def test_distributed_noise_with_a_dropout_reports_the_achieved_multiplier(split, shares):
    shapes = {"embedding": (20_000,)}
    grid, trees = make(shapes=shapes, drop_from={105: P.MASKED_INPUT}, noise_seed=1000)
    z, clip = 1.5, 1.0
    sigma = z * clip
    result = run(grid, shapes=shapes, clip_range=suggest_clip_range(clip, sigma, min_shares=3),
                 stage_config={P.NOISE_STD: sigma, P.NOISE_SPLIT: split})
    assert result.entered == NODES and len(result.survivors) == 4 and result.noise_shares == shares
    z_achieved = result.achieved_noise_multiplier(z)
    assert z_achieved == pytest.approx(z * math.sqrt(4 / shares))
    noise = (result.total["embedding"] - sum(trees[n]["embedding"] for n in result.survivors)).numpy()
    assert float(np.std(noise)) == pytest.approx(z_achieved * clip, rel=0.03)
    released, event = distributed_release(result, noise_multiplier=z, denominator=4.0, sample_rate=1.0, unit="site")
    assert torch.equal(released["embedding"], result.total["embedding"] / 4.0)
    assert event.noise_multiplier == z_achieved != z and event.unit == "site" and event.sampling == "none"


def _tamper_unmask(rewrite):
    def tamper(stage, node, config):
        if stage == P.UNMASK and node == 101:
            rewrite(config)
    return tamper


@pytest.mark.parametrize("rewrite, reason", [
    (lambda c: c.update({P.DROPPED: [102]}), "split the sites"),  # 102 both survivor and dropout
    (lambda c: c.update({P.SURVIVORS: [102, 103, 104, 105], P.DROPPED: [101]}), "split the sites|dropout"),
])
def test_a_site_refuses_an_unmask_request_that_would_reveal_both_secrets(rewrite, reason):
    grid, trees = make(tamper=_tamper_unmask(rewrite))
    result = run(grid)  # 101 refuses; the other four still unmask the sum
    assert any(e.startswith(f"101/{P.UNMASK}") for e in grid.errors)
    assert result.stages[P.UNMASK] == [102, 103, 104, 105]
    assert_sum_close(result, plain_sum(NODES, trees), survivors=5)


def test_sites_rebound_to_the_l2_bound_and_small_moduli_travel_as_uint32():
    grid, trees = make()
    grid.sites[101].tree = {k: 3 * v for k, v in trees[101].items()}  # norm 3: over the bound
    result = run(grid, l2_bound=1.0, modulus_bits=32)
    assert all(r.content[keys.ARRAYS][P.MASKED].numpy().dtype == np.uint32
               for stage, r in grid.received if stage == P.MASKED_INPUT)
    assert_sum_close(result, plain_sum(NODES, trees), survivors=5)  # 101 counted with norm 1
    with pytest.raises(ValueError, match="l2_bound"):
        run(grid, l2_bound=5.0, clip_range=2.0)


def test_a_site_whose_contribution_fails_never_enters():
    grid, trees = make()
    grid.sites[102].tree = {"wrong": torch.zeros(3)}
    result = run(grid)
    assert any("102/setup" in e and "keys do not match" in e for e in grid.errors)
    assert 102 not in result.entered and result.dropped == [102]
    assert_sum_close(result, plain_sum(result.survivors, trees), survivors=4)
