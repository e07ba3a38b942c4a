"""Encode boxes as (dx, dy, dw, dh) offsets from reference boxes, and decode them back."""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Largest log-scale change decoded; keeps exp() from overflowing (log(1000 / 16)).
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


class BoxCoder:
    """R-CNN box parametrisation with per-coordinate weights (wx, wy, ww, wh)."""

    def __init__(self, weights: tuple[float, float, float, float],
                 bbox_xform_clip: float = DEFAULT_SCALE_CLAMP) -> None:
        self.weights = weights
        self.bbox_xform_clip = bbox_xform_clip

    def encode(self, matched: list[Tensor], references: list[Tensor]) -> list[Tensor]:
        """Per-image regression targets of ``matched`` ground truth w.r.t. ``references``."""
        sizes = [len(r) for r in references]
        targets = self.encode_single(torch.cat(matched, dim=0), torch.cat(references, dim=0))
        return list(targets.split(sizes, 0))

    def encode_single(self, matched: Tensor, references: Tensor) -> Tensor:
        w = torch.as_tensor(self.weights, dtype=matched.dtype, device=matched.device)
        wx, wy, ww, wh = w[0], w[1], w[2], w[3]
        ex_w = references[:, 2:3] - references[:, 0:1]
        ex_h = references[:, 3:4] - references[:, 1:2]
        ex_cx = references[:, 0:1] + 0.5 * ex_w
        ex_cy = references[:, 1:2] + 0.5 * ex_h
        gt_w = matched[:, 2:3] - matched[:, 0:1]
        gt_h = matched[:, 3:4] - matched[:, 1:2]
        gt_cx = matched[:, 0:1] + 0.5 * gt_w
        gt_cy = matched[:, 1:2] + 0.5 * gt_h
        dx = wx * (gt_cx - ex_cx) / ex_w
        dy = wy * (gt_cy - ex_cy) / ex_h
        dw = ww * torch.log(gt_w / ex_w)
        dh = wh * torch.log(gt_h / ex_h)
        return torch.cat((dx, dy, dw, dh), dim=1)

    def decode(self, rel_codes: Tensor, boxes: list[Tensor]) -> Tensor:
        """Decode [sum(N_i), K*4] codes against the concatenated boxes -> [sum(N_i), K, 4]."""
        concat = torch.cat(boxes, dim=0)
        total = concat.shape[0]
        per_box = rel_codes.numel() // total if total else rel_codes.shape[-1]
        rel_codes = rel_codes.reshape(total, per_box)
        pred = self.decode_single(rel_codes, concat)
        # Explicit K keeps the [N, K, 4] shape when no proposal is left (N == 0).
        return pred.reshape(total, per_box // 4, 4)

    def decode_single(self, rel_codes: Tensor, boxes: Tensor) -> Tensor:
        """[N, K*4] codes applied to [N, 4] boxes -> [N, K*4] boxes (x1, y1, x2, y2)."""
        boxes = boxes.to(rel_codes.dtype)
        widths = boxes[:, 2] - boxes[:, 0]
        heights = boxes[:, 3] - boxes[:, 1]
        ctr_x = boxes[:, 0] + 0.5 * widths
        ctr_y = boxes[:, 1] + 0.5 * heights
        wx, wy, ww, wh = self.weights
        dx = rel_codes[:, 0::4] / wx
        dy = rel_codes[:, 1::4] / wy
        dw = (rel_codes[:, 2::4] / ww).clamp(max=self.bbox_xform_clip)
        dh = (rel_codes[:, 3::4] / wh).clamp(max=self.bbox_xform_clip)
        pred_cx = dx * widths[:, None] + ctr_x[:, None]
        pred_cy = dy * heights[:, None] + ctr_y[:, None]
        pred_w = torch.exp(dw) * widths[:, None]
        pred_h = torch.exp(dh) * heights[:, None]
        half_w = torch.tensor(0.5, dtype=pred_cx.dtype, device=pred_cx.device) * pred_w
        half_h = torch.tensor(0.5, dtype=pred_cy.dtype, device=pred_cy.device) * pred_h
        out = torch.stack((pred_cx - half_w, pred_cy - half_h, pred_cx + half_w, pred_cy + half_h), dim=2)
        return out.flatten(1)
