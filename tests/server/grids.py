"""Grids for server tests (test doubles): sites answer in-process, replies are pulled as the server streams.

- :class:`PushPullGrid`: subclasses define ``answer(message) -> Message | None``; ``None`` is a
  site that never answers (the server's stream waits for it until the round's timeout). A
  ClientApp exception becomes an error reply, as Flower makes one.
- :class:`ReplayGrid`: n sites that answer every message at once with a synthetic reply
  (:func:`dpagg_answer`, :func:`lora_answer`), keeping 9 bytes per pending message; the
  server-scale benchmark (bench/scale.py) drives the real strategies through it too.
"""

from __future__ import annotations

import math
import uuid
import weakref
from array import array
from typing import Callable, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from common import keys
from common.wire import Layout


class PushPullGrid:
    """``push_messages`` / ``pull_messages`` (what server.streaming uses) and
    ``send_and_receive`` on top of the subclass's ``answer``."""

    def __init__(self, node_ids) -> None:
        self.node_ids = list(node_ids)
        self.sent: list[Message] = []
        self.pending: dict[str, Message] = {}

    def get_node_ids(self):
        return list(self.node_ids)

    def answer(self, message: Message) -> Message | None:
        raise NotImplementedError

    def _reply(self, message: Message) -> Message | None:
        try:
            reply = self.answer(message)
        except Exception as err:  # Flower turns a ClientApp exception into an error reply
            return Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=message)
        if reply is not None:
            reply.metadata.__dict__["_reply_to_message_id"] = message.metadata.message_id
        return reply

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = f"m{len(self.sent)}"
            self.sent.append(msg)
            self.pending[msg.metadata.message_id] = msg
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        replies = []
        for mid in list(message_ids):
            if mid in self.pending:
                reply = self._reply(self.pending[mid])
                if reply is not None:
                    del self.pending[mid]
                    replies.append(reply)
        return replies

    def send_and_receive(self, messages, timeout=None):
        return self.pull_messages(self.push_messages(messages))


ReplyContent = Callable[[Message], RecordDict]


class ReplayGrid(Grid):
    """A Grid of ``n`` sites (node ids 1..n) that answer every message at once.

    Like a SuperLink it keeps the pushed messages until their replies are pulled, but only
    what it needs to answer them, 9 bytes per message (the destination and whether it is
    still unanswered): in a deployment the messages live in the SuperLink's process, not the
    server's, so the server's memory is measured without them. Message ids are uuid strings
    (of the push's sequence number), as long as ``InMemoryGrid``'s. A reply is built by
    ``answer(message)`` when the server pulls it (``message`` has the original's id,
    destination and type, not its content), so the process holds exactly the replies the
    server keeps. ``live`` / ``max_live`` count reply messages alive at once (weak
    references in the grid's own small set, not ``weakref.finalize``: that registry is shared
    with torch's ~235 finalizers, and its resize mid-round was an 18 KB allocation of the
    benchmark's, not the server's, in the 1,000-site peak)."""

    def __init__(self, n: int, answer: ReplyContent) -> None:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.nodes = array("Q", range(1, n + 1))
        self.answer = answer
        self.destinations = array("Q")  # of the k-th pushed message at k - 1
        self.unanswered = bytearray()
        self.pending = 0  # pushed messages not pulled yet
        self.pushed = 0
        self._alive: set[weakref.ref] = set()
        self.max_live = 0

    # the parts of the Grid interface a privadapt strategy does not use
    def set_run(self, run) -> None:
        raise NotImplementedError("ReplayGrid has no run")

    @property
    def run(self):
        raise NotImplementedError("ReplayGrid has no run")

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        """A new list of new int objects each call, as a SuperLink's gRPC answer gives (a list
        of the grid's own ints would hide what the server keeps of them)."""
        return self.nodes.tolist()

    @staticmethod
    def sequence(message_id: str) -> int:
        """The push's sequence number (1, 2, ...) a message id stands for."""
        return uuid.UUID(message_id).int

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            self.pushed += 1
            mid = str(uuid.UUID(int=self.pushed))
            msg.metadata.__dict__["_message_id"] = mid
            self.destinations.append(msg.metadata.dst_node_id)
            self.unanswered.append(1)
            self.pending += 1
            ids.append(mid)
        return ids

    @property
    def live(self) -> int:
        return len(self._alive)

    def _released(self, ref: weakref.ref) -> None:
        self._alive.discard(ref)

    def _take(self, message_id: str) -> Message | None:
        """The pushed message ``message_id`` (rebuilt without its content), once."""
        k = self.sequence(message_id) - 1
        if not 0 <= k < self.pushed or not self.unanswered[k]:
            return None
        self.unanswered[k] = 0
        self.pending -= 1
        msg = Message(RecordDict(), dst_node_id=self.destinations[k], message_type=MessageType.TRAIN)
        msg.metadata.__dict__["_message_id"] = message_id
        return msg

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = []
        for mid in message_ids:
            msg = self._take(mid)
            if msg is None:
                continue
            reply = Message(content=self.answer(msg), reply_to=msg)
            self._alive.add(weakref.ref(reply, self._released))
            self.max_live = max(self.max_live, self.live)
            replies.append(reply)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Flower's semantics: push everything, return every reply in one list."""
        return list(self.pull_messages(list(self.push_messages(messages))))


def set_task_identity() -> None:
    """Outside a Flower run, ``Message()`` needs the process' task identity (as Flower sets it)."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        setattr(TaskIdentity, attr, value)


def _rng(msg: Message) -> np.random.Generator:
    return np.random.default_rng(msg.metadata.dst_node_id)


def dpagg_answer(dim: int, clip: float) -> ReplyContent:
    """A site's DPAgg-TI reply: a sum of bounded embeddings (norm <= C here: one image)."""
    def answer(msg: Message) -> RecordDict:
        v = _rng(msg).standard_normal(dim)
        v *= 0.9 * clip / np.linalg.norm(v)
        return RecordDict({keys.ARRAYS: ArrayRecord(array_dict={keys.EMBEDDING_SUM: Array(v)})})
    return answer


def lora_answer(shapes: dict[str, tuple[int, ...]], clip: float) -> ReplyContent:
    """A site's LoRA reply: a float32 delta clipped to C, packed into one Array as sites send
    it (``common.wire.packed_record``), with the diagnostics a site sends."""
    layout = Layout(shapes)  # its packed key and number of entries, once

    def answer(msg: Message) -> RecordDict:
        flat = _rng(msg).standard_normal(layout.total, dtype=np.float32)
        flat *= np.float32(0.9 * clip / math.sqrt(float(np.dot(flat, flat))))
        arrays = ArrayRecord(array_dict={layout.key: Array(flat)})
        metrics = MetricRecord({keys.DIAG_LOSS: 0.1, keys.DIAG_DELTA_NORM: 0.9 * clip, keys.DIAG_CLIPPED: 0.0})
        return RecordDict({keys.ARRAYS: arrays, keys.METRICS: metrics})
    return answer
