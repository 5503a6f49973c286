"""Site-level DP-FedAvg of clipped LoRA deltas on Flower's Message API.

McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent Language
Models" (ICLR 2018), Alg. 1 with the fixed-denominator estimator: every round

1. each of the K sites is sampled independently with probability q (Poisson; q = 1 means
   every site, no amplification); the draws come from the server's sampling source
   (os.urandom by default: they must stay secret for amplification to hold);
2. every sampled site starts from the global adapter, trains locally (plain LoRA, MP-LoRA,
   SMP-LoRA or DP-SGD), clips its delta to L2 norm C over all adapter tensors, and sends it;
3. the server checks every reply (keys, shapes, dtype, finite, norm <= C), re-bounds it with
   the shared :class:`~common.dp.GaussianSumMechanism` (a no-op within float32 rounding, so
   the sensitivity is exactly C), sums, adds N(0, (zC)^2 I) once and divides by the public
   expected count q*K: uniform weights, never example counts. K is the DECLARED number of
   sites (``num-sites``), never the number that connected: the update's norm, about
   zC*sqrt(d)/(qK), would otherwise reveal how many sites exist. More connected sites than
   declared stop the run before the round releases anything (:class:`TooManySites`); fewer
   are fine (the denominator stays q*K);
4. the global adapter moves by ``server-learning-rate`` times that noisy mean, and the round
   is written into the ledger as one site-level event (q, z). T rounds compose.

The noise and the denominator are those of the plan whatever happens to the replies: a site
that is rejected or drops out only removes signal, and a round in which no site answers
still releases (and pays for) pure noise, so the accounting never depends on who answered.
With secure aggregation a round whose secure sum cannot form (fewer than 2 sampled, fewer
than the threshold answering) releases nothing but is charged all the same, as is a round
with fewer survivors than ``min-sites``: whether it formed depends on who took part.

With defense ``dp-sgd`` every site also reports the public parameters of its own DP-SGD
(record-level, scope ``site-<index>``); those events enter the same ledger as unit "record".
The server knows them beforehand (:class:`~common.dp.plan.DPSGDPlan`, from the declared site
size), checks every report against them and stops the run before the record-level budget
is passed.

Non-private mode (target-epsilon = inf): every site, no clipping, no noise, the plain mean of
the deltas that arrived.
"""

from __future__ import annotations

import logging
from array import array
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from common import keys
from common.config import RECORD_DP_DEFENSES
from common.dp import GaussianSumMechanism, NoiseSource, PrivacyEvent, PrivacyLedger
from common.dp.flatsum import FlatSum
from common.dp.mechanism import expected_noise_norm_of_mean
from common.dp.plan import EACH_SITE, DPSGDPlan, FedAvgPlan
from common.dp.sampling import SamplingSource, poisson_sample
from common.lora import flat_norm, tree_add, tree_shapes
from common.wire import Layout, packed_record, tree_record
from server.aggregation import release_secure, secure_round
from server.blocks import BlockedSum
from common.reasons import NO_SECURE_SUM, SECAGG_DROPPED, public_rejections
from server.replies import ReplyError, read_diagnostics, read_site_report, read_update
from server.sites import NODE_ARRAY, Instructions, NodeSet, SiteDiagnostics, node_array
from server.strategy_base import LedgerStrategy, RunControl, TooManySites

log = logging.getLogger("privadapt.server")

METHOD = "lora"


