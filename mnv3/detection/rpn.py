"""Region proposal network: objectness + box deltas per anchor, filtered into proposals."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mnv3 import ops
from mnv3.detection.anchors import AnchorGenerator
from mnv3.detection.box_coder import BoxCoder
from mnv3.detection.sampling import BalancedPositiveNegativeSampler, Matcher
from mnv3.detection.transform import ImageList
from mnv3.layers import ConvNormActivation


class RPNHead(nn.Module):
    """Shared 3x3 conv + ReLU, then 1x1 convs for A objectness logits and 4A deltas."""

    def __init__(self, in_channels: int, num_anchors: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(ConvNormActivation(in_channels, in_channels, 3, norm_layer=None))
        self.cls_logits = nn.Conv2d(in_channels, num_anchors, 1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.constant_(m.bias, 0)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Old checkpoints store the shared conv as ``conv.weight``.
        for kind in ("weight", "bias"):
            old = f"{prefix}conv.{kind}"
            if old in state_dict:
                state_dict[f"{prefix}conv.0.0.{kind}"] = state_dict.pop(old)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def forward(self, x: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        logits, deltas = [], []
        for feature in x:
            t = self.conv(feature)
            logits.append(self.cls_logits(t))
            deltas.append(self.bbox_pred(t))
        return logits, deltas


def _flatten_level(t: Tensor, n: int, c: int) -> Tensor:
    """[N, A*C, H, W] (anchor-major channels) -> [N, H*W*A, C] ordered (y, x, anchor)."""
    _, ac, h, w = t.shape
    return t.view(n, ac // c, c, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, c)


def concat_levels(logits: list[Tensor], deltas: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Flatten all levels into [N*total, 1] logits and [N*total, 4] deltas (image-major)."""
    n = logits[0].shape[0]
    flat_logits = torch.cat([_flatten_level(t, n, 1) for t in logits], dim=1).flatten(0, -2)
    flat_deltas = torch.cat([_flatten_level(t, n, 4) for t in deltas], dim=1).reshape(-1, 4)
    return flat_logits, flat_deltas


