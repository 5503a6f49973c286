"""A round's valid replies summed a block at a time, as they stream in.

Adding one reply at a time reads and writes the whole float64 running sum per reply: 16 bytes
per parameter besides the 4 of the float32 reply, so the sum alone moves 2.5x a copy of the
replies. :meth:`common.dp.GaussianSumMechanism.add_bounded_block` adds a block of replies run
by run (each run of the sum stays in cache while every reply of the block is added to it):
the sum's 16 bytes are paid once per block, with the float64 result of the one-by-one adds.

:class:`BlockedSum` holds the block. A reply enters it only once it is fully checked
(:func:`server.replies.read_update` / :func:`~server.replies.read_vector_view`), so a rejected
reply is never part of a block and never touches the sum; everything per reply that the
strategies log (who answered, who was rejected, diagnostics) stays per reply.
"""

from __future__ import annotations

from typing import Iterable, Iterator

from flwr.app import Message

from common.dp import GaussianSumMechanism
from common.dp.flatsum import ArrayTree, FlatSum, RunningSum
from server.streaming import PULL_BATCH, pull_drained

BLOCK = PULL_BATCH  # replies per block: one pull's worth, so a block never outlives a pull


class BlockedSum:
    """The running float64 sum of a round's valid records, added ``size`` at a time.

    Args:
        mechanism: the run's mechanism (one for every path): its ``add_bounded_block`` re-bounds
            each record by its norm (DP-FedAvg), its ``add_block`` adds site sums as they are
            (DPAgg-TI, and non-private runs).
        bounded: whether records are re-bounded (then :meth:`add` needs each record's norm).
        size: records per block (>= 1).
        out: a running sum of the same layout from an earlier round that nobody reads any more:
            the first block is written over it instead of into a new buffer (a large adapter's
            float64 sum is then not faulted in again every round).

    The block is added when it holds ``size`` records, when the reply stream says its next
    reply needs a new pull (:meth:`receive`: the block then holds at most one pull's replies,
    the streaming receive's memory bound), and at :meth:`result`.
    """

    def __init__(self, mechanism: GaussianSumMechanism, *, bounded: bool, size: int = BLOCK,
                 out: FlatSum | None = None) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.mechanism = mechanism
        self.bounded = bounded
        self.size = size
        self.total: RunningSum | None = None
        self._out = out
        self._records: list[ArrayTree] = []
        self._norms: list[float] = []
        # The records are views of these replies' bytes, which live as long anyway; holding the
        # messages too keeps that visible to a count of live replies (tests/server/test_streaming.py).
        self._replies: list[Message] = []

    def receive(self, replies: Iterable[Message]) -> Iterator[Message]:
        """Yield ``replies``; before asking a :class:`~server.streaming.ReplyStream` for a reply
        that needs a new pull, add the block (whatever the last reply's fate was)."""
        for reply in replies:
            yield reply
            del reply  # the block, if anything, keeps it now; the next pull must not find it here
            if pull_drained(replies):
                self.flush()

    def add(self, reply: Message, record: ArrayTree, norm: float | None = None) -> None:
        """Queue a CHECKED record (and its float64 flat norm when bounded); add the block if full."""
        if self.bounded and norm is None:
            raise ValueError("a bounded sum needs each record's norm")
        self._replies.append(reply)
        self._records.append(record)
        self._norms.append(norm)
        if len(self._records) >= self.size:
            self.flush()

    def flush(self) -> None:
        """Add the queued records into the total, in the order they came, and drop them."""
        if not self._records:
            return
        if self.bounded:
            self.total = self.mechanism.add_bounded_block(self.total, self._records, self._norms, out=self._out)
        else:
            self.total = self.mechanism.add_block(self.total, self._records, out=self._out)
        self._records, self._norms, self._replies = [], [], []

    def result(self) -> RunningSum | None:
        """The sum of every record added (None if there was none)."""
        self.flush()
        return self.total
