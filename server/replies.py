"""Checks on what sites send back, before anything touches an aggregate.

Every reader raises :class:`ReplyError` with a reason that names what is wrong; the
strategies log it with the node, leave that reply out of the round and go on with the others.
That text is the server's own (built here, never from a site's error text) and goes to the
server log only: what an output may keep is :attr:`ReplyError.public`, one of
:data:`common.reasons.REJECTION_REASONS`. A site's error reply is never echoed: its reason
(a site's message, possibly with Flower's or Ray's traceback) may name private files.
"""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord

from common import keys
from common.dp import PrivacyEvent
from common.dp.flatsum import FlatRecord, flat_sum_of_squares
from common.dp.mechanism import site_scope
from common.reasons import REPLY_MALFORMED, REPLY_SITE_ERROR
from common.wire import Layout, as_layout, check_layout, packed_array_key


class ReplyError(ValueError):
    """A site's reply that cannot enter the aggregate.

    Its text (for the server log) says what the server's checks found; ``public`` is the
    fixed reason an output may hold (whether a reply was malformed in this or that way can
    depend on the site's data, e.g. a norm above the bound)."""

    def __init__(self, detail: str, public: str = REPLY_MALFORMED) -> None:
        super().__init__(detail)
        self.public = public


def _record(reply: Message, name: str, kind: type):
    """The record ``name`` of a reply, of type ``kind``; an error reply or a missing record
    is a :class:`ReplyError`."""
    if reply.has_error():  # the site's text is not echoed, not even to the server log
        raise ReplyError(f"{REPLY_SITE_ERROR} (error code {reply.error.code})", public=REPLY_SITE_ERROR)
    record = reply.content.get(name)
    if not isinstance(record, kind):
        raise ReplyError(f"reply has no {name} record")
    return record


def _arrays(reply: Message) -> ArrayRecord:
    return _record(reply, keys.ARRAYS, ArrayRecord)


# .npy preambles (magic, version, header length, header) read and checked so far ->
# (dtype, Fortran order, shape, entries, file length). Every reply of a run carries the same few
# preambles, one per adapter tensor shape, so checking each once (not once per tensor per
# reply, as ``Array.numpy()``'s ``np.load`` does) leaves one dict lookup per tensor.
_NPY_PREAMBLES: dict[bytes, tuple[np.dtype, bool, tuple[int, ...], int, int]] = {}
_NPY_PREAMBLES_MAX = 4096
_NPY_MAGIC = b"\x93NUMPY"


def _data_start(data: bytes, key: str) -> int:
    """Where a .npy file's data begins (after magic, version, header length and header)."""
    if len(data) < 10 or not data.startswith(_NPY_MAGIC) or data[6] not in (1, 2, 3):
        raise ReplyError(f"{key} is not a valid .npy array (bad magic or version)")
    if data[6] == 1:  # header length field: uint16 in version 1, uint32 after
        return 10 + (data[8] | data[9] << 8)
    return 12 + int.from_bytes(data[8:12], "little")


def _npy_preamble(data: bytes, start: int, key: str) -> tuple[np.dtype, bool, tuple[int, ...], int, int]:
    """Check and parse the preamble ``data[:start]`` of a floating-point .npy array (a header
    of any other kind, object, structured, integer..., is a ReplyError), and remember it."""
    _data_start(data, key)  # magic and version
    try:
        d = ast.literal_eval(data[10 if data[6] == 1 else 12:start].decode("latin1"))
        dtype = np.lib.format.descr_to_dtype(d["descr"])
        shape = tuple(int(n) for n in d["shape"])
        fortran = bool(d["fortran_order"])
    except (ValueError, SyntaxError, KeyError, TypeError) as err:
        raise ReplyError(f"{key} is not a valid .npy array: bad header ({err})") from None
    if min(shape, default=0) < 0:
        raise ReplyError(f"{key} has a negative dimension {shape}")
    if dtype.hasobject or dtype.fields is not None or dtype.itemsize == 0 or dtype.kind != "f":
        raise ReplyError(f"{key} has dtype {dtype}, expected a floating-point type")
    count = math.prod(shape)
    parsed = (dtype, fortran, shape, count, start + count * dtype.itemsize)
    if len(_NPY_PREAMBLES) < _NPY_PREAMBLES_MAX:
        _NPY_PREAMBLES[data[:start]] = parsed
    return parsed


