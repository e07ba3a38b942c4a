"""Straightforward loop implementations of NMS and RoIAlign, written from the definitions.

They are the yardstick for the vectorized ops in ``mnv3.ops``: property tests compare the
two on random inputs, and ``scripts/measure_detection_speed.py`` times them against each other.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def naive_nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS in pure Python: one pair of boxes at a time (float64 arithmetic)."""
    order = torch.sort(scores, descending=True, stable=True).indices.tolist()
    b = boxes.tolist()
    area = [(x2 - x1) * (y2 - y1) for x1, y1, x2, y2 in b]
    suppressed = [False] * len(order)
    keep = []
    for pos, i in enumerate(order):
        if suppressed[pos]:
            continue
        keep.append(i)
        x1, y1, x2, y2 = b[i]
        for later in range(pos + 1, len(order)):
            j = order[later]
            if suppressed[later]:
                continue
            w = max(0.0, min(x2, b[j][2]) - max(x1, b[j][0]))
            h = max(0.0, min(y2, b[j][3]) - max(y1, b[j][1]))
            inter = w * h
            union = area[i] + area[j] - inter
            if union > 0 and inter / union > iou_threshold:
                suppressed[later] = True
    return torch.tensor(keep, dtype=torch.int64)


def loop_nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """The classic tensor NMS: a Python loop over kept boxes, each compared with the rest at once."""
    order = torch.sort(scores, descending=True, stable=True).indices
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep = []
    while order.numel() > 0:
        i = order[0]
        keep.append(int(i))
        rest = order[1:]
        lt = torch.maximum(boxes[i, :2], boxes[rest, :2])
        rb = torch.minimum(boxes[i, 2:], boxes[rest, 2:])
        wh = (rb - lt).clamp(min=0)
        inter = wh[:, 0] * wh[:, 1]
        iou = inter / (area[i] + area[rest] - inter)
        order = rest[~(iou > iou_threshold)]
    return torch.tensor(keep, dtype=torch.int64)


def _bilinear(fmap: Tensor, y: float, x: float) -> Tensor:
    c, h, w = fmap.shape
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return torch.zeros(c, dtype=fmap.dtype)
    y, x = max(y, 0.0), max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= h - 1:
        y_low = y_high = h - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= w - 1:
        x_low = x_high = w - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1.0 - ly, 1.0 - lx
    return (hy * hx * fmap[:, y_low, x_low] + hy * lx * fmap[:, y_low, x_high]
            + ly * hx * fmap[:, y_high, x_low] + ly * lx * fmap[:, y_high, x_high])


def naive_roi_align(features: Tensor, rois: Tensor, output_size: int, spatial_scale: float,
                    sampling_ratio: int, aligned: bool = False) -> Tensor:
    """RoIAlign from its definition: loop over RoIs, bins and sample points."""
    k, c = rois.shape[0], features.shape[1]
    out = torch.zeros(k, c, output_size, output_size, dtype=features.dtype)
    offset = 0.5 if aligned else 0.0
    for r in range(k):
        b, x1, y1, x2, y2 = rois[r].tolist()
        x1, y1, x2, y2 = (v * spatial_scale - offset for v in (x1, y1, x2, y2))
        rw, rh = x2 - x1, y2 - y1
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        bw, bh = rw / output_size, rh / output_size
        gh = sampling_ratio if sampling_ratio > 0 else max(math.ceil(rh / output_size), 0)
        gw = sampling_ratio if sampling_ratio > 0 else max(math.ceil(rw / output_size), 0)
        count = max(gh * gw, 1)
        fmap = features[int(b)]
        for py in range(output_size):
            for px in range(output_size):
                acc = torch.zeros(c, dtype=features.dtype)
                for iy in range(gh):
                    yy = y1 + py * bh + (iy + 0.5) * bh / gh
                    for ix in range(gw):
                        xx = x1 + px * bw + (ix + 0.5) * bw / gw
                        acc += _bilinear(fmap, yy, xx)
                out[r, :, py, px] = acc / count
    return out
