"""Second stage of Faster R-CNN: pool each proposal, classify it and refine its box."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mnv3 import ops
from mnv3.detection.box_coder import BoxCoder
from mnv3.detection.sampling import BalancedPositiveNegativeSampler, Matcher


class TwoMLPHead(nn.Module):
    """Flatten the pooled features, then fc6 -> ReLU -> fc7 -> ReLU."""

    def __init__(self, in_channels: int, representation_size: int) -> None:
        super().__init__()
        self.fc6 = nn.Linear(in_channels, representation_size)
        self.fc7 = nn.Linear(representation_size, representation_size)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(start_dim=1)
        return F.relu(self.fc7(F.relu(self.fc6(x))))


class FastRCNNPredictor(nn.Module):
    """Class logits (num_classes, background included) and per-class box deltas."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.cls_score = nn.Linear(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, num_classes * 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.dim() == 4:
            if list(x.shape[2:]) != [1, 1]:
                raise ValueError(f"x has the wrong shape, expecting the last two dimensions to be [1,1] "
                                 f"instead of {list(x.shape[2:])}")
        x = x.flatten(1)
        return self.cls_score(x), self.bbox_pred(x)


def fastrcnn_loss(class_logits: Tensor, box_regression: Tensor, labels: list[Tensor],
                  regression_targets: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Cross entropy over all sampled RoIs + smooth-L1 (beta 1/9) on positives' true-class deltas."""
    labels_all = torch.cat(labels, dim=0)
    targets_all = torch.cat(regression_targets, dim=0)
    cls_loss = F.cross_entropy(class_logits, labels_all)
    pos = torch.where(labels_all > 0)[0]
    labels_pos = labels_all[pos]
    n = class_logits.shape[0]
    box_regression = box_regression.reshape(n, box_regression.size(-1) // 4, 4)
    box_loss = F.smooth_l1_loss(box_regression[pos, labels_pos], targets_all[pos], beta=1 / 9,
                                reduction="sum") / labels_all.numel()
    return cls_loss, box_loss


class RoIHeads(nn.Module):
    """Box branch: RoIAlign -> TwoMLPHead -> predictor; sampling and losses in training."""

    def __init__(self, box_roi_pool: ops.MultiScaleRoIAlign, box_head: nn.Module, box_predictor: nn.Module,
                 fg_iou_thresh: float, bg_iou_thresh: float, batch_size_per_image: int,
                 positive_fraction: float, bbox_reg_weights: tuple[float, float, float, float] | None,
                 score_thresh: float, nms_thresh: float, detections_per_img: int) -> None:
        super().__init__()
        self.box_roi_pool = box_roi_pool
        self.box_head = box_head
        self.box_predictor = box_predictor
        self.proposal_matcher = Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=False)
        self.fg_bg_sampler = BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
        self.box_coder = BoxCoder(bbox_reg_weights or (10.0, 10.0, 5.0, 5.0))
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img

    def _assign_targets(self, proposals: list[Tensor], gt_boxes: list[Tensor], gt_labels: list[Tensor]
                        ) -> tuple[list[Tensor], list[Tensor]]:
        matched_idxs, labels = [], []
        for props, boxes, labs in zip(proposals, gt_boxes, gt_labels):
            if boxes.numel() == 0:
                clamped = torch.zeros((props.shape[0],), dtype=torch.int64, device=props.device)
                lab = torch.zeros((props.shape[0],), dtype=torch.int64, device=props.device)
            else:
                idx = self.proposal_matcher(ops.box_iou(boxes, props))
                clamped = idx.clamp(min=0)
                lab = labs[clamped].to(torch.int64)
                lab[idx == -1] = 0
                lab[idx == -2] = -1
            matched_idxs.append(clamped)
            labels.append(lab)
        return matched_idxs, labels

    def select_training_samples(self, proposals: list[Tensor], targets: list[dict[str, Tensor]]
                                ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        dtype = proposals[0].dtype
        gt_boxes = [t["boxes"].to(dtype) for t in targets]
        gt_labels = [t["labels"] for t in targets]
        proposals = [torch.cat((p, g)) for p, g in zip(proposals, gt_boxes)]
        matched_idxs, labels = self._assign_targets(proposals, gt_boxes, gt_labels)
        pos_masks, neg_masks = self.fg_bg_sampler(labels)
        matched_gt = []
        for i in range(len(proposals)):
            keep = torch.where(pos_masks[i] | neg_masks[i])[0]
            proposals[i], labels[i] = proposals[i][keep], labels[i][keep]
            matched_idxs[i] = matched_idxs[i][keep]
            boxes = gt_boxes[i]
            if boxes.numel() == 0:
                boxes = torch.zeros((1, 4), dtype=dtype, device=proposals[i].device)
            matched_gt.append(boxes[matched_idxs[i]])
        return proposals, labels, self.box_coder.encode(matched_gt, proposals)

    def postprocess_detections(self, class_logits: Tensor, box_regression: Tensor, proposals: list[Tensor],
                               image_shapes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        num_classes = class_logits.shape[-1]
        per_image = [p.shape[0] for p in proposals]
        all_boxes = self.box_coder.decode(box_regression, proposals).split(per_image, 0)
        all_scores = F.softmax(class_logits, -1).split(per_image, 0)
        results = []
        for boxes, scores, shape in zip(all_boxes, all_scores, image_shapes):
            boxes = ops.clip_boxes_to_image(boxes, shape)
            labels = torch.arange(num_classes, device=boxes.device).view(1, -1).expand_as(scores)
            boxes = boxes[:, 1:].reshape(-1, 4)
            scores = scores[:, 1:].reshape(-1)
            labels = labels[:, 1:].reshape(-1)
            keep = torch.where(scores > self.score_thresh)[0]
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = ops.remove_small_boxes(boxes, min_size=1e-2)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = ops.batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
            results.append({"boxes": boxes[keep], "labels": labels[keep], "scores": scores[keep]})
        return results

    def forward(self, features: dict[str, Tensor], proposals: list[Tensor],
                image_shapes: list[tuple[int, int]],
                targets: list[dict[str, Tensor]] | None = None
                ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        if self.training:
            if targets is None:
                raise ValueError("targets should not be None in training mode")
            proposals, labels, regression_targets = self.select_training_samples(proposals, targets)
        x = self.box_roi_pool(features, proposals, image_shapes)
        x = self.box_head(x)
        class_logits, box_regression = self.box_predictor(x)
        if self.training:
            cls_loss, box_loss = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
            return [], {"loss_classifier": cls_loss, "loss_box_reg": box_loss}
        return self.postprocess_detections(class_logits, box_regression, proposals, image_shapes), {}