def _flat_floating(array: Array, key: str) -> tuple[np.ndarray, tuple[int, ...], bool, int]:
    """The floating-point array in one of a reply's ``Array``: its entries as a read-only 1-D
    view of the message bytes in memory order, its shape, whether that order is Fortran's,
    and its number of entries.

    Reads the .npy bytes Flower's ``Array`` carries (``stype`` "numpy.ndarray", written by
    ``np.save``) as ``np.load`` does, for plain (non-object) dtypes: magic, version, header
    (dtype, Fortran order, shape), then exactly prod(shape) items. Run once per tensor per
    reply, hence the known-preamble lookup first (a version-1 preamble is the first
    10 + uint16 at bytes 8-9 bytes; anything else, or anything new, is checked in full)."""
    if array.stype != "numpy.ndarray":
        raise ReplyError(f"{key} has serialization {array.stype!r}, expected 'numpy.ndarray'")
    data = array.data
    start = 10 + (data[8] | data[9] << 8) if len(data) >= 10 and data[6] == 1 else _data_start(data, key)
    parsed = _NPY_PREAMBLES.get(data[:start]) or _npy_preamble(data, start, key)
    dtype, fortran, shape, count, length = parsed
    if len(data) != length:
        raise ReplyError(f"{key} holds {len(data) - start} data bytes, expected {length - start} for {shape}")
    return np.frombuffer(data, dtype, count, start), shape, fortran, count  # positional: keywords cost 2x here


def _finite_squares(flats: list[np.ndarray], names: list[str], sizes: tuple[int, ...] | None = None) -> float:
    """sum(x^2) over ``flats`` in float64 (:func:`common.dp.flatsum.flat_sum_of_squares`);
    it is finite iff every entry is (squares of float32-range values cannot overflow float64),
    so this one pass also rejects NaN and infinities (naming the first array that has one)."""
    squares = flat_sum_of_squares(flats, sizes)
    if not math.isfinite(squares):
        bad = next((name for name, flat in zip(names, flats) if not np.isfinite(flat).all()), names[0])
        raise ReplyError(f"{bad} has NaN or infinite entries")
    return squares


def _float64(value: np.ndarray) -> torch.Tensor:
    """A C-ordered float64 tensor copy of ``value`` (exact for float16/32 input)."""
    return torch.from_numpy(value.astype(np.float64, order="C"))


def read_vector_view(reply: Message, key: str, dim: int) -> np.ndarray:
    """The vector ``key`` of a site's reply as sent (a READ-ONLY view of the message bytes),
    checked: no error, present, shape (dim,), floating point, finite."""
    arrays = _arrays(reply)
    if key not in arrays:
        raise ReplyError(f"reply has no {keys.ARRAYS}/{key}")
    flat, shape, _, count = _flat_floating(arrays[key], key)
    if shape != (dim,):
        raise ReplyError(f"{key} has shape {shape}, expected ({dim},)")
    _finite_squares([flat], [key], (count,))
    return flat


def read_vector(reply: Message, key: str, dim: int) -> torch.Tensor:
    """:func:`read_vector_view` as a float64 tensor (a copy: exact for float16/32)."""
    return _float64(read_vector_view(reply, key, dim))


def _in_order(arrays: ArrayRecord, shapes: Mapping[str, tuple[int, ...]]) -> Iterable[tuple[str, Array]]:
    """The reply's (key, Array) pairs in the order of ``shapes``, once their keys are known
    to be the same: straight from the record when it lists them in that order (a site sends
    them so), which spares a lookup per tensor."""
    if list(arrays) == list(shapes):
        return arrays.items()
    return ((key, arrays[key]) for key in shapes)


