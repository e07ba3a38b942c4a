"""Box operations, NMS and RoIAlign in plain PyTorch, with torchvision's semantics.

torchvision implements NMS and RoIAlign in C++; these versions are vectorized tensor code
instead (no Python loop per box) and reproduce its results: strict ``IoU > threshold`` in
NMS with areas without ``+1``, RoIAlign's sampling grid, border rules and averaging, and the
multi-scale pooler's level mapping. Boxes are ``(x1, y1, x2, y2)`` everywhere.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

# Above this many boxes batched_nms runs NMS class by class instead of in one IoU matrix,
# so memory stays bounded (an N x N matrix of 2048 boxes is 16 MB of float32).
_SINGLE_MATRIX_MAX_BOXES = 2048
# RoIAlign works on chunks of RoIs so its intermediate (rois x 7 x C x W) stays ~32 MB.
_ROI_ALIGN_CHUNK_ELEMENTS = 8 * 1024 * 1024


def _check_boxes(boxes: Tensor, name: str = "boxes") -> None:
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must be a tensor of shape [N, 4] (x1, y1, x2, y2), "
                         f"got {tuple(boxes.shape)}")


def _upcast(t: Tensor) -> Tensor:
    """Integer boxes would overflow or truncate in area products: compute in float instead."""
    if t.is_floating_point():
        return t if t.dtype in (torch.float32, torch.float64) else t.float()
    return t.float()


def box_area(boxes: Tensor) -> Tensor:
    """Area (x2 - x1) * (y2 - y1) of each box, no ``+1``."""
    _check_boxes(boxes)
    boxes = _upcast(boxes)
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU matrix [N, M] = inter / (area1 + area2 - inter)."""
    _check_boxes(boxes1, "boxes1")
    _check_boxes(boxes2, "boxes2")
    b1, b2 = _upcast(boxes1), _upcast(boxes2)
    area1 = (b1[:, 2] - b1[:, 0]) * (b1[:, 3] - b1[:, 1])
    area2 = (b2[:, 2] - b2[:, 0]) * (b2[:, 3] - b2[:, 1])
    # One [N, M] plane per axis (not an [N, M, 2] stack) and in-place ops: this matrix is
    # most of the cost of NMS on a CPU.
    w = torch.minimum(b1[:, None, 2], b2[None, :, 2]) - torch.maximum(b1[:, None, 0], b2[None, :, 0])
    h = torch.minimum(b1[:, None, 3], b2[None, :, 3]) - torch.maximum(b1[:, None, 1], b2[None, :, 1])
    w.clamp_(min=0)
    h.clamp_(min=0)
    inter = w.mul_(h)
    return inter / (area1[:, None] + area2[None, :] - inter)


def clip_boxes_to_image(boxes: Tensor, size: tuple[int, int] | list[int] | torch.Size) -> Tensor:
    """Clamp x to [0, W] and y to [0, H]; ``size`` is (H, W). Works on [..., 4]."""
    if boxes.shape[-1] != 4:
        raise ValueError(f"boxes must have 4 coordinates in the last dimension, got {tuple(boxes.shape)}")
    height, width = int(size[0]), int(size[1])
    out = torch.empty_like(boxes)
    out[..., 0::2] = boxes[..., 0::2].clamp(min=0, max=width)
    out[..., 1::2] = boxes[..., 1::2].clamp(min=0, max=height)
    return out


def remove_small_boxes(boxes: Tensor, min_size: float) -> Tensor:
    """Indices of the boxes whose width and height are both >= ``min_size``."""
    _check_boxes(boxes)
    ws = boxes[:, 2] - boxes[:, 0]
    hs = boxes[:, 3] - boxes[:, 1]
    return torch.where((ws >= min_size) & (hs >= min_size))[0]


def _strictly_above(values: Tensor, threshold: float) -> Tensor:
    """``values > threshold`` decided as if ``values`` were compared in float64.

    torchvision's C++ NMS compares a float IoU with a double threshold. Comparing in
    float32 against a rounded-up threshold (e.g. float32(0.3) > 0.3) would keep a box that
    the double comparison suppresses; comparing against the smallest float32 strictly
    above the threshold gives the exact double answer without a float64 copy.
    """
    if values.dtype == torch.float64:
        return values > threshold
    t = torch.tensor(threshold, dtype=torch.float64)
    t32 = t.to(values.dtype)
    if t32.double() <= t:
        t32 = torch.nextafter(t32, torch.tensor(math.inf, dtype=values.dtype))
    return values >= t32


