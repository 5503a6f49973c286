"""Property-based tests of server/replies.py, the decoder every site reply goes through before
it can touch an aggregate: whatever a site sends (missing or extra tensors, wrong shapes or
dtypes, NaN/Inf, huge norms, error replies, malformed reports), the decoder either returns a
checked value or raises ReplyError, never another exception; valid input is always accepted."""

from __future__ import annotations

import math

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.common import Metadata
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from common import keys
from common.reasons import REPLY_MALFORMED, REPLY_SITE_ERROR
from server.replies import ReplyError, read_site_report, read_tree, read_vector

SHAPES = {"unet.x.lora_A.weight": (2, 3), "unet.x.lora_B.weight": (3,)}
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

dtypes = st.sampled_from([np.float16, np.float32, np.float64, np.int32, np.int64, np.uint8, np.bool_, np.complex64])
shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)
specials = st.sampled_from([0.0, 1.0, -1.0, 1e30, -1e30, 1e300, math.nan, math.inf, -math.inf, 5e-324])


@st.composite
def arrays(draw, shape=None):
    dtype = draw(dtypes)
    shape = draw(shapes) if shape is None else shape
    if np.dtype(dtype).kind == "f":
        elements = st.floats(width=np.dtype(dtype).itemsize * 8, allow_nan=True, allow_infinity=True) | specials
        elements = elements.map(lambda v: np.asarray(v).astype(dtype).item())
        return draw(hnp.arrays(dtype, shape, elements=elements))
    return draw(hnp.arrays(dtype, shape))


def meta(node: int = 5) -> Metadata:
    return Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0, reply_to_message_id="q",
                    group_id="1", created_at=0.0, ttl=60.0, message_type="train")


def message(tensors: dict[str, np.ndarray], metrics: dict | None = None) -> Message:
    content = RecordDict({keys.ARRAYS: ArrayRecord(array_dict={k: Array(v) for k, v in tensors.items()})})
    if metrics is not None:
        content[keys.METRICS] = MetricRecord(metrics)
    return Message(content=content, metadata=meta())


def check_tree(tree: dict, max_norm: float | None) -> None:
    assert set(tree) == set(SHAPES)
    for k, v in tree.items():
        assert tuple(v.shape) == SHAPES[k] and v.dtype.is_floating_point and bool(v.isfinite().all())
    if max_norm is not None:
        norm = math.sqrt(sum(float((v * v).sum()) for v in tree.values()))
        assert norm <= max_norm * (1 + 1e-5)


@FUZZ
@given(
    tensors=st.dictionaries(st.sampled_from([*SHAPES, "unet.other", ""]), arrays(), max_size=4),
    max_norm=st.none() | st.floats(min_value=1e-6, max_value=1e6),
)
def test_any_tensors_are_accepted_checked_or_refused_with_reply_error(tensors, max_norm):
    try:
        tree = read_tree(message(tensors), SHAPES, max_norm=max_norm)
    except ReplyError:
        return
    check_tree(tree, max_norm)


@FUZZ
@given(data=st.data(), max_norm=st.none() | st.floats(min_value=1e-3, max_value=1e3))
def test_right_keys_and_shapes_with_any_values_are_checked(data, max_norm):
    tensors = {k: data.draw(arrays(shape=s)) for k, s in SHAPES.items()}
    try:
        tree = read_tree(message(tensors), SHAPES, max_norm=max_norm)
    except ReplyError as err:
        assert str(err)
        return
    check_tree(tree, max_norm)


@FUZZ
@given(data=st.data(), clip=st.floats(min_value=1e-3, max_value=1e3), fraction=st.floats(min_value=0.0, max_value=1.0))
def test_valid_updates_are_always_accepted(data, clip, fraction):
    raw = {k: data.draw(hnp.arrays(np.float32, s, elements=st.floats(-1, 1, width=32))) for k, s in SHAPES.items()}
    norm = math.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in raw.values()))
    assume(norm > 0)
    scaled = {k: (v.astype(np.float64) * (clip * fraction / norm)).astype(np.float32) for k, v in raw.items()}
    tree = read_tree(message(scaled), SHAPES, max_norm=clip)
    for k, v in scaled.items():
        np.testing.assert_array_equal(tree[k].numpy(), v.astype(np.float64))


@FUZZ
@given(value=arrays(), dim=st.integers(min_value=0, max_value=5))
def test_vectors_are_checked_or_refused(value, dim):
    try:
        vec = read_vector(message({keys.EMBEDDING_SUM: value}), keys.EMBEDDING_SUM, dim)
    except ReplyError:
        return
    assert tuple(vec.shape) == (dim,) and bool(vec.isfinite().all())


numbers = st.integers(min_value=-(2**40), max_value=2**40) | st.floats(allow_nan=True, allow_infinity=True)


@FUZZ
@given(report=st.dictionaries(
    st.sampled_from([keys.SITE_NOISE_MULTIPLIER, keys.SITE_SAMPLE_RATE, keys.SITE_STEPS, keys.SITE_INDEX,
                     keys.SITE_EPSILON, "other"]), numbers, max_size=6))
def test_site_reports_are_checked_or_refused(report):
    try:
        msg = message({}, metrics=report)
    except Exception:  # Flower itself refuses some values (e.g. out-of-range ints): nothing to decode
        return
    try:
        parsed = read_site_report(msg)
    except ReplyError:
        return
    assert parsed.noise_multiplier >= 0 and 0 < parsed.sample_rate <= 1 and parsed.steps >= 1
    parsed.event(1, 5)  # enters the ledger: must be a valid PrivacyEvent


def test_error_replies_and_missing_records_are_reply_errors():
    bad = [
        Message(error=Error(code=0, reason="site crashed: CUDA out of memory"), metadata=meta()),
        Message(content=RecordDict({}), metadata=meta()),
        Message(content=RecordDict({keys.ARRAYS: ConfigRecord({"a": 1})}), metadata=meta()),
    ]
    for msg, public in zip(bad, (REPLY_SITE_ERROR, REPLY_MALFORMED, REPLY_MALFORMED)):
        for read in (lambda m: read_tree(m, SHAPES), lambda m: read_vector(m, keys.EMBEDDING_SUM, 3), read_site_report):
            try:
                read(msg)
            except ReplyError as err:
                assert err.public == public and "CUDA" not in str(err)  # a site's error text is never echoed
                continue
            raise AssertionError("accepted a reply without the record")
