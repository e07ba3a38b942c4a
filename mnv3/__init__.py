"""MobileNetV3 model zoo in pure PyTorch, with torchvision-compatible state_dicts."""

from mnv3.mobilenetv3 import MobileNetV3, mobilenet_v3_large, mobilenet_v3_small

__all__ = ["MobileNetV3", "mobilenet_v3_large", "mobilenet_v3_small"]
