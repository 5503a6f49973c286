"""DPAgg-TI on Flower's Message API: one round = one private release of the embedding.

Each round every connected site returns the sum of its bounded per-image embeddings. The
strategy checks every reply, adds the valid ones, and hands the total to the shared
:class:`~common.dp.GaussianSumMechanism`, which adds N(0, (zC)^2 I) once and divides by the
public expected count q*N. The release's privacy event goes into the ledger, which is saved
after every release. A site whose reply is missing or invalid is left out of the sum; the
noise and the denominator stay those of the plan, so the guarantee for every record is
unchanged (a missing site only removes signal).

Whether a release happens depends on who answered, so an attempt that releases nothing is
charged like a release: with central noise when no valid sum (or fewer than ``min-sites``)
arrived; with secure aggregation when the secure sum cannot form (fewer than 2 sites, fewer
than the threshold answering) or fewer than ``min-sites`` survived it.
"""

from __future__ import annotations

import logging
from array import array
from pathlib import Path
from typing import Iterable

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from common import keys
from common.dp import GaussianSumMechanism, NoiseSource, PrivacyEvent, PrivacyLedger
from common.dp.flatsum import FlatRecord
from common.dp.plan import DPAggPlan
from common.reasons import NO_SECURE_SUM, REPLY_UNASKED, SECAGG_DROPPED, public_rejections
from server.aggregation import release_secure, secure_round
from server.blocks import BlockedSum
from server.replies import ReplyError, read_vector_view
from server.sites import NODE_ARRAY, Instructions, NodeSet
from server.strategy_base import LedgerStrategy, RunControl

log = logging.getLogger("privadapt.server")