def _greedy_keep(suppresses: Tensor) -> Tensor:
    """Resolve greedy NMS from the matrix ``suppresses[i, j]`` (i ranks above j, IoU > thr).

    Box j is kept iff no kept box ranked above it suppresses it. Starting from "all kept",
    each pass fixes at least one more leading box, and the fixed point is exactly the
    sequential greedy result; in practice few passes are needed (the length of the longest
    suppression chain), each one a vectorized reduction over the matrix.
    """
    n = suppresses.shape[0]
    keep = torch.ones(n, dtype=torch.bool, device=suppresses.device)
    # Only boxes with some box above them overlapping can ever be dropped.
    candidates = suppresses.any(0)
    if not bool(candidates.any()):
        return keep
    cols = torch.where(candidates)[0]
    sub = suppresses[:, cols]
    rows = torch.where(sub.any(1))[0]
    sub = sub[rows]
    for _ in range(n + 1):
        new_cols = ~(sub & keep[rows, None]).any(0)
        if torch.equal(new_cols, keep[cols]):
            break
        keep[cols] = new_cols
    return keep


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy non-maximum suppression; drops a box when IoU with a kept, higher-scored box > thr.

    Returns int64 indices of the kept boxes, in decreasing score order (ties: lower index first).
    """
    _check_boxes(boxes)
    if scores.dim() != 1 or scores.shape[0] != boxes.shape[0]:
        raise ValueError(f"scores must have shape [{boxes.shape[0]}] to match boxes, "
                         f"got {tuple(scores.shape)}")
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    b = boxes[order]
    over = _strictly_above(box_iou(b, b), iou_threshold).triu_(diagonal=1)
    return order[_greedy_keep(over)]


# Per-category NMS costs about this many IoU-matrix entries in fixed overhead per category.
_PER_CLASS_OVERHEAD_ENTRIES = 10_000


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """NMS applied independently per category ``idxs``; indices sorted by decreasing score.

    Either one IoU matrix masked to same-category pairs (exact coordinates, no offset trick)
    or one NMS per category (a loop per category, not per box), whichever computes fewer
    matrix entries: with many categories most entries of the single matrix are wasted.
    Both give the same indices in the same order.
    """
    _check_boxes(boxes)
    n = boxes.shape[0]
    if scores.shape != (n,) or idxs.shape != (n,):
        raise ValueError(f"scores and idxs must have shape [{n}], "
                         f"got {tuple(scores.shape)} and {tuple(idxs.shape)}")
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    classes, counts = torch.unique(idxs, return_counts=True)
    per_class_cost = int((counts * counts).sum()) + _PER_CLASS_OVERHEAD_ENTRIES * len(classes)
    if n <= _SINGLE_MATRIX_MAX_BOXES and (len(classes) == 1 or n * n <= per_class_cost):
        order = torch.sort(scores, descending=True, stable=True).indices
        b, c = boxes[order], idxs[order]
        over = _strictly_above(box_iou(b, b), iou_threshold) & (c[:, None] == c[None, :])
        return order[_greedy_keep(over.triu_(diagonal=1))]
    keep_mask = torch.zeros(n, dtype=torch.bool, device=boxes.device)
    for cls in classes:
        members = torch.where(idxs == cls)[0]
        keep_mask[members[nms(boxes[members], scores[members], iou_threshold)]] = True
    kept = torch.where(keep_mask)[0]
    return kept[torch.sort(scores[kept], descending=True, stable=True).indices]


def _rois_from(boxes: Tensor | list[Tensor]) -> Tensor:
    """Accept [K, 5] (batch index, x1, y1, x2, y2) or a list of per-image [L, 4] boxes."""
    if isinstance(boxes, (list, tuple)):
        for i, b in enumerate(boxes):
            if b.dim() != 2 or b.shape[-1] != 4:
                raise ValueError(f"boxes[{i}] must have shape [L, 4], got {tuple(b.shape)}")
        if not boxes:
            raise ValueError("boxes is an empty list; pass one [L, 4] tensor per image")
        cat = torch.cat(list(boxes), dim=0)
        ids = torch.cat([torch.full_like(b[:, :1], i) for i, b in enumerate(boxes)], dim=0)
        return torch.cat([ids, cat], dim=1)
    if boxes.dim() != 2 or boxes.shape[-1] != 5:
        raise ValueError(f"rois must have shape [K, 5] (batch index, x1, y1, x2, y2), "
                         f"got {tuple(boxes.shape)}")
    return boxes


def _axis_weights(start: Tensor, length: Tensor, pooled: int, grid: Tensor, size: int) -> Tensor:
    """Per-RoI interpolation matrix [K, pooled, size] along one axis.

    Entry (k, p, s) is the summed bilinear weight that the samples of bin p put on pixel
    row (or column) s, with torchvision's rules: samples beyond [-1, size] count as zero,
    coordinates below 0 are clamped to 0, and the last row takes the full weight.
    """
    k = start.shape[0]
    bin_size = length / pooled
    max_grid = max(int(grid.max()), 1) if k else 1
    p = torch.arange(pooled, dtype=start.dtype, device=start.device)
    i = torch.arange(max_grid, dtype=start.dtype, device=start.device)
    g = grid.to(start.dtype)
    pos = (start[:, None, None] + p[None, :, None] * bin_size[:, None, None]) + \
        ((i[None, None, :] + 0.5) * bin_size[:, None, None]) / g.clamp(min=1)[:, None, None]
    used = i[None, None, :] < g[:, None, None]
    valid = used & (pos >= -1.0) & (pos <= size)
    pos = pos.clamp(min=0)
    low = pos.floor().to(torch.int64)
    at_edge = low >= size - 1
    low = torch.where(at_edge, torch.full_like(low, size - 1), low)
    high = torch.where(at_edge, low, low + 1)
    pos = torch.where(at_edge, low.to(pos.dtype), pos)
    frac_high = pos - low.to(pos.dtype)
    frac_low = 1.0 - frac_high
    zero = torch.zeros((), dtype=pos.dtype, device=pos.device)
    w_low = torch.where(valid, frac_low, zero)
    w_high = torch.where(valid, frac_high, zero)
    out = torch.zeros(k, pooled, size, dtype=start.dtype, device=start.device)
    out.scatter_add_(2, low.reshape(k, pooled, max_grid), w_low)
    out.scatter_add_(2, high.reshape(k, pooled, max_grid), w_high)
    return out


def roi_align(
    input: Tensor,
    boxes: Tensor | list[Tensor],
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:
    """RoIAlign: average of bilinear samples on a regular grid in each output bin.

    ``boxes`` are in input-image coordinates (multiplied by ``spatial_scale``), either a
    [K, 5] tensor with the batch index first or a list of [L, 4] tensors, one per image.
    ``sampling_ratio`` <= 0 uses ceil(roi size / output size) samples per bin and axis.
    ``aligned=True`` shifts coordinates by -0.5 pixel and does not force RoIs to >= 1 px.

    Bilinear sampling on a grid is separable, so each RoI's output is A @ feature @ B^T
    with small interpolation matrices A (rows) and B (columns): a few batched matmuls
    replace the per-sample gather loop of the C++ kernel.
    """
    if input.dim() != 4:
        raise ValueError(f"input must be a [N, C, H, W] feature map, got shape {tuple(input.shape)}")
    ph, pw = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    rois = _rois_from(boxes).to(input.dtype)
    n, c, h, w = input.shape
    k = rois.shape[0]
    if k == 0:
        return input.new_zeros((0, c, ph, pw))
    offset = 0.5 if aligned else 0.0
    # The C++ kernel scales coordinates in the input dtype; doing the same keeps bit parity.
    coords = rois[:, 1:] * torch.tensor(spatial_scale, dtype=input.dtype) - offset
    x1, y1, x2, y2 = coords.unbind(1)
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    if sampling_ratio > 0:
        grid_h = torch.full((k,), sampling_ratio, dtype=torch.int64, device=input.device)
        grid_w = grid_h
    else:
        grid_h = torch.ceil(roi_h / ph).clamp(min=0).to(torch.int64)
        grid_w = torch.ceil(roi_w / pw).clamp(min=0).to(torch.int64)
    count = (grid_h * grid_w).clamp(min=1).to(input.dtype)
    wy = _axis_weights(y1, roi_h, ph, grid_h, h)  # [K, ph, H]
    wx = _axis_weights(x1, roi_w, pw, grid_w, w) / count[:, None, None]  # [K, pw, W]
    batch = rois[:, 0].to(torch.int64)
    if k and (int(batch.min()) < 0 or int(batch.max()) >= n):
        raise ValueError(f"roi batch indices must be in [0, {n - 1}], got range "
                         f"[{int(batch.min())}, {int(batch.max())}]")
    out = input.new_empty((k, c, ph, pw))
    chunk = max(1, _ROI_ALIGN_CHUNK_ELEMENTS // max(1, ph * c * w))
    for b in torch.unique(batch).tolist():
        idx = torch.where(batch == b)[0]
        fmap = input[b].permute(1, 0, 2).reshape(h, c * w)  # [H, C*W]
        for s in range(0, idx.numel(), chunk):
            sel = idx[s:s + chunk]
            m = sel.numel()
            rows = torch.matmul(wy[sel].reshape(m * ph, h), fmap)  # [m*ph, C*W]
            res = torch.matmul(rows.reshape(m, ph * c, w), wx[sel].transpose(1, 2))  # [m, ph*C, pw]
            out[sel] = res.reshape(m, ph, c, pw).permute(0, 2, 1, 3)
    return out


class LevelMapper:
    """Assign each RoI to a pyramid level from its size (FPN paper, eq. 1).

    level = floor(canonical_level + log2(sqrt(area) / canonical_scale) + eps), clamped to
    [k_min, k_max], returned relative to k_min.
    """

    def __init__(self, k_min: int, k_max: int, canonical_scale: int = 224, canonical_level: int = 4,
                 eps: float = 1e-6) -> None:
        self.k_min, self.k_max = k_min, k_max
        self.s0, self.lvl0, self.eps = canonical_scale, canonical_level, eps

    def __call__(self, boxlists: list[Tensor]) -> Tensor:
        s = torch.sqrt(torch.cat([box_area(b) for b in boxlists]))
        lvl = torch.floor(self.lvl0 + torch.log2(s / self.s0) + torch.tensor(self.eps, dtype=s.dtype))
        return lvl.clamp(min=self.k_min, max=self.k_max).to(torch.int64) - self.k_min


def _infer_scale(feature: Tensor, image_size: tuple[int, int]) -> float:
    """Feature/image size ratio rounded to a power of two, from the height axis."""
    approx = float(feature.shape[-2]) / float(image_size[0])
    return 2.0 ** float(torch.tensor(approx).log2().round())


class MultiScaleRoIAlign(nn.Module):
    """RoIAlign over named feature maps, each RoI pooled from the level its size maps to.

    Levels' scales are inferred from the first batch (feature height over the largest
    image height) and then cached, as torchvision does. Feature maps not named in
    ``featmap_names`` are ignored; names that are absent are skipped.
    """

    def __init__(self, featmap_names: list[str], output_size: int | tuple[int, int], sampling_ratio: int,
                 *, canonical_scale: int = 224, canonical_level: int = 4) -> None:
        super().__init__()
        self.featmap_names = list(featmap_names)
        self.output_size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
        self.sampling_ratio = sampling_ratio
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level
        self.scales: list[float] | None = None
        self.map_levels: LevelMapper | None = None

    def _setup_scales(self, features: list[Tensor], image_shapes: list[tuple[int, int]]) -> None:
        if not image_shapes:
            raise ValueError("image_shapes is empty; pass one (H, W) per image")
        largest = (max(s[0] for s in image_shapes), max(s[1] for s in image_shapes))
        scales = [_infer_scale(f, largest) for f in features]
        lvl_min = -torch.log2(torch.tensor(scales[0], dtype=torch.float32)).item()
        lvl_max = -torch.log2(torch.tensor(scales[-1], dtype=torch.float32)).item()
        self.scales = scales
        self.map_levels = LevelMapper(int(lvl_min), int(lvl_max), self.canonical_scale, self.canonical_level)

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor],
                image_shapes: list[tuple[int, int]]) -> Tensor:
        feats = [x[name] for name in self.featmap_names if name in x]
        if not feats:
            raise ValueError(f"none of the feature maps {self.featmap_names} is in the input (got {list(x)})")
        if self.scales is None or self.map_levels is None:
            self._setup_scales(feats, image_shapes)
        rois = _rois_from(boxes)
        if len(feats) == 1:
            return roi_align(feats[0], rois, self.output_size, self.scales[0], self.sampling_ratio)
        levels = self.map_levels(boxes)
        c = feats[0].shape[1]
        result = feats[0].new_zeros((rois.shape[0], c) + self.output_size)
        for level, (feat, scale) in enumerate(zip(feats, self.scales)):
            idx = torch.where(levels == level)[0]
            if idx.numel():
                result[idx] = roi_align(feat, rois[idx], self.output_size, scale, self.sampling_ratio)
        return result