@dataclass
class RoundLog:
    """What the server knows about one round (diagnostics are NOT DP: kept by the server)."""

    round: int
    sampled: array  # sorted node ids, 8 B per site (a list of ints: ~40 B); a list is converted
    used: array = field(default_factory=lambda: array(NODE_ARRAY))  # 8 B per site (a list of ints: ~37 B)
    rejected: list[dict] = field(default_factory=list)  # {"node", "reason"}: reasons from common.reasons only
    ignored: list[int] = field(default_factory=list)
    # z*C*sqrt(d)/denominator, from public quantities: the realised noise's norm is never kept,
    # since with the release it tells a candidate sum apart exactly
    expected_noise_norm: float = 0.0
    update_norm: float = 0.0
    achieved_noise_multiplier: float | None = None  # the release's z (distributed: z * sqrt(survivors / entered))
    # the used sites' diagnostics as running sums per name (server.sites): nothing per site
    diagnostics: SiteDiagnostics = field(default_factory=lambda: SiteDiagnostics(keys.DIAGNOSTICS))
    short: bool = False  # fewer valid sites than min-sites: charged, not applied

    def __post_init__(self) -> None:
        if not isinstance(self.sampled, array):
            self.sampled = array(NODE_ARRAY, self.sampled)
        if not isinstance(self.used, array):
            self.used = array(NODE_ARRAY, self.used)

    def to_state(self) -> dict:
        """The round as plain data for the checkpoint (copies; diagnostics as running sums)."""
        state = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "diagnostics"}
        state.update(sampled=list(self.sampled), used=list(self.used), rejected=[dict(r) for r in self.rejected],
                     ignored=list(self.ignored), diagnostics=self.diagnostics.to_state())
        return state

    @classmethod
    def from_state(cls, state: dict) -> "RoundLog":
        """:meth:`to_state`'s round back (also an older checkpoint's, with a dict per site)."""
        state = {k: v for k, v in state.items() if k != "noise_norm"}  # an older checkpoint's realised noise norm
        return cls(**{**state, "used": state.get("used", ()), "rejected": public_rejections(state.get("rejected", [])),
                      "diagnostics": SiteDiagnostics.from_state(state.get("diagnostics", {}))})

    def summary(self) -> dict:
        """The round for round_metrics.json; the sites' diagnostics only if any site sent some."""
        return {**self.server_view(), **self.diagnostics_summary()}

    def server_view(self) -> dict:
        """What the server itself saw of the round: who was sampled, used, rejected; norms."""
        return {
            "round": self.round,
            "sites_sampled": len(self.sampled),
            "sites_used": len(self.used),
            "rejected": self.rejected,
            "ignored_unrequested_replies": self.ignored,
            "expected_noise_norm_of_mean": round(self.expected_noise_norm, 6),
            "update_norm": round(self.update_norm, 6),
            "achieved_noise_multiplier": self.achieved_noise_multiplier,
            "short_round_not_applied": self.short,
        }

    def diagnostics_summary(self) -> dict:
        """The means of the diagnostics the used sites sent (site-diagnostics = true; NOT
        private), or nothing at all when none sent any."""
        if not any(self.diagnostics.counts.values()):
            return {}

        def mean(name: str) -> float | None:
            value = self.diagnostics.mean(name)
            return None if value is None else round(value, 6)

        return {
            "adaptation_loss": mean(keys.DIAG_LOSS),
            "attacker_accuracy": mean(keys.DIAG_ATTACKER_ACCURACY),
            "fraction_clipped": mean(keys.DIAG_CLIPPED),
            "delta_norm_before_clipping": mean(keys.DIAG_DELTA_NORM),
        }


