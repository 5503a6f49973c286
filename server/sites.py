"""What the server keeps per site during a round, kept small: the server's memory must grow
with the adapter, not with sites x anything large (figures: BENCHMARKS.md, ``bench.scale``).

* instruction messages: :class:`Instructions` builds them while they are pushed and
  :func:`push_in_batches` pushes them ``PUSH_BATCH`` at a time, so at most that many exist;
* the asked node ids: :class:`NodeSet` answers membership from the sorted node ids the
  strategy already holds (8 B per site at most);
* per-site diagnostics: only their means are reported, so :class:`SiteDiagnostics` keeps a
  running sum and a count per name, nothing per site;
* the ids of unanswered messages: :class:`MessageIds` keeps them packed as bytes and gives
  the same strings back.

What remains is inherent: Flower's pull API takes message ids, so the server holds one id
per unanswered message, and the round records keep who was sampled and who took part (8 B
per site each, :data:`NODE_ARRAY`).
"""

from __future__ import annotations

import math
from array import array
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import islice
from typing import Any
from uuid import UUID

import numpy as np
from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

PUSH_BATCH = 64  # instruction messages per push_messages call: at most this many built at once
NODE_ARRAY = "Q"  # array typecode for lists of node ids (Flower's are unsigned 64-bit): 8 B per node


def _uuid_bytes(mid: str) -> bytes | None:
    """A canonical uuid string (what ``InMemoryGrid`` gives) as its 16 bytes; None otherwise."""
    if len(mid) != 36:
        return None
    try:
        packed = UUID(mid)
    except ValueError:
        return None
    return packed.bytes if str(packed) == mid else None


def _hex_bytes(mid: str) -> bytes | None:
    """A lowercase hex string (the HTTP grid's object ids, sha256) as its bytes; None otherwise."""
    try:
        packed = bytes.fromhex(mid)
    except ValueError:
        return None
    return packed if packed and packed.hex() == mid else None


_CODECS = (  # (encode, decode); an id is stored packed only if decode(encode(id)) == id
    (_uuid_bytes, lambda b: str(UUID(bytes=b))),
    (_hex_bytes, bytes.hex),
)


class MessageIds:
    """A first-in first-out queue of message ids, packed as bytes: the stream's pending ids.

    A ``str`` per id in a deque costs 93 B for a uuid and 121 B for a 64-character object id;
    here a uuid takes its 16 bytes and a lowercase hex id its 32, in one ``bytearray``. The
    codec and width are fixed by the first id; :meth:`popleft` gives back the exact string that
    went in. An id that does not fit (another format or length) turns the queue into plain
    strings from then on, in the same order, so any id Flower may give is kept exactly."""

    def __init__(self, ids: Iterable[str] = ()) -> None:
        self._codec: tuple[Callable[[str], bytes | None], Callable[[bytes], str]] | None = None
        self._width = 0
        self._buf = bytearray()
        self._start = 0  # bytes of _buf already taken from the front
        self._strings: deque[str] | None = None  # set once an id does not fit the codec
        self.extend(ids)

    def __len__(self) -> int:
        if self._strings is not None:
            return len(self._strings)
        return (len(self._buf) - self._start) // self._width if self._width else 0

    def __iter__(self) -> Iterator[str]:
        if self._strings is not None:
            yield from list(self._strings)
            return
        if self._codec is None:
            return
        decode, view = self._codec[1], bytes(self._buf[self._start:])
        for i in range(0, len(view), self._width):
            yield decode(view[i:i + self._width])

    def append(self, mid: str) -> None:
        if not isinstance(mid, str):
            raise TypeError(f"message ids are strings, got {type(mid).__name__}")
        if self._strings is not None:
            self._strings.append(mid)
            return
        if self._codec is None:
            for codec in _CODECS:
                packed = codec[0](mid)
                if packed is not None:
                    self._codec, self._width = codec, len(packed)
                    break
            else:
                self._to_strings().append(mid)
                return
        packed = self._codec[0](mid)
        if packed is None or len(packed) != self._width:
            self._to_strings().append(mid)
            return
        self._buf += packed

    def extend(self, ids: Iterable[str]) -> None:
        for mid in ids:
            self.append(mid)

    def popleft(self) -> str:
        if self._strings is not None:
            return self._strings.popleft()
        if not len(self):
            raise IndexError("pop from an empty MessageIds")
        end = self._start + self._width
        mid = self._codec[1](bytes(self._buf[self._start:end]))
        self._start = end
        if self._start >= 4096 and 2 * self._start >= len(self._buf):  # drop the taken front now and then
            del self._buf[:self._start]
            self._start = 0
        return mid

    def _to_strings(self) -> deque[str]:
        self._strings = deque(self)
        self._buf, self._start, self._codec, self._width = bytearray(), 0, None, 0
        return self._strings


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


