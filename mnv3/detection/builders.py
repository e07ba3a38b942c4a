"""Builders named as torchvision's: Faster R-CNN MobileNetV3-Large FPN (800/1333) and 320 FPN (320/640)."""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from mnv3.detection.anchors import AnchorGenerator
from mnv3.detection.backbone import mobilenet_fpn_extractor
from mnv3.detection.faster_rcnn import FasterRCNN
from mnv3.layers import FrozenBatchNorm2d
from mnv3.mobilenetv3 import mobilenet_v3_large

COCO_NUM_CLASSES = 91
MAX_TRAINABLE_LAYERS = 6
DEFAULT_TRAINABLE_LAYERS = 3


def _trainable_layers(is_trained: bool, requested: int | None) -> int:
    if not is_trained:
        if requested is not None:
            warnings.warn(
                "Changing trainable_backbone_layers has no effect if neither weights, weights_backbone nor "
                f"frozen_bn=True is set; falling back to trainable_backbone_layers={MAX_TRAINABLE_LAYERS} "
                "so that all layers are trainable", stacklevel=3)
        return MAX_TRAINABLE_LAYERS
    value = DEFAULT_TRAINABLE_LAYERS if requested is None else requested
    if not 0 <= value <= MAX_TRAINABLE_LAYERS:
        raise ValueError(f"Trainable backbone layers should be in the range [0,{MAX_TRAINABLE_LAYERS}], "
                         f"got {value}")
    return value


def _build(weights: str | None, num_classes: int | None, weights_backbone: str | None,
           trainable_backbone_layers: int | None, frozen_bn: bool | None, defaults: dict[str, Any],
           kwargs: dict[str, Any]) -> FasterRCNN:
    if weights is not None:
        weights_backbone = None
        num_classes = COCO_NUM_CLASSES if num_classes is None else num_classes
    elif num_classes is None:
        num_classes = COCO_NUM_CLASSES
    is_trained = weights is not None or weights_backbone is not None
    if frozen_bn is None:
        frozen_bn = is_trained
    layers = _trainable_layers(is_trained or frozen_bn, trainable_backbone_layers)
    norm_layer = FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
    classifier = mobilenet_v3_large(weights=weights_backbone, norm_layer=norm_layer)
    backbone = mobilenet_fpn_extractor(classifier.features, layers)
    anchors = AnchorGenerator(((32, 64, 128, 256, 512),) * 3, ((0.5, 1.0, 2.0),) * 3)
    model = FasterRCNN(backbone, num_classes, rpn_anchor_generator=anchors, **{**defaults, **kwargs})
    if weights is not None:
        from mnv3.weights import load_weights

        load_weights(model, weights)
    return model


def fasterrcnn_mobilenet_v3_large_fpn(*, weights: str | None = None, num_classes: int | None = None,
                                      weights_backbone: str | None = None,
                                      trainable_backbone_layers: int | None = None,
                                      frozen_bn: bool | None = None,
                                      **kwargs: Any) -> FasterRCNN:
    """Faster R-CNN, MobileNetV3-Large FPN backbone, images resized to 800 (max 1333).

    ``weights``: registry name or file URI of a full detector checkpoint (91 COCO classes
    unless ``num_classes`` says otherwise). ``weights_backbone``: an ImageNet MobileNetV3-Large
    checkpoint for the backbone. Either one gives the trained layout (FrozenBatchNorm2d, 284
    keys); ``frozen_bn=True`` builds that layout without loading anything (to fine-tune from
    a checkpoint loaded later), otherwise the backbone uses BatchNorm2d (330 keys) and is
    fully trainable. Other keyword arguments are FasterRCNN's (min_size, rpn_*, box_*, ...).
    """
    return _build(weights, num_classes, weights_backbone, trainable_backbone_layers, frozen_bn,
                  {"rpn_score_thresh": 0.05}, kwargs)


def fasterrcnn_mobilenet_v3_large_320_fpn(*, weights: str | None = None, num_classes: int | None = None,
                                          weights_backbone: str | None = None,
                                          trainable_backbone_layers: int | None = None,
                                          frozen_bn: bool | None = None, **kwargs: Any) -> FasterRCNN:
    """Low-resolution variant: images resized to 320 (max 640), 150 RPN proposals at test time.

    Same arguments as :func:`fasterrcnn_mobilenet_v3_large_fpn`.
    """
    defaults = {"min_size": 320, "max_size": 640, "rpn_pre_nms_top_n_test": 150,
                "rpn_post_nms_top_n_test": 150, "rpn_score_thresh": 0.05}
    return _build(weights, num_classes, weights_backbone, trainable_backbone_layers, frozen_bn, defaults,
                  kwargs)