class RegionProposalNetwork(nn.Module):
    """Anchors -> scores/deltas -> per-level top-k -> clip -> small/score filter -> per-level NMS.

    ``pre_nms_top_n`` and ``post_nms_top_n`` are dicts with ``training`` and ``testing``
    counts; the top-k is taken per level, the score test is ``>= score_thresh``.
    """

    def __init__(self, anchor_generator: AnchorGenerator, head: RPNHead, fg_iou_thresh: float,
                 bg_iou_thresh: float, batch_size_per_image: int, positive_fraction: float,
                 pre_nms_top_n: dict[str, int], post_nms_top_n: dict[str, int], nms_thresh: float,
                 score_thresh: float = 0.0) -> None:
        super().__init__()
        self.anchor_generator = anchor_generator
        self.head = head
        self.box_coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
        self.proposal_matcher = Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=True)
        self.fg_bg_sampler = BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
        self._pre_nms_top_n = pre_nms_top_n
        self._post_nms_top_n = post_nms_top_n
        self.nms_thresh = nms_thresh
        self.score_thresh = score_thresh
        self.min_size = 1e-3

    def pre_nms_top_n(self) -> int:
        return self._pre_nms_top_n["training" if self.training else "testing"]

    def post_nms_top_n(self) -> int:
        return self._post_nms_top_n["training" if self.training else "testing"]

    def assign_targets_to_anchors(self, anchors: list[Tensor], targets: list[dict[str, Tensor]]
                                  ) -> tuple[list[Tensor], list[Tensor]]:
        labels, matched_boxes = [], []
        for anchors_i, target in zip(anchors, targets):
            gt = target["boxes"]
            if gt.numel() == 0:
                matched = torch.zeros(anchors_i.shape, dtype=torch.float32, device=anchors_i.device)
                lab = torch.zeros((anchors_i.shape[0],), dtype=torch.float32, device=anchors_i.device)
            else:
                idx = self.proposal_matcher(ops.box_iou(gt, anchors_i))
                matched = gt[idx.clamp(min=0)]
                lab = (idx >= 0).to(torch.float32)
                lab[idx == -1] = 0.0
                lab[idx == -2] = -1.0
            labels.append(lab)
            matched_boxes.append(matched)
        return labels, matched_boxes

    def _top_n_idx(self, objectness: Tensor, per_level: list[int]) -> Tensor:
        out, offset = [], 0
        for ob in objectness.split(per_level, 1):
            k = min(self.pre_nms_top_n(), ob.shape[1])
            _, idx = ob.topk(k, dim=1)
            out.append(idx + offset)
            offset += ob.shape[1]
        return torch.cat(out, dim=1)

    def filter_proposals(self, proposals: Tensor, objectness: Tensor, image_shapes: list[tuple[int, int]],
                         per_level: list[int]) -> tuple[list[Tensor], list[Tensor]]:
        n = proposals.shape[0]
        objectness = objectness.detach().reshape(n, -1)
        levels = torch.cat([torch.full((c,), i, dtype=torch.int64, device=proposals.device)
                            for i, c in enumerate(per_level)]).reshape(1, -1).expand_as(objectness)
        top = self._top_n_idx(objectness, per_level)
        rows = torch.arange(n, device=proposals.device)[:, None]
        objectness, levels, proposals = objectness[rows, top], levels[rows, top], proposals[rows, top]
        probs = torch.sigmoid(objectness)
        final_boxes, final_scores = [], []
        for boxes, scores, lvl, shape in zip(proposals, probs, levels, image_shapes):
            boxes = ops.clip_boxes_to_image(boxes, shape)
            keep = ops.remove_small_boxes(boxes, self.min_size)
            boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
            keep = torch.where(scores >= self.score_thresh)[0]
            boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
            keep = ops.batched_nms(boxes, scores, lvl, self.nms_thresh)[: self.post_nms_top_n()]
            final_boxes.append(boxes[keep])
            final_scores.append(scores[keep])
        return final_boxes, final_scores

    def compute_loss(self, objectness: Tensor, deltas: Tensor, labels: list[Tensor],
                     regression_targets: list[Tensor]) -> tuple[Tensor, Tensor]:
        pos_masks, neg_masks = self.fg_bg_sampler(labels)
        pos = torch.where(torch.cat(pos_masks, dim=0))[0]
        neg = torch.where(torch.cat(neg_masks, dim=0))[0]
        sampled = torch.cat([pos, neg], dim=0)
        objectness = objectness.flatten()
        labels_all = torch.cat(labels, dim=0)
        targets_all = torch.cat(regression_targets, dim=0)
        box_loss = F.smooth_l1_loss(deltas[pos], targets_all[pos], beta=1 / 9, reduction="sum")
        box_loss = box_loss / sampled.numel()
        obj_loss = F.binary_cross_entropy_with_logits(objectness[sampled], labels_all[sampled])
        return obj_loss, box_loss

    def forward(self, images: ImageList, features: dict[str, Tensor],
                targets: list[dict[str, Tensor]] | None = None) -> tuple[list[Tensor], dict[str, Tensor]]:
        feats = list(features.values())
        logits, deltas = self.head(feats)
        batch_shape = (int(images.tensors.shape[-2]), int(images.tensors.shape[-1]))
        anchors = self.anchor_generator(batch_shape, len(images.image_sizes), feats)
        n = len(anchors)
        per_level = [int(t.shape[1] * t.shape[2] * t.shape[3]) for t in logits]
        objectness, pred_deltas = concat_levels(logits, deltas)
        proposals = self.box_coder.decode(pred_deltas.detach(), anchors).view(n, -1, 4)
        boxes, _ = self.filter_proposals(proposals, objectness, images.image_sizes, per_level)
        losses: dict[str, Tensor] = {}
        if self.training:
            if targets is None:
                raise ValueError("targets should not be None in training mode")
            labels, matched = self.assign_targets_to_anchors(anchors, targets)
            regression_targets = self.box_coder.encode(matched, anchors)
            obj_loss, box_loss = self.compute_loss(objectness, pred_deltas, labels, regression_targets)
            losses = {"loss_objectness": obj_loss, "loss_rpn_box_reg": box_loss}
        return boxes, losses
