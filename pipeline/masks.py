"""Segmentation logits <-> per-class COCO RLE masks (the ``seg_masks`` column of schema v1).

Forward: logits (C, h, w) at the model's input size -> bilinear resize to the original
image size and argmax -> an (H, W) label map -> one COCO RLE per present class, as dicts
``{"label_id", "label", "size": [H, W], "counts": ASCII str, "area"}`` (``MASK_TYPE``).
Backward: those dicts -> the same label map, bit for bit.

The resize is done in bands of output rows, so a 12-megapixel image with 21 classes never
holds a full-size float logit map in memory.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch import Tensor

__all__ = ["decode_masks", "encode_label_map", "label_map_from_logits", "label_map_to_rles",
           "masks_from_logits"]

BAND_BYTES = 16 << 20  # float32 logits resized per band (bounds peak memory)


def _axis_weights(n_in: int, n_out: int) -> tuple[Tensor, Tensor, Tensor]:
    """Source indices (lo, hi) and weight of hi for bilinear resampling, half-pixel centres.

    Output coordinate i samples input coordinate (i + 0.5) * n_in / n_out - 0.5, clamped at 0,
    as ``F.interpolate(mode="bilinear", align_corners=False)`` does.
    """
    src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp_(min=0.0)
    lo = src.floor().long().clamp_(max=n_in - 1)
    hi = (lo + 1).clamp_(max=n_in - 1)
    return lo, hi, (src - lo).to(torch.float32)


def _label_dtype(num_classes: int) -> np.dtype:
    return np.dtype(np.uint8) if num_classes <= 256 else np.dtype(np.int32)


def label_map_from_logits(logits: Tensor, size: Sequence[int], band_bytes: int = BAND_BYTES) -> np.ndarray:
    """Per-pixel argmax class of ``logits`` (C, h, w) or (1, C, h, w), resized to ``size`` = (H, W).

    The logits are resampled bilinearly (as ``F.interpolate``, align_corners=False) before the
    argmax, one band of output rows at a time. Returns uint8 labels (int32 above 256 classes).
    """
    if logits.dim() == 4:
        if logits.shape[0] != 1:
            raise ValueError(f"expected logits of one image, got a batch of {logits.shape[0]}; "
                             "call once per image")
        logits = logits[0]
    if logits.dim() != 3 or min(logits.shape) < 1:
        raise ValueError(f"expected logits of shape (C, h, w), got {tuple(logits.shape)}")
    height, width = (int(s) for s in size)
    if height < 1 or width < 1:
        raise ValueError(f"output size must be positive (H, W), got {tuple(size)}")
    logits = logits.detach().float().cpu()
    num_classes, h, w = logits.shape
    labels = np.empty((height, width), dtype=_label_dtype(num_classes))
    row_lo, row_hi, row_w = _axis_weights(h, height)
    col_lo, col_hi, col_w = _axis_weights(w, width)
    band = max(1, band_bytes // (4 * num_classes * max(width, w)))
    with torch.no_grad():
        for r0 in range(0, height, band):
            r1 = min(height, r0 + band)
            wy = row_w[r0:r1].view(1, -1, 1)
            rows = torch.lerp(logits[:, row_lo[r0:r1]], logits[:, row_hi[r0:r1]], wy)  # (C, b, w)
            full = torch.lerp(rows[:, :, col_lo], rows[:, :, col_hi], col_w)  # (C, b, W)
            labels[r0:r1] = full.argmax(dim=0).numpy().astype(labels.dtype, copy=False)
    return labels


def encode_label_map(labels: np.ndarray, names: Sequence[str] | None = None,
                     skip: Collection[int] = (), min_area: int = 0) -> list[dict[str, Any]]:
    """One COCO RLE dict per class present in the (H, W) integer ``labels``, by label id.

    ``names[label_id]`` fills ``label`` (None without names). Classes in ``skip`` (e.g. the
    background, 0) are left out; ``decode_masks(..., fill=0)`` puts them back. Classes with
    fewer than ``min_area`` pixels are left out too (their pixels then decode as ``fill``, so
    the round trip is lossless only with ``min_area`` <= 1).
    """
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.dtype.kind not in "iu":
        raise ValueError(f"expected an (H, W) integer label map, got shape {labels.shape} "
                         f"dtype {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError(f"label map holds negative label {int(labels.min())}; labels must be >= 0")
    height, width = labels.shape
    counts = np.bincount(labels.ravel().astype(np.int64, copy=False)) if labels.size else np.zeros(0)
    present = [int(c) for c in np.flatnonzero(counts) if int(c) not in skip and counts[c] >= min_area]
    if names is not None and present and present[-1] >= len(names):
        raise ValueError(f"label {present[-1]} has no name: only {len(names)} names were given")
    fortran = np.asfortranarray(labels)
    masks = []
    for label_id in present:
        binary = np.asfortranarray(fortran == label_id, dtype=np.uint8)
        rle = mask_utils.encode(binary)
        masks.append({
            "label_id": label_id,
            "label": None if names is None else str(names[label_id]),
            "size": [height, width],
            "counts": rle["counts"].decode("ascii"),
            "area": int(counts[label_id]),
        })
    return masks


def label_map_to_rles(label_map: np.ndarray, labels: Sequence[str], *, min_area: int = 0,
                      include_background: bool = False) -> list[dict[str, Any]]:
    """``seg_masks`` entries for the annotate bundle: background (label 0) dropped unless
    ``include_background``, classes under ``min_area`` pixels dropped, and label ids beyond
    ``labels`` named by their id (a model with more classes than the category list must still
    produce rows rather than fail a shard).
    """
    label_map = np.asarray(label_map)
    top = int(label_map.max()) + 1 if label_map.size else 0
    names = [str(n) for n in labels] + [str(i) for i in range(len(labels), top)]
    return encode_label_map(label_map, names, skip=() if include_background else {0}, min_area=min_area)


def masks_from_logits(logits: Tensor, size: Sequence[int], names: Sequence[str] | None = None,
                      skip: Collection[int] = ()) -> list[dict[str, Any]]:
    """Logits at the model's input size -> RLE masks at the original ``size`` = (H, W)."""
    return encode_label_map(label_map_from_logits(logits, size), names, skip)


