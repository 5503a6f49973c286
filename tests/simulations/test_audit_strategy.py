"""The one-run audit driven through the production LoRA strategy (server/lora_strategy.py):
canary SITES answer its rounds with Dirac deltas; the strategy clips, sums, noises (its own
GaussianSumMechanism and NoiseSource) and updates the global adapter, which is what is scored.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common import Metadata

from common import keys
from common.dp import GaussianSumMechanism, NoiseSource, PrivacyLedger, epsilon
from common.dp.plan import FedAvgPlan
from common.dp.sampling import sampling_generator
from evaluation.audit import AuditSettings, guess_and_bound
from server.lora_strategy import DPFedAvgLoRA

KEY = "unet.canary.lora_A.weight"
CLIP = 0.1
DELTA = 1e-5


pytestmark = pytest.mark.usefixtures("task_identity")  # Message() outside a Flower run


class Grid:
    def __init__(self, nodes):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return self.nodes


def reply(delta: np.ndarray, node: int) -> Message:
    meta = Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0, reply_to_message_id="q",
                    group_id="1", created_at=0.0, ttl=60.0, message_type="train")
    return Message(content=RecordDict({keys.ARRAYS: ArrayRecord(array_dict={KEY: Array(delta.astype(np.float32))})}),
                   metadata=meta)


def audit_strategy(z: float, q: float, rounds: int, settings: AuditSettings) -> dict:
    m, dim = settings.canaries, settings.canaries + 8
    rng = np.random.default_rng(settings.seed)
    included = rng.random(m) < 0.5
    background = rng.normal(size=(settings.background, dim))
    background *= CLIP * 0.999 / np.linalg.norm(background, axis=1, keepdims=True)
    plan = FedAvgPlan(noise_multiplier=z, sample_rate=q, rounds=rounds, planned_epsilon_prv=0.0,
                      planned_epsilon_rdp=0.0)
    ledger = PrivacyLedger(delta=DELTA)
    strategy = DPFedAvgLoRA(plan=plan, mechanism=GaussianSumMechanism(clip_norm=CLIP, noise_multiplier=z),
                            noise=NoiseSource.seeded(settings.seed + 1), sampling=sampling_generator(settings.seed + 2),
                            ledger=ledger, initial={KEY: torch.zeros(dim)}, defense="none", private=True,
                            num_sites=m + settings.background)  # declared: every site that may take part
    # node ids: canaries 1..m (node i + 1 answers only if included), background m+1..
    nodes = list(range(1, m + settings.background + 1))
    for rnd in range(1, rounds + 1):
        asked = [msg.metadata.dst_node_id for msg in strategy.configure_train(rnd, ArrayRecord(), ConfigRecord(),
                                                                               Grid(nodes))]
        replies = []
        for node in asked:
            if node <= m:
                if included[node - 1]:
                    delta = np.zeros(dim)
                    delta[node - 1] = CLIP * 0.999  # the site clipped its own delta to C
                    replies.append(reply(delta, node))
            else:
                replies.append(reply(background[node - m - 1], node))
        strategy.aggregate_train(rnd, replies)
    scores = strategy.global_state[KEY][:m].double()
    return guess_and_bound(scores, torch.from_numpy(included), settings, delta=DELTA, events=ledger.events,
                           unit="site", noise=z > 0, extra={"rounds": rounds, "path": "DPFedAvgLoRA"})


SETTINGS = AuditSettings(canaries=300, guesses_in=75, guesses_out=75, background=20)


def test_strategy_audit_has_power_without_noise():
    result = audit_strategy(0.0, 1.0, 2, SETTINGS)
    assert result["correct"] == 150 and result["epsilon_lower_bound"] > 3.5


def test_strategy_audit_with_noise_stays_below_the_accountant():
    z, q, rounds = 1.0, 0.5, 2
    result = audit_strategy(z, q, rounds, SETTINGS)
    from common.dp import PrivacyEvent

    accountant = epsilon([PrivacyEvent(noise_multiplier=z, sample_rate=q, steps=rounds, unit="site")], DELTA)
    assert len(result["details"]["events"]) == rounds
    assert result["epsilon_lower_bound"] <= accountant
