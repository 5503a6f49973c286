"""What the server keeps per site during a round, kept small: the server's memory must grow
with the adapter, not with sites x anything large.

Measured with ``simulations.bench_scale`` (tracemalloc, 100 vs 1,000 sites), a round used to
cost about 1.3 KB per site, none of it adapter-sized (BENCHMARKS.md, item 5):

* the round's instruction messages, built as one list of n ``Message`` objects (each with its
  own metadata: about 0.8 KB, 1.1 KB where each also had its own content) and kept by the
  round loop until the round ended. :class:`Instructions` builds them while they are pushed,
  :func:`push_in_batches` pushes them ``PUSH_BATCH`` at a time, so at most that many exist;
* a set of the asked node ids (about 30 to 60 B per site). :class:`NodeSet` answers the same
  question from the sorted node ids the strategy already holds (or 8 B per site);
* the LoRA strategy's per-site diagnostics, one dict of floats per site (about 250 B per site
  and round, kept for the whole run). :class:`SiteDiagnostics` keeps them in columns: 8 B
  for the node id and 8 B per diagnostic.

What remains is inherent: Flower's pull API takes message ids, so the server holds one id
per unanswered message (a 36-character uuid string in simulation, a 64-character object id
with the HTTP grid), and the round records keep who was sampled and who took part.
"""

from __future__ import annotations

import math
from array import array
from bisect import bisect_left
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import islice
from typing import Any

import numpy as np
import torch
from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

PUSH_BATCH = 64  # instruction messages per push_messages call: at most this many built at once


class Instructions:
    """A round's instruction messages, one per node, all with the same content, built one at
    a time while they are iterated (so only the messages being pushed exist).

    It is what ``configure_train`` returns: iterable (again and again), sized, and cheap to
    keep (the node ids and one shared content)."""

    def __init__(self, nodes: Sequence[int], content: RecordDict, message_type: str = MessageType.TRAIN) -> None:
        self.nodes = nodes
        self.content = content
        self.message_type = message_type

    def __len__(self) -> int:
        return len(self.nodes)

    def __iter__(self) -> Iterator[Message]:
        for node in self.nodes:
            yield Message(content=self.content, dst_node_id=node, message_type=self.message_type)


def push_in_batches(grid: Grid, messages: Iterable[Message], batch: int = PUSH_BATCH) -> deque[str]:
    """Push ``messages`` ``batch`` at a time; the ids of those pushed, in order (a deque: the
    stream takes them from the front as it asks for their replies).

    ``Grid.push_messages`` needs a collection (the HTTP grid walks it twice), so each batch
    is a list, dropped once pushed. An empty round still makes one (empty) push, as pushing
    the whole list at once did."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    ids: deque[str] = deque()
    remaining = iter(messages)
    chunk = list(islice(remaining, batch))
    while True:
        # the HTTP grid returns None for a message it could not push: nothing will answer it
        ids.extend(mid for mid in grid.push_messages(chunk) if mid)
        chunk = []  # the pushed batch goes before the next one is built
        chunk = list(islice(remaining, batch))
        if not chunk:
            return ids


def _is_sorted(values: Sequence[int]) -> bool:
    return all(values[i] < values[i + 1] for i in range(len(values) - 1))


class NodeSet:
    """A set of node ids as one sorted sequence: membership by bisection, 8 B per node (none
    when the strategy's own sorted list is used), where a ``set`` of ints costs 30 to 60 B.

    Args:
        nodes: the node ids; a strictly increasing sequence is used as it is (no copy), any
            other iterable is sorted into an array of uint64 (Flower's node ids).
    """

    def __init__(self, nodes: Iterable[int]) -> None:
        if isinstance(nodes, Sequence) and _is_sorted(nodes):
            self.nodes: Sequence[int] = nodes
        else:
            self.nodes = array("Q", sorted(set(nodes)))

    def __len__(self) -> int:
        return len(self.nodes)

    def __iter__(self) -> Iterator[int]:
        return iter(self.nodes)

    def __contains__(self, node: object) -> bool:
        if not isinstance(node, int) or node < 0:
            return False
        i = bisect_left(self.nodes, node)
        return i < len(self.nodes) and self.nodes[i] == node


class SiteDiagnostics:
    """Diagnostics of one round per site, in columns: a node id (uint64, Flower's node ids)
    and one float64 per diagnostic name, NaN where the site did not send it.

    Used like the dict it replaces (``diagnostics[node] = {name: value}``, once per site);
    :meth:`to_state` is what the checkpoint saves (tensors), :meth:`from_state` reads it back,
    as well as the ``{node: {name: value}}`` dicts older checkpoints hold."""

    def __init__(self, names: Iterable[str] = ()) -> None:
        self.nodes = array("Q")
        self.columns: dict[str, array] = {name: array("d") for name in names}

    def __len__(self) -> int:
        return len(self.nodes)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SiteDiagnostics) and dict(self.items()) == dict(other.items())

    def __setitem__(self, node: int, values: Mapping[str, float]) -> None:
        """Add ``node``'s diagnostics (each site once: the strategy lets each in once)."""
        for name in values:
            if name not in self.columns:  # a name not seen before: NaN for the sites before
                self.columns[name] = array("d", [math.nan] * len(self.nodes))
        self.nodes.append(node)
        for name, column in self.columns.items():
            column.append(float(values.get(name, math.nan)))

    def items(self) -> Iterator[tuple[int, dict[str, float]]]:
        """(node, {name: value}) per site, in the order they were added (NaNs left out)."""
        for i, node in enumerate(self.nodes):
            yield node, {name: col[i] for name, col in self.columns.items() if not math.isnan(col[i])}

    def mean(self, name: str) -> float | None:
        """The mean of ``name`` over the sites that sent it (None: none did), summed in the
        order the sites were added (as the dicts were)."""
        values = [v for v in self.columns.get(name, ()) if not math.isnan(v)]
        return sum(values) / len(values) if values else None

    def to_state(self) -> dict[str, Any]:
        """Plain tensors for ``torch.save`` (node ids bit-cast to int64: torch has no uint64 tensor I/O everywhere)."""
        nodes = torch.from_numpy(np.frombuffer(self.nodes.tobytes(), dtype=np.uint64).view(np.int64).copy())
        return {"nodes": nodes, "columns": {name: torch.from_numpy(np.frombuffer(col.tobytes(), dtype=np.float64).copy())
                                            for name, col in self.columns.items()}}

    @classmethod
    def from_state(cls, state: Mapping[Any, Any]) -> "SiteDiagnostics":
        """Read :meth:`to_state`'s form, or an older checkpoint's ``{node: {name: value}}``."""
        out = cls()
        if "nodes" not in state:  # the older form
            for node, values in state.items():
                out[int(node)] = values
            return out
        out.nodes = array("Q", state["nodes"].numpy().view(np.uint64).tobytes())
        out.columns = {name: array("d", col.numpy().astype(np.float64).tobytes()) for name, col in state["columns"].items()}
        if any(len(col) != len(out.nodes) for col in out.columns.values()):
            raise ValueError("checkpointed diagnostics: a column does not have one value per site")
        return out