def read_update(reply: Message, shapes: Mapping[str, tuple[int, ...]], *,
                max_norm: float | None = None) -> tuple[FlatRecord, float]:
    """A site's update as sent, checked, and its flat L2 norm: ``(arrays, norm)``.

    The reply holds one Array per tensor, or the whole adapter packed in one Array
    (:func:`common.wire.packed_record`, what sites send), whose key must name the layout of
    ``shapes`` and whose length must be theirs; either way the checks are then
    :func:`read_tree`'s: exactly the keys of ``shapes``, those shapes,
    floating point, finite, and flat L2 norm (accumulated in float64) at most ``max_norm``
    with a relative slack of 1e-5 for float32 transport, when given. The arrays are
    READ-ONLY NumPy views of the message bytes in the wire's dtype (float32 from a site),
    by key in the order of ``shapes`` (a :class:`~common.dp.flatsum.FlatRecord`): no
    float64 copy is made. The norm is :meth:`common.dp.GaussianSumMechanism.tree_norm`'s
    (the same :func:`~common.dp.flatsum.flat_sum_of_squares` over the arrays in key order,
    bit for bit). Pass both to :meth:`~common.dp.GaussianSumMechanism.add_bounded_block`
    (or ``add_bounded``), which then neither converts nor measures the record again."""
    arrays = _arrays(reply)
    if (packed := packed_array_key(arrays)) is not None:
        return _read_packed(arrays[packed], packed, shapes, max_norm)
    if arrays.keys() != shapes.keys():
        missing, extra = sorted(set(shapes) - set(arrays)), sorted(set(arrays) - set(shapes))
        raise ReplyError(f"reply tensors do not match the adapter: {len(missing)} missing (e.g. {missing[:1]}), "
                         f"{len(extra)} unexpected (e.g. {extra[:1]})")
    names, expected = list(shapes), list(shapes.values())
    flats: list[np.ndarray] = []
    sent_shapes: list[tuple[int, ...]] = []  # the parsed preambles' own tuples: cheap to compare later
    counts: list[int] = []
    for (key, array), shape in zip(_in_order(arrays, shapes), expected):
        flat, sent, fortran, count = _flat_floating(array, key)
        if sent != shape and sent != tuple(shape):
            raise ReplyError(f"{key} has shape {sent}, expected {tuple(shape)}")
        flats.append(_c_order(flat, sent) if fortran else flat)
        sent_shapes.append(sent)
        counts.append(count)
    norm = math.sqrt(_finite_squares(flats, names, tuple(counts)))
    _check_bound(norm, max_norm)
    return FlatRecord(names, sent_shapes, flats), norm


def _check_bound(norm: float, max_norm: float | None) -> None:
    """The clip bound, with a relative slack of 1e-5 for float32 transport."""
    if max_norm is not None and norm > max_norm * (1 + 1e-5):
        raise ReplyError(f"update has L2 norm {norm:.6g}, above the clip bound {max_norm:g}")


def _read_packed(array: Array, key: str, shapes: Mapping[str, tuple[int, ...]],
                 max_norm: float | None) -> tuple[FlatRecord, float]:
    """:func:`read_update` for a packed reply (:func:`common.wire.packed_record`): one 1-D
    floating-point array of exactly the adapter's number of entries, held whole (a read-only
    view, cut into the tensors' views in the order of ``shapes`` only if asked); the same
    finite and norm checks. The norm walks the whole array in the runs it walks the views in:
    the same float, bit for bit. Pass a :class:`common.wire.Layout` as ``shapes`` to spare
    the layout's digest per reply."""
    layout: Layout = as_layout(shapes)
    try:
        check_layout(key, layout)
    except ValueError as err:
        raise ReplyError(str(err)) from None
    flat, sent, _, count = _flat_floating(array, key)
    if len(sent) != 1 or count != layout.total:
        raise ReplyError(f"{key} has shape {sent}, expected ({layout.total},) for the adapter's {len(layout)} tensors")
    record = FlatRecord(layout.names, layout.shape_list, whole=flat, offsets=layout.offsets)
    squares = flat_sum_of_squares([flat], (count,))
    if not math.isfinite(squares):  # name the tensor that has it
        _finite_squares(record.flats, layout.names, layout.sizes)
        raise ReplyError(f"{key} has NaN or infinite entries")
    norm = math.sqrt(squares)
    _check_bound(norm, max_norm)
    return record, norm


