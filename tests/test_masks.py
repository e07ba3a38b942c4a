"""Logits -> label map -> per-class COCO RLE -> label map, and the fit with the Parquet schema."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from pipeline.masks import (
    decode_masks,
    encode_label_map,
    label_map_from_logits,
    label_map_to_rles,
    masks_from_logits,
)
from pipeline.schema import OUTPUT_SCHEMA, make_table


def blob_labels(height: int, width: int, num_classes: int, seed: int = 0) -> np.ndarray:
    """A label map of overlapping random rectangles and discs (class ids in [0, num_classes))."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((height, width), dtype=np.uint8)
    yy, xx = np.mgrid[:height, :width]
    for _ in range(12):
        c = int(rng.integers(1, num_classes))
        cy, cx = rng.integers(0, height), rng.integers(0, width)
        r = int(rng.integers(2, max(3, min(height, width) // 3)))
        if rng.random() < 0.5:
            labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = c
        else:
            labels[max(0, cy - r):cy + r, max(0, cx - 2 * r):cx + r] = c
    return labels


def reference_labels(logits: torch.Tensor, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """argmax of F.interpolate'd logits, and the top-1 minus top-2 margin per pixel."""
    up = F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0]
    top2 = up.topk(2, dim=0).values
    return up.argmax(0).numpy(), (top2[0] - top2[1]).numpy()


@pytest.mark.parametrize("logit_size,size", [((17, 23), (61, 80)), ((40, 52), (33, 29)), ((9, 9), (9, 9))])
def test_label_map_matches_interpolate_then_argmax(logit_size, size):
    torch.manual_seed(1)
    logits = torch.randn(6, *logit_size) * 3
    labels = label_map_from_logits(logits, size)
    expected, margin = reference_labels(logits, size)
    assert labels.shape == size and labels.dtype == np.uint8
    clear = margin > 1e-4  # away from near-ties, the argmax must agree exactly
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(labels[clear], expected[clear])
    # the batch-of-one form and a tiny band size give the same map
    np.testing.assert_array_equal(label_map_from_logits(logits[None], size, band_bytes=1), labels)


def test_round_trip_is_lossless_and_rles_are_coco():
    labels = blob_labels(47, 73, 21, seed=3)  # non-square: catches a transposed (C-order) RLE
    masks = encode_label_map(labels, names=[f"class{i}" for i in range(21)])
    present = np.unique(labels)
    assert [m["label_id"] for m in masks] == present.tolist()
    for m in masks:
        assert m["size"] == [47, 73] and isinstance(m["counts"], str) and m["counts"].isascii()
        assert m["label"] == f"class{m['label_id']}"
        rle = {"size": m["size"], "counts": m["counts"].encode("ascii")}
        binary = mask_utils.decode(rle)
        np.testing.assert_array_equal(binary, labels == m["label_id"])
        assert m["area"] == int(mask_utils.area(rle)) == int((labels == m["label_id"]).sum())
    np.testing.assert_array_equal(decode_masks(masks), labels)


def test_skipped_background_comes_back_as_fill():
    labels = blob_labels(30, 20, 5, seed=7)
    masks = encode_label_map(labels, skip={0})
    assert 0 not in [m["label_id"] for m in masks] and all(m["label"] is None for m in masks)
    np.testing.assert_array_equal(decode_masks(masks, fill=0), labels)
    empty = encode_label_map(np.zeros((4, 6), dtype=np.int64), skip={0})
    assert empty == []
    np.testing.assert_array_equal(decode_masks(empty, size=(4, 6)), np.zeros((4, 6)))


def test_many_classes_use_int32_labels():
    labels = np.arange(300 * 4, dtype=np.int32).reshape(30, 40) % 300
    masks = encode_label_map(labels)
    assert len(masks) == 300
    decoded = decode_masks(masks)
    assert decoded.dtype == np.int32
    np.testing.assert_array_equal(decoded, labels)


def test_masks_from_logits_fit_the_parquet_schema(tmp_path):
    torch.manual_seed(0)
    logits = torch.randn(4, 12, 18) * 4
    names = ["__background__", "a", "b", "c"]
    masks = masks_from_logits(logits, (45, 70), names=names)
    assert sum(m["area"] for m in masks) == 45 * 70
    row = {"image_id": "s/0", "key": "0", "source_uri": "mem://0", "shard": "s", "status": "ok",
           "width": 70, "height": 45, "seg_masks": masks}
    table = make_table([row])
    assert table.schema.field("seg_masks").type == OUTPUT_SCHEMA.field("seg_masks").type
    pq.write_table(table, tmp_path / "part.parquet")
    back = pq.read_table(tmp_path / "part.parquet").to_pylist()[0]["seg_masks"]
    assert back == masks
    np.testing.assert_array_equal(decode_masks(back), label_map_from_logits(logits, (45, 70)))


def test_large_image_is_resized_in_bands():
    # 3-row bands at this size: 134 bands, with uneven fractional weights at every band edge
    torch.manual_seed(0)
    logits = torch.randn(21, 65, 87)
    size = (400, 500)
    banded = label_map_from_logits(logits, size, band_bytes=1 << 17)
    one_band = label_map_from_logits(logits, size, band_bytes=1 << 40)
    np.testing.assert_array_equal(banded, one_band)  # bands change where, never what, is computed
    expected, margin = reference_labels(logits, size)
    clear = margin > 1e-4
    assert clear.mean() > 0.999
    np.testing.assert_array_equal(banded[clear], expected[clear])


def test_label_map_to_rles_drops_background_and_small_classes_and_names_unknown_ids():
    labels = blob_labels(40, 50, 6, seed=11)
    labels[0, :3] = 9  # an id beyond the 6 names (a model with more classes than categories)
    names = [f"c{i}" for i in range(6)]
    masks = label_map_to_rles(labels, names)
    areas = {m["label_id"]: m["area"] for m in masks}
    assert 0 not in areas and areas[9] == 3
    assert [m["label"] for m in masks] == [names[i] if i < 6 else str(i) for i in areas]
    np.testing.assert_array_equal(decode_masks(masks, fill=0), labels)
    with_bg = label_map_to_rles(labels, names, include_background=True)
    assert with_bg[0]["label_id"] == 0 and with_bg[0]["label"] == "c0"
    np.testing.assert_array_equal(decode_masks(with_bg), labels)
    big = label_map_to_rles(labels, names, min_area=4)
    assert [m["label_id"] for m in big] == [i for i in areas if areas[i] >= 4]
    assert 9 not in [m["label_id"] for m in big]
    assert label_map_to_rles(np.zeros((3, 3), dtype=np.int32), names) == []


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="batch of 2"):
        label_map_from_logits(torch.zeros(2, 3, 4, 4), (4, 4))
    with pytest.raises(ValueError, match=r"\(C, h, w\)"):
        label_map_from_logits(torch.zeros(4, 4), (4, 4))
    with pytest.raises(ValueError, match="positive"):
        label_map_from_logits(torch.zeros(3, 4, 4), (0, 4))
    with pytest.raises(ValueError, match="integer label map"):
        encode_label_map(np.zeros((4, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="negative"):
        encode_label_map(np.full((2, 2), -1))
    with pytest.raises(ValueError, match="label 3 has no name"):
        encode_label_map(np.full((2, 2), 3), names=["a", "b"])
    masks = encode_label_map(blob_labels(10, 12, 4))
    with pytest.raises(ValueError, match="disagree"):
        decode_masks(masks, size=(12, 10))
    with pytest.raises(ValueError, match="overlaps"):
        decode_masks(masks + masks[:1])
    with pytest.raises(ValueError, match="size"):
        decode_masks([])