def push_in_batches(grid: Grid, messages: Iterable[Message], batch: int = PUSH_BATCH) -> MessageIds:
    """Push ``messages`` ``batch`` at a time; the ids of those pushed, in order (a packed
    queue: the stream takes them from the front as it asks for their replies).

    ``Grid.push_messages`` needs a collection (the HTTP grid walks it twice), so each batch
    is a list, dropped once pushed. An empty round still makes one (empty) push, as pushing
    the whole list at once did."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    ids = MessageIds()
    remaining = iter(messages)
    chunk = list(islice(remaining, batch))
    while True:
        # the HTTP grid returns None for a message it could not push: nothing will answer it
        ids.extend(mid for mid in grid.push_messages(chunk) if mid)
        chunk = []  # the pushed batch goes before the next one is built
        chunk = list(islice(remaining, batch))
        if not chunk:
            return ids


def node_array(nodes: Iterable[int]) -> array:
    """``nodes`` as a sorted array of distinct uint64 ids (:data:`NODE_ARRAY`): 8 B per node.

    Flower's grids answer ``get_node_ids`` with a new list of new ints (about 40 B per node);
    this keeps none of them. Sorted and deduplicated in NumPy, so the only other copy made is
    8 B per node (a ``set`` and ``sorted`` of the ints would add about 70 B per node at once)."""
    ids = np.unique(np.fromiter(nodes, dtype=np.uint64))
    return array(NODE_ARRAY, ids.tobytes())


def _is_sorted(values: Sequence[int]) -> bool:
    return all(values[i] < values[i + 1] for i in range(len(values) - 1))


class NodeSet:
    """A set of node ids as one sorted array: membership by bisection, 8 B per node (none when
    the strategy's own sorted array is used), where a ``set`` of ints costs 30 to 60 B and a
    list of them about 40 B (what Flower's ``get_node_ids`` gives: it is not kept).

    Args:
        nodes: the node ids; a strictly increasing :data:`NODE_ARRAY` array is used as it is
            (no copy), anything else is sorted into one (:func:`node_array`).
    """

    def __init__(self, nodes: Iterable[int]) -> None:
        if isinstance(nodes, array) and nodes.typecode == NODE_ARRAY and _is_sorted(nodes):
            self.nodes: array = nodes
        else:
            self.nodes = node_array(nodes)

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
    """The sites' diagnostics of one round, kept as what the round log reports: per name, the
    sum over the sites that sent it, in arrival order, and how many did. So each mean is the
    float the per-site dicts gave, bit for bit, and nothing is kept per site (a dict per site
    cost ~250 B per site and round, columns 40 B; the diagnostics are not DP, so the server
    keeping less of them is also better).

    :meth:`add` takes one site's ``{name: value}`` (NaN counts as not sent); :meth:`to_state`
    is what the checkpoint saves, :meth:`from_state` reads it back, as well as the columns
    (tensors) and the ``{node: {name: value}}`` dicts older checkpoints hold."""

    def __init__(self, names: Iterable[str] = ()) -> None:
        self.sites = 0
        self.sums: dict[str, float] = {name: 0.0 for name in names}
        self.counts: dict[str, int] = {name: 0 for name in names}

    def __len__(self) -> int:
        return self.sites

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SiteDiagnostics) and (self.sites, self.sums, self.counts) == (
            other.sites, other.sums, other.counts)

    def add(self, values: Mapping[str, float]) -> None:
        """Fold in one site's diagnostics (each site once: the strategy lets each in once)."""
        self.sites += 1
        for name, value in values.items():
            value = float(value)
            if math.isnan(value):
                continue
            self.sums[name] = self.sums.get(name, 0.0) + value
            self.counts[name] = self.counts.get(name, 0) + 1

    def mean(self, name: str) -> float | None:
        """The mean of ``name`` over the sites that sent it (None: none did)."""
        count = self.counts.get(name, 0)
        return self.sums[name] / count if count else None

    def to_state(self) -> dict[str, Any]:
        """Plain numbers for ``torch.save``."""
        return {"sites": self.sites, "sums": dict(self.sums), "counts": dict(self.counts)}

    @classmethod
    def from_state(cls, state: Mapping[Any, Any]) -> "SiteDiagnostics":
        """Read :meth:`to_state`'s form, or an older checkpoint's: columns (``nodes`` and one
        float64 tensor per name, NaN where not sent) or ``{node: {name: value}}``."""
        out = cls()
        if "sums" in state:
            out.sites = int(state["sites"])
            out.sums = {name: float(v) for name, v in state["sums"].items()}
            out.counts = {name: int(v) for name, v in state["counts"].items()}
            if set(out.sums) != set(out.counts) or any(c < 0 or c > out.sites for c in out.counts.values()):
                raise ValueError("checkpointed diagnostics: the sums and counts do not match")
            return out
        if "nodes" in state:  # columns, one value per site
            sites = len(state["nodes"])
            columns = {name: col.tolist() for name, col in state["columns"].items()}
            if any(len(col) != sites for col in columns.values()):
                raise ValueError("checkpointed diagnostics: a column does not have one value per site")
            for i in range(sites):
                out.add({name: col[i] for name, col in columns.items()})
            return out
        for values in state.values():  # a dict per site
            out.add(values)
        return out