def _c_order(flat: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The entries of a Fortran-ordered array (``flat``, memory order) in C order: a read-only copy."""
    out = flat.reshape(shape, order="F").reshape(-1)
    out.flags.writeable = False
    return out


def read_tree(reply: Message, shapes: Mapping[str, tuple[int, ...]], *, max_norm: float | None = None) -> dict[str, torch.Tensor]:
    """The float64 tensors of a site's reply, checked against the expected ``shapes``:
    exactly those keys, those shapes, floating point, finite, and flat L2 norm at most
    ``max_norm`` (with a relative slack of 1e-5 for float32 transport) when given.
    (:func:`read_update` makes the same checks without the float64 copies.)"""
    return {key: _float64(value) for key, value in read_update(reply, shapes, max_norm=max_norm)[0].items()}


@dataclass(frozen=True)
class SiteReport:
    """The public privacy parameters a site reports with its DP-SGD update."""

    index: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon: float  # the site's own record-level epsilon over all its rounds (PRV), may be inf

    def event(self, server_round: int, node: int) -> PrivacyEvent:
        return PrivacyEvent.dpsgd(self.noise_multiplier, self.sample_rate, self.steps, scope=site_scope(self.index),
                                  label=f"dp-sgd round {server_round} (node {node})")

    def check_planned(self, planned: PrivacyEvent) -> None:
        """Raise :class:`ReplyError` if the reported (z, q, steps) are not the plan's (the one
        the sites were told and the budget is checked with). The spend is recorded anyway."""
        reported = PrivacyEvent.planned(self.noise_multiplier, self.sample_rate, self.steps, planned.unit)
        if not reported.spends_as(planned):
            raise ReplyError(f"reported DP-SGD parameters (z={self.noise_multiplier:.6g}, q={self.sample_rate:.6g}, "
                             f"{self.steps} steps) are not the plan's (z={planned.noise_multiplier:.6g}, "
                             f"q={planned.sample_rate:.6g}, {planned.steps} steps)")


def _number(metrics: MetricRecord, key: str) -> float:
    if key not in metrics:
        raise ReplyError(f"reply has no {keys.METRICS}/{key}")
    value = metrics[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ReplyError(f"{key} must be a number, got {value!r}")
    return float(value)


def read_site_report(reply: Message) -> SiteReport:
    """The privacy parameters in a site's reply, checked (they enter the ledger)."""
    metrics = _record(reply, keys.METRICS, MetricRecord)
    z = _number(metrics, keys.SITE_NOISE_MULTIPLIER)
    q = _number(metrics, keys.SITE_SAMPLE_RATE)
    steps = _number(metrics, keys.SITE_STEPS)
    index = _number(metrics, keys.SITE_INDEX)
    eps = _number(metrics, keys.SITE_EPSILON)
    if not (math.isfinite(z) and z >= 0):
        raise ReplyError(f"{keys.SITE_NOISE_MULTIPLIER} must be finite and >= 0, got {z}")
    if not (0 < q <= 1):
        raise ReplyError(f"{keys.SITE_SAMPLE_RATE} must be in (0, 1], got {q}")
    if not (steps.is_integer() and steps >= 1):
        raise ReplyError(f"{keys.SITE_STEPS} must be an integer >= 1, got {steps}")
    if not (index.is_integer() and index >= 0):
        raise ReplyError(f"{keys.SITE_INDEX} must be an integer >= 0, got {index}")
    if math.isnan(eps) or eps < 0:
        raise ReplyError(f"{keys.SITE_EPSILON} must be >= 0 (or inf), got {eps}")
    return SiteReport(index=int(index), noise_multiplier=z, sample_rate=q, steps=int(steps), epsilon=eps)


def read_diagnostics(reply: Message, names: tuple[str, ...]) -> dict[str, float]:
    """The finite numbers among ``names`` in a reply's metrics (absent or malformed ones are
    skipped: diagnostics never decide whether a reply enters the aggregate)."""
    metrics = reply.content.get(keys.METRICS) if not reply.has_error() else None
    out: dict[str, float] = {}
    if isinstance(metrics, MetricRecord):
        for name in names:
            value = metrics.get(name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                out[name] = float(value)
    return out
