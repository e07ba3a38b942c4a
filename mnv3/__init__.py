"""MobileNetV3 model zoo in pure PyTorch, with torchvision-compatible state_dicts."""

from mnv3.detection import fasterrcnn_mobilenet_v3_large_320_fpn, fasterrcnn_mobilenet_v3_large_fpn
from mnv3.mobilenetv3 import MobileNetV3, mobilenet_v3_large, mobilenet_v3_small
from mnv3.segmentation import deeplabv3_mobilenet_v3_large, fcn_mobilenet_v3_large, lraspp_mobilenet_v3_large

__all__ = [
    "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "MobileNetV3", "mobilenet_v3_large", "mobilenet_v3_small",
    "lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large", "fcn_mobilenet_v3_large"]
