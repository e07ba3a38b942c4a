"""Faster R-CNN with a MobileNetV3-Large FPN backbone (torchvision-compatible state_dicts)."""

from mnv3.detection.builders import fasterrcnn_mobilenet_v3_large_320_fpn, fasterrcnn_mobilenet_v3_large_fpn
from mnv3.detection.faster_rcnn import FasterRCNN

__all__ = ["FasterRCNN", "fasterrcnn_mobilenet_v3_large_320_fpn", "fasterrcnn_mobilenet_v3_large_fpn"]
