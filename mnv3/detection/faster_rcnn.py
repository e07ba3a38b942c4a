"""The Faster R-CNN model: transform -> backbone -> RPN -> RoI heads -> boxes in input coordinates."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from mnv3.detection.anchors import AnchorGenerator
from mnv3.detection.roi_heads import FastRCNNPredictor, RoIHeads, TwoMLPHead
from mnv3.detection.rpn import RegionProposalNetwork, RPNHead
from mnv3.detection.transform import DetectionTransform, check_images
from mnv3.ops import MultiScaleRoIAlign
from mnv3.transforms import IMAGENET_MEAN, IMAGENET_STD


def check_targets(targets: list[dict[str, Tensor]] | None, num_images: int,
                  num_classes: int | None = None) -> None:
    """Training targets: one dict per image with finite float ``boxes`` [N, 4] and int64 ``labels`` [N].

    Checked before anything runs, so the error names the caller's target rather than a
    cryptic failure inside the losses (e.g. an out-of-range label in cross entropy).
    """
    if targets is None:
        raise ValueError("targets should not be None in training mode; pass one dict with 'boxes' and "
                         "'labels' per image")
    if len(targets) != num_images:
        raise ValueError(f"got {len(targets)} targets for {num_images} images; "
                         "pass one target dict per image")
    for i, t in enumerate(targets):
        if "boxes" not in t or "labels" not in t:
            raise ValueError(f"targets[{i}] must have 'boxes' and 'labels' keys, got {sorted(t)}")
        boxes, labels = t["boxes"], t["labels"]
        if not isinstance(boxes, Tensor):
            raise ValueError(f"Expected target boxes to be of type Tensor, got {type(boxes)} "
                             f"in targets[{i}].")
        if boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"Expected target boxes to be a tensor of shape [N, 4], "
                             f"got {tuple(boxes.shape)} in targets[{i}].")
        if not boxes.is_floating_point():
            raise ValueError(f"target boxes must be a float tensor, got {boxes.dtype} in targets[{i}]")
        if not bool(torch.isfinite(boxes).all()):
            raise ValueError(f"targets[{i}]['boxes'] has non-finite values (NaN or inf); "
                             "drop or fix those boxes")
        if not isinstance(labels, Tensor) or labels.shape != (boxes.shape[0],) or labels.dtype != torch.int64:
            got = (f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, Tensor)
                   else type(labels).__name__)
            raise ValueError(f"targets[{i}]['labels'] must be int64 of shape [{boxes.shape[0]}], got {got}")
        if num_classes is not None and labels.numel():
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= num_classes:
                bad = lo if lo < 0 else hi
                raise ValueError(f"targets[{i}]['labels'] must be in [0, {num_classes - 1}] (num_classes="
                                 f"{num_classes}, 0 is background), got {bad}")
    check_degenerate_boxes(targets)


def check_degenerate_boxes(targets: list[dict[str, Tensor]], where: str = "") -> None:
    """Boxes with x2 <= x1 or y2 <= y1 make the box regression targets infinite."""
    for i, t in enumerate(targets):
        boxes = t["boxes"]
        bad = (boxes[:, 2:] <= boxes[:, :2]).any(dim=1)
        if bool(bad.any()):
            j = int(torch.where(bad)[0][0])
            raise ValueError(f"All bounding boxes should have positive height and width. Found invalid box "
                             f"{boxes[j].tolist()} for target at index {i} (box {j}{where}); boxes are "
                             "(x1, y1, x2, y2) in pixels, not (x, y, w, h)")


class FasterRCNN(nn.Module):
    """Two-stage detector over a backbone that returns an ordered dict of feature maps.

    Eval: ``model(list_of_chw_images)`` -> list of {boxes (xyxy, input pixels), labels, scores}.
    Training: ``model(images, targets)`` -> {loss_classifier, loss_box_reg, loss_objectness,
    loss_rpn_box_reg}. Keyword arguments and defaults follow torchvision's FasterRCNN.
    """

    def __init__(self, backbone: nn.Module, num_classes: int | None = None,
                 min_size: int | tuple[int, ...] = 800, max_size: int = 1333,
                 image_mean: tuple[float, ...] | None = None, image_std: tuple[float, ...] | None = None,
                 rpn_anchor_generator: AnchorGenerator | None = None,
                 rpn_head: nn.Module | None = None, rpn_pre_nms_top_n_train: int = 2000,
                 rpn_pre_nms_top_n_test: int = 1000, rpn_post_nms_top_n_train: int = 2000,
                 rpn_post_nms_top_n_test: int = 1000, rpn_nms_thresh: float = 0.7,
                 rpn_fg_iou_thresh: float = 0.7, rpn_bg_iou_thresh: float = 0.3,
                 rpn_batch_size_per_image: int = 256, rpn_positive_fraction: float = 0.5,
                 rpn_score_thresh: float = 0.0, box_roi_pool: nn.Module | None = None,
                 box_head: nn.Module | None = None, box_predictor: nn.Module | None = None,
                 box_score_thresh: float = 0.05, box_nms_thresh: float = 0.5,
                 box_detections_per_img: int = 100,
                 box_fg_iou_thresh: float = 0.5, box_bg_iou_thresh: float = 0.5,
                 box_batch_size_per_image: int = 512, box_positive_fraction: float = 0.25,
                 bbox_reg_weights: tuple[float, float, float, float] | None = None) -> None:
        super().__init__()
        if not hasattr(backbone, "out_channels"):
            raise ValueError("backbone should have an 'out_channels' attribute "
                             "(channels of its feature maps)")
        if num_classes is not None and box_predictor is not None:
            raise ValueError("num_classes should be None when box_predictor is given")
        if num_classes is None and box_predictor is None:
            raise ValueError("num_classes should not be None when box_predictor is not given")
        out_channels = backbone.out_channels
        if rpn_anchor_generator is None:
            rpn_anchor_generator = AnchorGenerator(((32,), (64,), (128,), (256,), (512,)),
                                                   ((0.5, 1.0, 2.0),) * 5)
        if rpn_head is None:
            rpn_head = RPNHead(out_channels, rpn_anchor_generator.num_anchors_per_location()[0])
        rpn = RegionProposalNetwork(
            rpn_anchor_generator, rpn_head, rpn_fg_iou_thresh, rpn_bg_iou_thresh, rpn_batch_size_per_image,
            rpn_positive_fraction,
            {"training": rpn_pre_nms_top_n_train, "testing": rpn_pre_nms_top_n_test},
            {"training": rpn_post_nms_top_n_train, "testing": rpn_post_nms_top_n_test},
            rpn_nms_thresh, score_thresh=rpn_score_thresh)
        if box_roi_pool is None:
            box_roi_pool = MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=7, sampling_ratio=2)
        if box_head is None:
            resolution = box_roi_pool.output_size[0]
            box_head = TwoMLPHead(out_channels * resolution**2, 1024)
        if box_predictor is None:
            box_predictor = FastRCNNPredictor(1024, num_classes)
        roi_heads = RoIHeads(box_roi_pool, box_head, box_predictor, box_fg_iou_thresh, box_bg_iou_thresh,
                             box_batch_size_per_image, box_positive_fraction, bbox_reg_weights,
                             box_score_thresh, box_nms_thresh, box_detections_per_img)
        self.transform = DetectionTransform(min_size, max_size, image_mean or IMAGENET_MEAN,
                                            image_std or IMAGENET_STD)
        self.backbone = backbone
        self.rpn = rpn
        self.roi_heads = roi_heads

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
                ) -> list[dict[str, Tensor]] | dict[str, Tensor]:
        check_images(images)
        if self.training:
            cls_score = getattr(self.roi_heads.box_predictor, "cls_score", None)
            num_classes = getattr(cls_score, "out_features", None)
            check_targets(targets, len(images), num_classes)
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        batch, targets = self.transform(images, targets if self.training else None)
        if self.training:
            check_degenerate_boxes(targets, ", after resizing")
        features = self.backbone(batch.tensors)
        if isinstance(features, Tensor):
            features = OrderedDict([("0", features)])
        proposals, proposal_losses = self.rpn(batch, features, targets)
        detections, detector_losses = self.roi_heads(features, proposals, batch.image_sizes, targets)
        if self.training:
            return {**detector_losses, **proposal_losses}
        return self.transform.postprocess(detections, batch.image_sizes, original_sizes)
