"""common.wire: the adapter's two wire layouts (one Array per tensor, or one packed Array)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flwr.app import Array, ArrayRecord

from common.wire import packed_array_key, packed_key, packed_record, record_tree, tree_record


def tree():
    g = torch.Generator().manual_seed(0)
    return {"unet.a": torch.randn(3, 4, generator=g, dtype=torch.float64), "unet.b": torch.randn(5, generator=g),
            "text.c": torch.randn(2, 1, 2, generator=g)}


def test_packed_record_is_one_array_and_unpacks_to_the_float32_tree():
    t = tree()
    record = packed_record(t)
    key = packed_array_key(record)
    assert list(record) == [key] and key.startswith("privadapt.packed:") and record[key].shape == (12 + 5 + 4,)
    back = record_tree(record, {k: tuple(v.shape) for k, v in t.items()})
    assert list(back) == list(t)
    for k, v in t.items():
        assert back[k].dtype == torch.float32 and torch.equal(back[k], v.float())


def test_per_tensor_record_reads_with_or_without_shapes():
    t = tree()
    for shapes in (None, {k: tuple(v.shape) for k, v in t.items()}):
        back = record_tree(tree_record(t), shapes)
        assert all(torch.equal(back[k], v.float()) for k, v in t.items())


def test_packed_record_needs_the_layout_and_its_exact_size():
    record = packed_record(tree())
    with pytest.raises(ValueError, match="needs the adapter's shapes"):
        record_tree(record)
    with pytest.raises(ValueError, match="not this adapter's"):  # other shapes
        record_tree(record, {"unet.a": (3, 4), "unet.b": (4,), "text.c": (2, 1, 2)})
    with pytest.raises(ValueError, match="not this adapter's"):  # same size, other order
        record_tree(record, {"unet.b": (5,), "unet.a": (3, 4), "text.c": (2, 1, 2)})


def test_a_packed_record_of_the_right_layout_but_the_wrong_size_is_refused():
    shapes = {"unet.a": (3, 4), "unet.b": (5,)}
    record = ArrayRecord(array_dict={packed_key(shapes): Array(np.zeros(16, np.float32))})
    with pytest.raises(ValueError, match="holds 16 entries, the adapter has 17"):
        record_tree(record, shapes)


def test_a_layout_is_its_shapes_with_the_digest_computed_once():
    from common.wire import Layout, layout_digest, split_packed

    shapes = {"unet.a": (3, 4), "unet.b": (5,), "text.c": (2, 1, 2)}
    layout = Layout(shapes)
    assert layout == shapes and shapes == layout and dict(layout) == shapes and list(layout) == list(shapes)
    assert layout_digest(layout) == layout_digest(shapes) and packed_key(layout) == packed_key(shapes)
    assert layout.sizes == (12, 5, 4) and layout.offsets == (0, 12, 17, 21) and layout.total == 21
    flat = np.arange(21, dtype=np.float32)
    assert [v.tolist() for v in split_packed(flat, layout)] == [v.tolist() for v in split_packed(flat, shapes)]
    assert Layout({"unet.b": (5,), "unet.a": (3, 4), "text.c": (2, 1, 2)}).key != layout.key  # order counts
    record = packed_record(tree())
    back = record_tree(record, layout)
    assert all(torch.equal(back[k], v.float()) for k, v in tree().items())