class DPAggTIStrategy(LedgerStrategy):
    """Central-noise DPAgg-TI aggregation (trusted server: it sees each site's sum)."""

    def __init__(
        self,
        *,
        plan: DPAggPlan,
        mechanism: GaussianSumMechanism,
        noise: NoiseSource,
        ledger: PrivacyLedger,
        dim: int,
        ledger_path: Path | None = None,
        aggregation: str = "central",
        max_site_norm: float = 0.0,
        timeout: float = 3600.0,
        control: RunControl | None = None,
    ) -> None:
        if mechanism.noise_multiplier != plan.noise_multiplier:
            raise ValueError("the mechanism's noise multiplier must be the plan's")
        super().__init__(ledger=ledger, ledger_path=ledger_path, control=control)
        self.plan = plan
        self.mechanism = mechanism
        self.noise = noise
        self.dim = dim
        self.aggregation = aggregation
        self.max_site_norm = max_site_norm  # public bound on one site's sum: (declared N) * C
        self.timeout = timeout
        self.achieved_noise_multipliers: list[float] = []
        self.releases: list[torch.Tensor] = []
        self.contributors: list[array] = []  # per release: the nodes whose sums entered it (8 B each)
        self.rejected: list[dict] = []  # {"release", "node", "reason"}: reasons from common.reasons only
        self.asked: NodeSet | None = None  # nodes sent this release's message (None: not sent by configure_train)

    def summary(self) -> None:
        log.info("DPAgg-TI: z=%.4f, q=%.4f, C=%g, denominator q*N=%g, %d release(s)", self.plan.noise_multiplier,
                 self.plan.sample_rate, self.mechanism.clip_norm, self.plan.denominator, self.plan.releases)

    def next_event(self, server_round: int) -> PrivacyEvent | None:
        if self.plan.noise_multiplier == 0:
            return None  # non-private run
        return self.plan.charged_event(label=f"dpagg-ti release {server_round}")

    def charged_though_lost(self, lost: list[PrivacyEvent]) -> list[PrivacyEvent]:
        """With distributed noise the server saw the lost (noised) release: it stays charged."""
        return lost if self.aggregation == "distributed" else []

    def state_dict(self) -> dict:
        return {"releases": [r.clone() for r in self.releases], "contributors": [list(c) for c in self.contributors],
                "rejected": [dict(r) for r in self.rejected],
                "achieved_noise_multipliers": list(self.achieved_noise_multipliers), "noise": self.noise.get_state()}

    def load_state_dict(self, state: dict) -> None:
        releases = [r.to(torch.float64) for r in state["releases"]]
        if any(tuple(r.shape) != (self.dim,) for r in releases):
            raise ValueError(f"the checkpointed releases are not {self.dim}-dimensional")
        self.releases = releases
        self.contributors = [array(NODE_ARRAY, c) for c in state["contributors"]]
        self.rejected = public_rejections(state["rejected"])
        self.achieved_noise_multipliers = [float(z) for z in state["achieved_noise_multipliers"]]
        self.noise.set_state(state["noise"])

    def current_arrays(self) -> ArrayRecord:
        if not self.releases:
            return ArrayRecord()
        return ArrayRecord(array_dict={keys.EMBEDDING: Array(self.releases[-1].numpy())})

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        cfg = ConfigRecord({**dict(config), keys.ROUND: server_round, keys.METHOD: "dpagg"})
        if self.aggregation != "central":
            self.secure = secure_round(
                grid, sorted(grid.get_node_ids()), mode=self.aggregation, round_id=server_round,
                shapes={keys.EMBEDDING_SUM: (self.dim,)}, mechanism=self.mechanism,
                contribution_bound=self.max_site_norm, clip_each=False, config=dict(cfg), payload=None,
                timeout=self.timeout,
            )
            return []  # the protocol sent its own messages
        self.asked = NodeSet(grid.get_node_ids())  # sorted, 8 B per node (server.sites)
        return Instructions(self.asked, RecordDict({keys.CONFIG: cfg}))  # one shared content, built while pushed

    def _aggregate_secure(self, server_round: int) -> tuple[ArrayRecord | None, MetricRecord | None]:
        secure = self.take_secure(server_round)
        released = release_secure(secure, mode=self.aggregation, mechanism=self.mechanism, noise=self.noise,
                                  denominator=self.plan.denominator, sample_rate=self.plan.sample_rate, unit="record",
                                  label=f"dpagg-ti release {server_round} ({self.aggregation})")
        if released is None:  # no secure sum formed: whether it did depends on who took part
            log.warning("release %d: no secure sum (%s); nothing released, charged as one attempt", server_round,
                        secure.error or "no site")
            self.rejected.append({"release": server_round, "node": None, "reason": NO_SECURE_SUM})
            return self._charge_unreleased(server_round, 0, why="no secure sum formed")
        mean, event = released
        for node in secure.result.dropped:
            self.rejected.append({"release": server_round, "node": node, "reason": SECAGG_DROPPED})
        if self.is_short(len(secure.result.survivors)):  # min-sites counts the survivors
            return self._charge_unreleased(server_round, len(secure.result.survivors), event=event)
        return self._record_release(server_round, mean, event, array(NODE_ARRAY, secure.result.survivors))

    def _charge_unreleased(self, server_round: int, valid: int, *, event: PrivacyEvent | None = None,
                           why: str = "") -> tuple[None, None]:
        """An attempt that releases nothing is charged as one release (``event``, the one the
        server saw, or the plan's), so the ledger never says less than was observable; it is
        short (retried under ``short-round = retry``)."""
        self.short = True
        event = event or self.next_event(server_round)
        why = why or f"{valid} valid site sum(s) (min-sites {self.control.min_sites})"
        log.warning("release %d: %s; nothing released%s", server_round, why, "; charged as one release" if event else "")
        if event is not None:
            self.ledger.record(event.noted("short: charged, not released"))
            self.save_ledger()
        return None, None

    def _record_release(self, server_round: int, released: dict, event, used: array):
        self.ledger.record(event)
        self.save_ledger()
        self.achieved_noise_multipliers.append(event.noise_multiplier)
        self.releases.append(released[keys.EMBEDDING_SUM])
        self.contributors.append(used)
        arrays = ArrayRecord(array_dict={keys.EMBEDDING: Array(released[keys.EMBEDDING_SUM].numpy())})
        return arrays, MetricRecord({"sites": len(used), "noise-std-of-mean": self.mechanism.noise_std / self.plan.denominator})

    def _take(self, server_round: int, used: array, sums: BlockedSum, reply: Message) -> None:
        """Check one site sum and queue it in ``sums``, or log why it is left out."""
        node = reply.metadata.src_node_id
        if node in used or (self.asked is not None and node not in self.asked):
            # one sum per site: a second or unrequested sum would break the per-image bound
            log.warning("release %d: ignoring a reply from node %s, which was not asked (or answered twice)",
                        server_round, node)
            self.rejected.append({"release": server_round, "node": node, "reason": REPLY_UNASKED})
            return
        try:
            vector = read_vector_view(reply, keys.EMBEDDING_SUM, self.dim)
        except ReplyError as err:
            log.warning("release %d: node %s left out: %s", server_round, node, err)
            self.rejected.append({"release": server_round, "node": node, "reason": err.public})
            return
        sums.add(reply, FlatRecord([keys.EMBEDDING_SUM], [(self.dim,)], [vector]))
        used.append(node)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self.aggregation != "central":
            return self._aggregate_secure(server_round)
        used = array(NODE_ARRAY)
        sums = BlockedSum(self.mechanism, bounded=False)  # site sums, added a block at a time (server.blocks)
        for reply in sums.receive(replies):
            self._take(server_round, used, sums, reply)
            del reply  # before the stream's next pull: only the block may keep a reply (server.blocks)
        total = sums.result()
        if total is None or self.is_short(len(used)):
            return self._charge_unreleased(server_round, len(used))
        released, event = self.mechanism.release(
            total, denominator=self.plan.denominator, noise=self.noise, sample_rate=self.plan.sample_rate,
            unit="record", label=f"dpagg-ti release {server_round}",
        )
        return self._record_release(server_round, released, event, used)

    def mean_release(self) -> torch.Tensor:
        """The average of the releases (post-processing of DP outputs: free)."""
        if not self.releases:
            raise RuntimeError("no release was made: no site returned a valid contribution")
        return torch.stack(self.releases).mean(dim=0)