class DPFedAvgLoRA(LedgerStrategy):
    """Central-noise DP-FedAvg for LoRA adapters (trusted server: it sees each clipped delta)."""

    def __init__(
        self,
        *,
        plan: FedAvgPlan,
        mechanism: GaussianSumMechanism,
        noise: NoiseSource,
        sampling: SamplingSource,
        ledger: PrivacyLedger,
        initial: dict[str, torch.Tensor],
        defense: str,
        private: bool,
        server_learning_rate: float = 1.0,
        num_sites: int = 0,
        ledger_path: Path | None = None,
        aggregation: str = "central",
        timeout: float = 3600.0,
        control: RunControl | None = None,
        dpsgd: DPSGDPlan | None = None,
    ) -> None:
        if mechanism.noise_multiplier != plan.noise_multiplier:
            raise ValueError("the mechanism's noise multiplier must be the plan's")
        if private and num_sites < 1:
            raise ValueError("a private DP-FedAvg run needs the declared public number of sites K (num-sites >= 1)")
        super().__init__(ledger=ledger, ledger_path=ledger_path, control=control)
        self.plan = plan
        self.mechanism = mechanism
        self.noise = noise
        self.sampling = sampling
        self.global_state = {k: v.detach().to(torch.float32).cpu().clone() for k, v in initial.items()}
        self.shapes = Layout(tree_shapes(self.global_state))  # digest, sizes and offsets once per run
        self.defense = defense
        self.private = private
        self.server_learning_rate = server_learning_rate
        self.num_sites = num_sites  # the declared public K (0: undeclared, non-private runs only)
        self.dpsgd = dpsgd if private and defense in RECORD_DP_DEFENSES else None  # the sites' record-level plan
        self.rounds: list[RoundLog] = []
        self.reported_record_epsilons: dict[str, float] = {}
        self.aggregation = aggregation
        self.timeout = timeout
        # the last round's float64 sum, written over by the next (server.blocks.BlockedSum's out):
        # not state (never checkpointed), only pages the OS need not fault in and zero again
        self._sum_buffer: FlatSum | None = None

    def summary(self) -> None:
        log.info("DP-FedAvg LoRA (%s): z=%.4f, site rate q=%.4f, C=%g, %d round(s), %d tensors", self.defense,
                 self.plan.noise_multiplier, self.plan.sample_rate, self.mechanism.clip_norm, self.plan.rounds,
                 len(self.shapes))

    @property
    def denominator(self) -> float:
        return self.plan.denominator(self.num_sites)

    def next_event(self, server_round: int) -> PrivacyEvent | None:
        if not self.private:
            return None
        return self.plan.charged_event(label=f"dp-fedavg lora round {server_round}")

    def next_events(self, server_round: int) -> list[PrivacyEvent]:
        """The site-level release and, with DP-SGD sites, the record-level round each site spends."""
        events = super().next_events(server_round)
        if self.dpsgd is not None:
            events.append(self.dpsgd.charged_event(label=f"dp-sgd round {server_round}", scope=EACH_SITE))
        return events

    def charged_though_lost(self, lost: list[PrivacyEvent]) -> list[PrivacyEvent]:
        """The sites' DP-SGD spends (record level) and, with distributed noise, the site-level
        release were seen by a server the guarantee does not trust: they stay charged."""
        return [e for e in lost if e.unit == "record" or self.aggregation == "distributed"]

    def state_dict(self) -> dict:
        """Everything a resumed run needs: adapter, K, round logs, site reports, and the
        seeded generators' states (None with the OS CSPRNG: its draws are fresh after a resume)."""
        return {
            "global_state": {k: v.clone() for k, v in self.global_state.items()},
            "num_sites": self.num_sites,
            "rounds": [r.to_state() for r in self.rounds],
            "reported_record_epsilons": dict(self.reported_record_epsilons),
            "noise": self.noise.get_state(),
            "sampling": None if self.sampling is None else self.sampling.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        restored = {k: v.to(torch.float32) for k, v in state["global_state"].items()}
        if tree_shapes(restored) != self.shapes:
            raise ValueError("the checkpointed adapter does not have this run's tensors and shapes")
        self.global_state = restored
        if self.private and int(state["num_sites"]) != self.num_sites:
            raise ValueError(f"the checkpoint was made with K = {state['num_sites']} sites, this run declares "
                             f"num-sites = {self.num_sites}")
        self.rounds = [RoundLog.from_state(r) for r in state["rounds"]]
        self.reported_record_epsilons = dict(state["reported_record_epsilons"])
        self.noise.set_state(state["noise"])
        if (state["sampling"] is None) != (self.sampling is None):
            raise ValueError("a seeded sampling state can only be restored into a seeded sampling source, "
                             "and vice versa")
        if self.sampling is not None:
            self.sampling.set_state(state["sampling"])

    def current_arrays(self) -> ArrayRecord:
        return tree_record(self.global_state)

    def check_connected(self, server_round: int, connected: int) -> None:
        """Raise :class:`TooManySites` (the run stops before this round releases anything) when
        more sites are connected than the declared K: q*K would under-count them, and the
        guarantee for one site assumes at most K. Fewer is fine: the denominator stays q*K."""
        if self.private and connected > self.num_sites:
            raise TooManySites(f"round {server_round}: {connected} sites are connected but num-sites declares "
                               f"{self.num_sites}: stopping before any release (declare the number of sites that "
                               "may take part)")

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        nodes = node_array(grid.get_node_ids())  # sorted ids, 8 B each: Flower's list of ints is not kept
        self.check_connected(server_round, len(nodes))
        picked = poisson_sample(len(nodes), self.plan.sample_rate, self.sampling).numpy()
        chosen = array(NODE_ARRAY, np.frombuffer(nodes, dtype=np.uint64)[picked].tobytes())  # sorted, as nodes
        self.rounds.append(RoundLog(round=server_round, sampled=chosen))
        cfg = ConfigRecord({**dict(config), keys.ROUND: server_round, keys.METHOD: METHOD, keys.DEFENSE: self.defense})
        if self.aggregation != "central":
            # the protocol sends its own messages; Flower gets none and hands aggregate_train no reply
            self.secure = secure_round(
                grid, chosen, mode=self.aggregation, round_id=server_round, shapes=self.shapes,
                mechanism=self.mechanism, contribution_bound=self.mechanism.clip_norm, clip_each=True,
                config=dict(cfg), payload=RecordDict({keys.ARRAYS: packed_record(self.global_state)}),
                timeout=self.timeout,
            )
            return []
        content = RecordDict({keys.ARRAYS: packed_record(self.global_state), keys.CONFIG: cfg})
        return Instructions(chosen, content)  # built while pushed: never n messages at once (server.sites)

    def _aggregate_secure(self, entry: RoundLog) -> tuple[ArrayRecord | None, MetricRecord | None]:
        secure = self.take_secure(entry.round)
        if secure.result is not None:
            entry.used = array(NODE_ARRAY, secure.result.survivors)
            entry.rejected = [{"node": n, "reason": SECAGG_DROPPED} for n in secure.result.dropped]
        released = release_secure(secure, mode=self.aggregation, mechanism=self.mechanism, noise=self.noise,
                                  denominator=self.denominator, sample_rate=self.plan.accounting_sample_rate,
                                  unit="site", label=f"dp-fedavg lora round {entry.round} ({self.aggregation})")
        if released is None:  # no secure sum formed: whether it did depends on who took part
            entry.rejected.append({"node": None, "reason": NO_SECURE_SUM})
            return self._short_round(entry, why="no secure sum formed")
        mean, event = released
        entry.achieved_noise_multiplier = event.noise_multiplier
        if self.is_short(len(entry.used)):  # min-sites counts the survivors
            return self._short_round(entry, event)
        self.ledger.record(event)
        self.save_ledger()
        entry.expected_noise_norm = self.expected_noise_norm(event.noise_multiplier)
        entry.update_norm = self.server_learning_rate * flat_norm(mean)
        self.global_state = tree_add(self.global_state, mean, self.server_learning_rate)
        return tree_record(self.global_state), MetricRecord({"sites": len(entry.used),
                                                             "update-norm": float(entry.update_norm)})

    def _reject(self, entry: RoundLog, node: int, err: ReplyError) -> None:
        """Log why a reply is left out (server log) and keep its public reason only."""
        log.warning("round %d: node %s left out: %s", entry.round, node, err)
        entry.rejected.append({"node": node, "reason": err.public})

    def _record_site_spend(self, entry: RoundLog, reply: Message, node: int) -> None:
        """DP-SGD sites report the record-level parameters they spent; the ledger keeps them
        even if the delta is then rejected (the server saw it)."""
        report = read_site_report(reply)
        event = report.event(entry.round, node)
        self.ledger.record(event)
        self.reported_record_epsilons[event.scope] = report.epsilon
        if self.dpsgd is not None:
            report.check_planned(self.dpsgd.charged_event())

    def _take(self, entry: RoundLog, asked: NodeSet, sums: BlockedSum, reply: Message) -> None:
        """Check one reply and queue its delta in ``sums``, or log why it is left out."""
        node = reply.metadata.src_node_id
        if node not in asked or node in entry.used:
            log.warning("round %d: ignoring a reply from node %s, which was not asked (or answered twice)",
                        entry.round, node)
            entry.ignored.append(node)
            return
        try:
            if self.defense in RECORD_DP_DEFENSES and self.private:
                self._record_site_spend(entry, reply, node)
            # float32 views of the reply and their float64 norm (checked against C when private)
            delta, norm = read_update(reply, self.shapes, max_norm=self.mechanism.clip_norm if self.private else None)
        except ReplyError as err:
            self._reject(entry, node, err)
            return
        sums.add(reply, delta, norm)  # private: re-bound, exact sensitivity C whatever the wire did
        entry.used.append(node)
        entry.diagnostics.add(read_diagnostics(reply, keys.DIAGNOSTICS))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if not self.rounds or self.rounds[-1].round != server_round:
            self.rounds.append(RoundLog(round=server_round, sampled=[]))  # configure_train was not called
        entry = self.rounds[-1]
        if self.aggregation != "central":
            return self._aggregate_secure(entry)
        asked = NodeSet(entry.sampled)  # sorted: looked up by bisection, no copy (server.sites)
        # checked deltas are summed a block at a time (server.blocks); re-bounded when private
        sums = BlockedSum(self.mechanism, bounded=self.private, out=self._sum_buffer)
        for reply in sums.receive(replies):
            self._take(entry, asked, sums, reply)
            del reply  # before the stream's next pull: only the block may keep a reply (server.blocks)
        total = sums.result()
        if isinstance(total, FlatSum):  # nothing keeps this round's sum: the next round writes over it
            self._sum_buffer = total

        if self.is_short(len(entry.used)):
            return self._short_round(entry)
        if self.private:
            if total is None:  # nobody sampled or nobody valid: the noise is released all the same
                total = {k: torch.zeros(s, dtype=torch.float64) for k, s in self.shapes.items()}
            mean, event = self.mechanism.release(
                total, denominator=self.denominator, noise=self.noise, sample_rate=self.plan.accounting_sample_rate,
                unit="site", label=f"dp-fedavg lora round {server_round}",
            )
            self.ledger.record(event)
            entry.achieved_noise_multiplier = event.noise_multiplier
            entry.expected_noise_norm = self.expected_noise_norm(event.noise_multiplier)
        else:
            if total is None:
                log.warning("round %d: no valid site delta; the global adapter is unchanged", server_round)
                self.save_ledger()
                return None, MetricRecord({"sites": 0})
            mean = {k: v / len(entry.used) for k, v in total.items()}
        self.save_ledger()
        entry.update_norm = self.server_learning_rate * flat_norm(mean)
        self.global_state = tree_add(self.global_state, mean, self.server_learning_rate)
        metrics = MetricRecord({"sites": len(entry.used), "rejected": len(entry.rejected),
                                "expected-noise-norm": float(entry.expected_noise_norm),
                                "update-norm": float(entry.update_norm)})
        return tree_record(self.global_state), metrics

    def expected_noise_norm(self, noise_multiplier: float) -> float:
        """E||N(0, (zC)^2 I_d)|| / denominator ~ z*C*sqrt(d)/(q*K): public, unlike the realised norm."""
        return expected_noise_norm_of_mean(noise_multiplier, self.mechanism.clip_norm, self.shapes.total, self.denominator)

    def _short_round(self, entry: RoundLog, event: PrivacyEvent | None = None,
                     why: str = "") -> tuple[None, MetricRecord]:
        """A round with fewer valid sites than min-sites, or whose secure sum did not form: the
        update is not applied, but the attempt is charged (``event``, the release the server
        saw, or the plan's next one), because whether a round is short is observable and
        depends on who answered: skipping or retrying never spends less than the ledger says."""
        self.short = entry.short = True
        why = why or f"{len(entry.used)} valid site(s), fewer than min-sites {self.control.min_sites}"
        log.warning("round %d: %s: not applied%s", entry.round, why, "; charged as one release" if self.private else "")
        event = event or self.next_event(entry.round)
        if event is not None:
            self.ledger.record(event.noted("short: charged, not applied"))
            self.save_ledger()
        return None, MetricRecord({"sites": len(entry.used), "short": 1})

    def round_summaries(self) -> list[dict]:
        return [r.summary() for r in self.rounds]

