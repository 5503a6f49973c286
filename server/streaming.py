"""Replies handed to the aggregation one at a time, as they arrive.

Flower's ``Grid.send_and_receive`` returns every reply of a round in one list, so the server
holds all n sites' contributions at once: its peak memory grows with sites x adapter size.
:func:`stream_replies` pushes the round's messages, then pulls the replies in small batches
of message ids while they arrive and yields each one. Pulling a reply removes it from the
SuperLink's link state (``InMemoryGrid`` deletes it, the HTTP grid confirms its receipt), so
once the consumer has folded a reply into its running sum nothing keeps it alive: the server
holds at most ``batch`` replies (plus whatever the link state has received but not yet been
pulled) whatever the number of sites. A consumer that sums replies in blocks adds its block
when :func:`pull_drained` says the next reply needs a new pull, and so keeps that bound.

Timeout: as in ``send_and_receive``, replies that have not arrived ``timeout`` seconds after
the push are not waited for; the round goes on with the replies that did.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from flwr.app import Message
from flwr.serverapp import Grid

from server.sites import MessageIds, push_in_batches

log = logging.getLogger("privadapt.server")

PULL_BATCH = 8  # message ids asked for per pull: at most this many replies held by one pull
FIRST_WAIT = 0.02  # seconds between pulls when nothing arrived; doubles up to MAX_WAIT
MAX_WAIT = 1.0


@dataclass
class ReceiveStats:
    """What one round's :func:`stream_replies` saw (for logs and benchmarks)."""

    sent: int = 0
    received: int = 0
    seconds: float = 0.0  # from the push to the last reply handed over (or the timeout)
    pulls: int = 0
    timed_out: list[str] = field(default_factory=list)  # message ids with no reply in time


class ReplyStream(Iterator[Message]):
    """The replies of one round, one at a time as they arrive (:func:`stream_replies`).

    ``buffered`` is the number of replies already pulled but not yet handed over. When it is 0
    the next reply needs a new pull, so a consumer that gathers replies into a block (the
    strategies' blocked sum) adds its block then, and never holds more than one pull's worth."""

    def __init__(self, pull: "Callable[[ReplyStream], Iterator[Message]]") -> None:
        self.buffered = 0
        self._replies = pull(self)  # a generator: it sets ``buffered`` before each reply it yields

    def __iter__(self) -> "ReplyStream":
        return self

    def __next__(self) -> Message:
        return next(self._replies)


def pull_drained(replies: Iterable[Message]) -> bool:
    """Whether ``replies`` is a :class:`ReplyStream` whose next reply needs a new pull (for
    any other iterable: unknown, False)."""
    return isinstance(replies, ReplyStream) and replies.buffered == 0


def stream_replies(
    grid: Grid,
    messages: Iterable[Message],
    timeout: float | None,
    *,
    batch: int = PULL_BATCH,
    stats: ReceiveStats | None = None,
) -> ReplyStream:
    """Push ``messages`` and yield their replies one by one as they arrive.

    Args:
        grid: the run's grid (``InMemoryGrid`` in simulation, the HTTP grid in deployment).
        messages: the round's messages, any iterable (built and pushed ``server.sites.PUSH_BATCH``
            at a time; may be empty: nothing is pushed, nothing yielded).
        timeout: seconds to wait for replies after the push; ``None`` waits for all of them.
        batch: message ids asked for per ``pull_messages`` call (>= 1).
        stats: filled in as the round goes (sent, received, pulls, seconds, timed-out ids).
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if timeout is not None and not timeout >= 0:
        raise ValueError(f"timeout must be >= 0 or None, got {timeout}")
    stats = ReceiveStats() if stats is None else stats
    return ReplyStream(lambda stream: _pull(grid, messages, timeout, batch, stats, stream))


def _pull(grid: Grid, messages: Iterable[Message], timeout: float | None, batch: int, stats: ReceiveStats,
          stream: ReplyStream) -> Iterator[Message]:
    """:func:`stream_replies`' loop (the push happens at the first ``next``)."""
    start = time.monotonic()
    pending = push_in_batches(grid, messages)  # built and pushed PUSH_BATCH at a time; unpushed ones dropped
    del messages
    stats.sent = len(pending)
    deadline = None if timeout is None else start + timeout
    wait = FIRST_WAIT
    while pending:
        still = MessageIds()  # this pass's ids with no reply yet (not a set of every answered id), packed
        passed = len(pending)
        while pending:  # ids leave `pending` as they are asked for: answered ones are freed at once
            asked = [pending.popleft() for _ in range(min(batch, len(pending)))]
            replies = list(grid.pull_messages(asked))
            stats.pulls += 1
            arrived: set[str] = set()  # this pull's: at most `batch` ids
            while replies:
                reply = replies.pop(0)  # the list must not keep a reply the consumer dropped
                stream.buffered = len(replies)
                arrived.add(reply.metadata.reply_to_message_id)
                stats.received += 1
                stats.seconds = time.monotonic() - start
                yield reply
                del reply
            still.extend(mid for mid in asked if mid not in arrived)
        progressed = len(still) < passed
        pending = still
        if progressed:
            wait = FIRST_WAIT
        if not pending or (deadline is not None and time.monotonic() >= deadline):
            break
        if progressed:
            continue
        time.sleep(wait if deadline is None else max(0.0, min(wait, deadline - time.monotonic())))
        wait = min(2 * wait, MAX_WAIT)
    stats.timed_out = list(pending)
    stats.seconds = time.monotonic() - start
    log.info("received %d of %d replies in %.3f s (%d pulls)", stats.received, stats.sent, stats.seconds, stats.pulls,
             extra={"receive_stats": stats})
    if pending:
        log.warning("%d of %d replies did not arrive within %s s; the round goes on without them",
                    len(pending), stats.sent, timeout)