def decode_masks(masks: Sequence[Mapping[str, Any]], size: Sequence[int] | None = None,
                 fill: int = 0) -> np.ndarray:
    """RLE mask dicts (as written by ``encode_label_map``) -> the (H, W) label map.

    Pixels no mask covers get ``fill``. ``size`` is required when ``masks`` is empty; given
    with masks, it must agree with theirs. Overlapping masks are an error (corrupt input).
    """
    sizes = {tuple(int(s) for s in m["size"]) for m in masks}
    if size is not None:
        sizes.add(tuple(int(s) for s in size))
    if not sizes:
        raise ValueError("no masks to decode and no size given; pass size=(height, width)")
    if len(sizes) != 1:
        raise ValueError(f"masks disagree on the image size: {sorted(sizes)}")
    height, width = sizes.pop()
    if fill < 0:
        raise ValueError(f"fill must be a label id >= 0, got {fill}")
    max_label = max([fill, *(int(m["label_id"]) for m in masks)])
    labels = np.full((height, width), fill, dtype=_label_dtype(max_label + 1))
    covered = np.zeros((height, width), dtype=bool)
    for m in masks:
        counts = m["counts"].encode("ascii") if isinstance(m["counts"], str) else m["counts"]
        rle = {"size": [height, width], "counts": counts}
        binary = mask_utils.decode(rle).astype(bool)
        if (covered & binary).any():
            raise ValueError(f"mask of label {m['label_id']} overlaps an earlier mask; a label map has one "
                             "class per pixel")
        covered |= binary
        labels[binary] = int(m["label_id"])
    return labels
