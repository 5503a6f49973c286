"""Tests of server/replies.py's array reading: what np.load would give, or a named ReplyError."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.common import Metadata

from common import keys
from common.dp import GaussianSumMechanism
from common.dp.mechanism import sum_of_squares
from server.replies import ReplyError, read_tree, read_update, read_vector


def reply(arrays: dict[str, Array]) -> Message:
    meta = Metadata(run_id=1, message_id="r", src_node_id=3, dst_node_id=0, reply_to_message_id="q", group_id="1",
                    created_at=0.0, ttl=60.0, message_type="train")
    return Message(content=RecordDict({keys.ARRAYS: ArrayRecord(array_dict=arrays)}), metadata=meta)


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


@pytest.mark.parametrize("array", [
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4)),  # Fortran order on the wire
    np.arange(12, dtype=">f8").reshape(3, 4),  # big-endian float64
    np.arange(12, dtype=np.float16).reshape(3, 4),
])
def test_read_tree_gives_what_np_load_gives_in_float64(array):
    tree = read_tree(reply({"a": Array(array)}), {"a": (3, 4)})
    assert tree["a"].dtype == torch.float64
    assert torch.equal(tree["a"], torch.from_numpy(np.asarray(array, dtype=np.float64)))


def test_the_norm_bound_is_checked_on_the_float64_values():
    a = np.full((2, 2), 0.5, dtype=np.float32)  # flat norm exactly 1
    assert read_tree(reply({"a": Array(a)}), {"a": (2, 2)}, max_norm=1.0)["a"].sum() == 2.0
    with pytest.raises(ReplyError, match="L2 norm 2"):
        read_tree(reply({"a": Array(2 * a)}), {"a": (2, 2)}, max_norm=1.0)


@pytest.mark.parametrize("bad, match", [
    (np.array([[1.0, np.nan]], dtype=np.float32), "NaN or infinite"),
    (np.array([[np.inf, 0.0]], dtype=np.float32), "NaN or infinite"),
    (np.array([[1, 2]], dtype=np.int32), "floating-point"),
    (np.zeros((2, 1), dtype=np.float32), "shape"),
])
def test_bad_arrays_are_rejected_by_name(bad, match):
    with pytest.raises(ReplyError, match=match):
        read_tree(reply({"a": Array(bad)}), {"a": (1, 2)})


def test_huge_but_finite_values_are_not_called_infinite():
    big = np.full((1, 2), 3e38, dtype=np.float32)  # squares overflow float32, not float64
    assert torch.isfinite(read_tree(reply({"a": Array(big)}), {"a": (1, 2)})["a"]).all()


@pytest.mark.parametrize("data, match", [
    (npy(np.zeros(4, np.float32))[:-4], "data bytes"),  # truncated
    (npy(np.zeros(4, np.float32)) + b"\0\0\0\0", "data bytes"),  # trailing bytes
    (b"NOTNUMPY" + b"\0" * 40, "magic"),
    (npy(np.zeros(4, np.float32)).replace(b"'descr'", b"'dexcr'"), "header"),
])
def test_malformed_npy_bytes_are_rejected(data, match):
    arrays = {keys.EMBEDDING_SUM: Array(dtype="float32", shape=(4,), stype="numpy.ndarray", data=data)}
    with pytest.raises(ReplyError, match=match):
        read_vector(reply(arrays), keys.EMBEDDING_SUM, 4)


def test_other_serializations_are_rejected():
    arrays = {keys.EMBEDDING_SUM: Array(dtype="float32", shape=(4,), stype="torch.raw", data=b"\0" * 16)}
    with pytest.raises(ReplyError, match="serialization"):
        read_vector(reply(arrays), keys.EMBEDDING_SUM, 4)


def test_add_bounded_is_add_of_bound_tree():
    mechanism = GaussianSumMechanism(clip_norm=1.0, noise_multiplier=0.0)
    g = torch.Generator().manual_seed(0)
    records = [{"a": torch.randn(3, 4, generator=g, dtype=torch.float64) * s, "b": torch.randn(5, generator=g,
                                                                                               dtype=torch.float64) * s}
               for s in (0.1, 3.0, 0.2, 10.0)]  # within the bound and clipped, mixed
    fused, reference = None, None
    for record in records:
        fused = mechanism.add_bounded(fused, record)
        reference = mechanism.add(reference, mechanism.bound_tree(record))
    for k in reference:
        torch.testing.assert_close(fused[k], reference[k], rtol=1e-15, atol=1e-15)
    assert torch.equal(mechanism.add_bounded(None, records[0])["a"], records[0]["a"])  # within C: unchanged
    assert records[0]["a"] is not mechanism.add_bounded(None, records[0])["a"]  # ... and copied, not aliased
    with pytest.raises(ValueError, match="keys"):
        mechanism.add_bounded(fused, {"a": records[0]["a"]})


def test_read_update_gives_read_only_views_as_sent_and_the_float64_norm():
    a = np.arange(12, dtype=np.float32).reshape(3, 4) / 100
    b = np.asfortranarray(np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3))
    update, norm = read_update(reply({"a": Array(a), "b": Array(b)}), {"a": (3, 4), "b": (2, 3)}, max_norm=2.0)
    for key, sent in (("a", a), ("b", b)):
        assert update[key].dtype == np.float32 and not update[key].flags.writeable
        np.testing.assert_array_equal(update[key], sent)
    assert norm == float(GaussianSumMechanism.tree_norm({"a": torch.from_numpy(a), "b": torch.from_numpy(b)}))
    assert math.isclose(norm, math.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in (a, b))), rel_tol=1e-14)
    with pytest.raises(ReplyError, match="L2 norm"):
        read_update(reply({"a": Array(a), "b": Array(b)}), {"a": (3, 4), "b": (2, 3)}, max_norm=norm * 0.99)


def test_add_bounded_on_wire_arrays_is_add_of_bound_tree_bit_for_bit():
    """The server's path (float32 views, norm from read_update, NumPy adds) against the
    reference float64 arithmetic: add(total, bound_tree(record)), records within C and clipped."""
    mechanism = GaussianSumMechanism(clip_norm=1.0, noise_multiplier=0.0)
    rng = np.random.default_rng(0)
    shapes = {"a": (3, 70_000), "b": (5,)}  # "a" spans several of sum_of_squares' chunks
    fused, reference = None, None
    for scale in (1e-3, 0.5, 1e-3, 2.0):  # within the bound, clipped, within, clipped
        sent = {k: (rng.standard_normal(s) * scale / math.sqrt(math.prod(s))).astype(np.float32)
                for k, s in shapes.items()}
        record = {k: torch.from_numpy(v.astype(np.float64)) for k, v in sent.items()}
        message = reply({k: Array(v) for k, v in sent.items()})
        update, norm = read_update(message, shapes)
        fused = mechanism.add_bounded(fused, update, norm=norm)
        reference = mechanism.add(reference, mechanism.bound_tree(record))
        assert norm == float(mechanism.tree_norm(record))
    for k in reference:
        assert fused[k].dtype == torch.float64
        assert torch.equal(fused[k], reference[k])


@pytest.mark.parametrize("blocks", [[1, 1, 1, 1, 1], [3, 2], [5]])
def test_blocks_of_wire_arrays_are_add_of_bound_tree_bit_for_bit(blocks):
    """read_update's records (float32 and float16 on the wire, C and Fortran order, a tensor
    spanning several of the sum's runs) summed in blocks, clipped ones among them, against
    add(total, bound_tree(record)) one record at a time."""
    mechanism = GaussianSumMechanism(clip_norm=1.0, noise_multiplier=0.0)
    rng = np.random.default_rng(1)
    shapes = {"a": (3, 70_000), "b": (5,), "c": (4, 6), "d": (2, 3)}
    messages, reference = [], None
    for scale in (0.5, 3.0, 1e-3, 1.0, 2.0):
        sent = {k: (rng.standard_normal(s) * scale / math.sqrt(3 * 70_000 + 35)).astype(np.float32)
                for k, s in shapes.items()}
        sent["c"] = np.asfortranarray(sent["c"])
        sent["d"] = sent["d"].astype(np.float16)
        messages.append(reply({k: Array(v) for k, v in sent.items()}))
        reference = mechanism.add(reference, mechanism.bound_tree({k: torch.from_numpy(v.astype(np.float64))
                                                                    for k, v in sent.items()}))
    total, start = None, 0
    for size in blocks:
        read = [read_update(m, shapes) for m in messages[start:start + size]]
        total = mechanism.add_bounded_block(total, [u for u, _ in read], [n for _, n in read])
        start += size
    for k in reference:
        assert torch.equal(total[k].contiguous().view(torch.int64), reference[k].contiguous().view(torch.int64)), k


def test_add_bounded_falls_back_to_torch_for_dtypes_numpy_lacks():
    mechanism = GaussianSumMechanism(clip_norm=1.0, noise_multiplier=0.0)
    records = [{"a": torch.full((4,), v, dtype=torch.bfloat16)} for v in (0.25, 2.0)]  # within C, clipped
    fused, reference = None, None
    for record in records:
        fused = mechanism.add_bounded(fused, record)
        reference = mechanism.add(reference, mechanism.bound_tree(record))
    assert torch.equal(fused["a"], reference["a"])


@pytest.mark.parametrize("value", [
    np.linspace(-3, 3, 200_001, dtype=np.float32),  # several chunks
    np.asfortranarray(np.arange(12, dtype=np.float16).reshape(3, 4)),
    np.arange(6, dtype=">f8"),
])
def test_sum_of_squares_is_the_float64_sum_of_squares(value):
    exact = math.fsum(float(x) ** 2 for x in value.ravel().astype(np.float64))
    assert math.isclose(sum_of_squares(value), exact, rel_tol=1e-12)
    assert math.isclose(sum_of_squares(torch.from_numpy(value.astype(np.float32))), exact, rel_tol=1e-6)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_sum_of_squares_is_not_finite_when_an_entry_is_not(bad):
    value = np.zeros(100_000, dtype=np.float32)
    value[70_000] = bad
    assert not math.isfinite(sum_of_squares(value))


def packed_reply(sent: dict[str, np.ndarray]) -> Message:
    from common.wire import packed_record

    return Message(content=RecordDict({keys.ARRAYS: packed_record({k: torch.from_numpy(v) for k, v in sent.items()})}),
                   metadata=reply({}).metadata)


def test_a_packed_reply_reads_as_its_per_tensor_twin_bit_for_bit():
    """common.wire.packed_record (one Array for the whole adapter, what sites send) gives the
    same checked views, shapes and norm as one Array per tensor, and the same sums."""
    mechanism = GaussianSumMechanism(clip_norm=1.0, noise_multiplier=0.0)
    rng = np.random.default_rng(1)
    shapes = {"a": (3, 70_000), "b": (5,), "c": (2, 3)}
    packed_sum = twin_sum = None
    for scale in (1e-3, 2.0):  # within the bound, clipped
        sent = {k: (rng.standard_normal(s) * scale / math.sqrt(math.prod(s))).astype(np.float32) for k, s in shapes.items()}
        packed, norm = read_update(packed_reply(sent), shapes, max_norm=None)
        twin, twin_norm = read_update(reply({k: Array(v) for k, v in sent.items()}), shapes)
        assert norm == twin_norm and list(packed) == list(shapes)
        for key in shapes:
            assert packed[key].shape == shapes[key] and not packed[key].flags.writeable
            np.testing.assert_array_equal(packed[key], sent[key])
        packed_sum = mechanism.add_bounded(packed_sum, packed, norm=norm)
        twin_sum = mechanism.add_bounded(twin_sum, twin, norm=twin_norm)
    for k in shapes:
        assert torch.equal(packed_sum[k], twin_sum[k])


@pytest.mark.parametrize("change, match", [
    (lambda s: {**s, "b": np.zeros(6, np.float32)}, "not this adapter's"),
    (lambda s: {"b": s["b"], "a": s["a"]}, "not this adapter's"),  # same size, other order
    (lambda s: {**s, "b": np.full(5, np.nan, np.float32)}, "NaN or infinite"),
    (lambda s: {k: v * 100 for k, v in s.items()}, "L2 norm"),
])
def test_bad_packed_replies_are_rejected(change, match):
    shapes = {"a": (3, 3), "b": (5,)}
    sent = {"a": np.full((3, 3), 0.01, np.float32), "b": np.zeros(5, np.float32)}
    read_update(packed_reply(sent), shapes, max_norm=1.0)  # as sent: accepted
    with pytest.raises(ReplyError, match=match):
        read_update(packed_reply(change(sent)), shapes, max_norm=1.0)


def test_a_packed_reply_of_the_right_layout_but_the_wrong_size_is_refused():
    from common.wire import packed_key

    shapes = {"a": (3, 3), "b": (5,)}
    message = reply({packed_key(shapes): Array(np.zeros(13, np.float32))})
    with pytest.raises(ReplyError, match=r"has shape \(13,\), expected \(14,\)"):
        read_update(message, shapes)


def test_packed_replies_in_blocks_sum_as_their_per_tensor_twins_bit_for_bit():
    """A packed reply is held whole (one contiguous view) and the blocked sum walks it as one
    array: blocks of packed replies, clipped and unclipped mixed, a fresh sum and a running
    one, and a block that mixes packed and per-tensor replies, all give the per-tensor sum
    bit for bit (run boundaries inside the large tensor and across the small ones)."""
    from common.wire import Layout

    mechanism = GaussianSumMechanism(clip_norm=1.0, noise_multiplier=0.0)
    rng = np.random.default_rng(7)
    shapes = Layout({"a": (3, 70_000), "b": (5,), "c": (2, 3), "d": (50_000,)})
    sent = []
    for scale in (0.3, 1.0, 2.5, 0.999, 7.0, 1.0, 0.01):  # at C too: float32 rounding re-clips some
        tree = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
        norm = math.sqrt(sum(float(np.dot(v.ravel().astype(np.float64), v.ravel().astype(np.float64)))
                             for v in tree.values()))
        sent.append({k: (v * np.float32(scale / norm)).astype(np.float32) for k, v in tree.items()})
    packed = [read_update(packed_reply(s), shapes) for s in sent]
    twins = [read_update(reply({k: Array(v) for k, v in s.items()}), shapes) for s in sent]
    assert all(r.whole is not None for r, _ in packed) and all(r.whole is None for r, _ in twins)
    assert [n for _, n in packed] == [n for _, n in twins]

    def blocked(pairs, sizes):
        total, start = None, 0
        for size in sizes:
            block = pairs[start:start + size]
            total = mechanism.add_bounded_block(total, [r for r, _ in block], [n for _, n in block])
            start += size
        return {k: total[k].clone() for k in shapes}

    reference = blocked(twins, [1] * len(sent))
    mixed = [packed[i] if i % 2 else twins[i] for i in range(len(sent))]
    for pairs, sizes in ((packed, [7]), (packed, [3, 4]), (packed, [1] * 7), (mixed, [4, 3])):
        total = blocked(pairs, sizes)
        for k in shapes:
            assert torch.equal(total[k].view(torch.int64), reference[k].view(torch.int64)), (sizes, k)


def test_a_packed_reply_with_nan_names_the_tensor():
    shapes = {"a": (3, 3), "b": (5,), "c": (2,)}
    sent = {"a": np.zeros((3, 3), np.float32), "b": np.array([0, 0, np.inf, 0, 0], np.float32),
            "c": np.zeros(2, np.float32)}
    with pytest.raises(ReplyError, match="^b has NaN or infinite entries"):
        read_update(packed_reply(sent), shapes, max_norm=1.0)
