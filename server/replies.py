"""Checks on what sites send back, before anything touches an aggregate.

Every reader raises :class:`ReplyError` with a reason that names what is wrong; the
strategies log it with the node, leave that reply out of the round and go on with the others.
"""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MetricRecord

from common import keys
from common.dp import PrivacyEvent
from common.dp.mechanism import sum_of_squares


class ReplyError(ValueError):
    """A site's reply that cannot enter the aggregate."""


def _record(reply: Message, name: str, kind: type):
    """The record ``name`` of a reply, of type ``kind``; an error reply or a missing record
    is a :class:`ReplyError`."""
    if reply.has_error():
        raise ReplyError(f"site reported an error: {reply.error.reason}")
    record = reply.content.get(name)
    if not isinstance(record, kind):
        raise ReplyError(f"reply has no {name} record")
    return record


def _arrays(reply: Message) -> ArrayRecord:
    return _record(reply, keys.ARRAYS, ArrayRecord)


# npy headers parsed so far (header bytes -> dtype, Fortran order, shape). Every reply of a run
# carries the same few headers, one per adapter tensor shape, so parsing each once (not once per
# tensor per reply, as ``Array.numpy()``'s ``np.load`` does) removes most of the per-tensor cost.
_NPY_HEADERS: dict[bytes, tuple[np.dtype, bool, tuple[int, ...]]] = {}
_NPY_HEADERS_MAX = 4096


def _npy_header(header: bytes, key: str) -> tuple[np.dtype, bool, tuple[int, ...]]:
    parsed = _NPY_HEADERS.get(header)
    if parsed is None:
        try:
            d = ast.literal_eval(header.decode("latin1"))
            dtype = np.lib.format.descr_to_dtype(d["descr"])
            shape = tuple(int(n) for n in d["shape"])
            parsed = (dtype, bool(d["fortran_order"]), shape)
        except (ValueError, SyntaxError, KeyError, TypeError) as err:
            raise ReplyError(f"{key} is not a valid .npy array: bad header ({err})") from None
        if min(shape, default=0) < 0:
            raise ReplyError(f"{key} has a negative dimension {shape}")
        if len(_NPY_HEADERS) < _NPY_HEADERS_MAX:
            _NPY_HEADERS[header] = parsed
    return parsed


def _ndarray(arrays: ArrayRecord, key: str) -> np.ndarray:
    """The array ``key`` of a reply, as a read-only view of the message bytes.

    Reads the .npy bytes Flower's ``Array`` carries (``stype`` "numpy.ndarray", written by
    ``np.save``) as ``np.load`` does, for plain (non-object) dtypes: magic, version, header
    (dtype, Fortran order, shape), then exactly prod(shape) items."""
    array = arrays[key]
    if array.stype != "numpy.ndarray":
        raise ReplyError(f"{key} has serialization {array.stype!r}, expected 'numpy.ndarray'")
    data = array.data
    if data[:6] != b"\x93NUMPY" or len(data) < 10 or data[6] not in (1, 2, 3):
        raise ReplyError(f"{key} is not a valid .npy array (bad magic or version)")
    size = 2 if data[6] == 1 else 4  # header length field: uint16 in version 1, uint32 after
    start = 8 + size + int.from_bytes(data[8:8 + size], "little")
    dtype, fortran, shape = _npy_header(data[8 + size:start], key)
    if dtype.hasobject or dtype.fields is not None or dtype.itemsize == 0:
        raise ReplyError(f"{key} has dtype {dtype}, expected a floating-point type")
    count = math.prod(shape)
    if len(data) - start != count * dtype.itemsize:
        raise ReplyError(f"{key} holds {len(data) - start} data bytes, expected {count * dtype.itemsize} for {shape}")
    return np.frombuffer(data, dtype=dtype, count=count, offset=start).reshape(shape, order="F" if fortran else "C")


def _floating(arrays: ArrayRecord, key: str) -> np.ndarray:
    """The floating-point array ``key`` of a reply, as a read-only view of the message bytes."""
    array = _ndarray(arrays, key)
    if array.dtype.kind != "f":  # np.issubdtype(dtype, np.floating), without its per-call cost
        raise ReplyError(f"{key} has dtype {array.dtype}, expected a floating-point type")
    return array


def _finite_squares(value: np.ndarray, key: str) -> float:
    """sum(value^2) in float64 (:func:`common.dp.mechanism.sum_of_squares`); it is finite iff
    every entry is (squares of float32-range values cannot overflow float64), so this one
    pass also rejects NaN and infinities."""
    squares = sum_of_squares(value)
    if not math.isfinite(squares):
        raise ReplyError(f"{key} has NaN or infinite entries")
    return squares


def _float64(value: np.ndarray) -> torch.Tensor:
    """A C-ordered float64 tensor copy of ``value`` (exact for float16/32 input)."""
    return torch.from_numpy(value.astype(np.float64, order="C"))


def read_vector(reply: Message, key: str, dim: int) -> torch.Tensor:
    """The float64 vector ``key`` of a site's reply, checked: no error, present, shape
    (dim,), floating point, finite."""
    arrays = _arrays(reply)
    if key not in arrays:
        raise ReplyError(f"reply has no {keys.ARRAYS}/{key}")
    value = _floating(arrays, key)
    if value.shape != (dim,):
        raise ReplyError(f"{key} has shape {tuple(value.shape)}, expected ({dim},)")
    _finite_squares(value, key)
    return _float64(value)


def read_update(reply: Message, shapes: Mapping[str, tuple[int, ...]], *,
                max_norm: float | None = None) -> tuple[dict[str, np.ndarray], float]:
    """A site's update as sent, checked, and its flat L2 norm: ``(arrays, norm)``.

    The checks are :func:`read_tree`'s: exactly the keys of ``shapes``, those shapes,
    floating point, finite, and flat L2 norm (accumulated in float64) at most ``max_norm``
    with a relative slack of 1e-5 for float32 transport, when given. The arrays are
    READ-ONLY NumPy views of the message bytes in the wire's dtype (float32 from a site):
    no float64 copy is made. Pass both to
    :meth:`common.dp.GaussianSumMechanism.add_bounded` (``add_bounded(total, arrays,
    norm=norm)``), which then neither converts nor measures the record again."""
    arrays = _arrays(reply)
    missing = sorted(set(shapes) - set(arrays))
    extra = sorted(set(arrays) - set(shapes))
    if missing or extra:
        raise ReplyError(f"reply tensors do not match the adapter: {len(missing)} missing (e.g. {missing[:1]}), "
                         f"{len(extra)} unexpected (e.g. {extra[:1]})")
    update: dict[str, np.ndarray] = {}
    squares = 0.0
    for key, shape in shapes.items():
        value = _floating(arrays, key)
        if value.shape != tuple(shape):
            raise ReplyError(f"{key} has shape {value.shape}, expected {tuple(shape)}")
        squares += _finite_squares(value, key)
        update[key] = value
    norm = math.sqrt(squares)
    if max_norm is not None and norm > max_norm * (1 + 1e-5):
        raise ReplyError(f"update has L2 norm {norm:.6g}, above the clip bound {max_norm:g}")
    return update, norm


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
        return PrivacyEvent(
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
            steps=self.steps,
            unit="record",
            scope=f"site-{self.index}",
            label=f"dp-sgd round {server_round} (node {node})",
        )


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
