"""Preprocessing presets shared by training and inference (one resize/normalize path).

Everything works on CHW (or NCHW) float tensors in [0, 1]; ``to_tensor`` converts an HWC
uint8 array or PIL image. Resizing is bilinear with antialias, as torchvision's presets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_tensor(image) -> Tensor:
    """HWC uint8 (numpy array or PIL image, RGB) -> CHW float32 in [0, 1]."""
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got array shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {arr.dtype}; decode to 8-bit RGB first")
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float().div_(255.0)


def _check_image(img: Tensor) -> None:
    if img.dim() not in (3, 4) or img.shape[-3] != 3:
        raise ValueError(f"expected a CHW or NCHW tensor with 3 channels, got shape {tuple(img.shape)}")
    if not img.is_floating_point():
        raise ValueError(f"expected a float tensor in [0, 1], got dtype {img.dtype}")


def shorter_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(h, w) after resizing the shorter side to ``size`` (longer side truncated, as torchvision)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image has an empty dimension: {height}x{width}")
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def resize(img: Tensor, size: tuple[int, int], antialias: bool = True) -> Tensor:
    """Bilinear resize of a CHW/NCHW float tensor to ``size`` = (h, w)."""
    _check_image(img)
    if tuple(img.shape[-2:]) == tuple(size):
        return img
    batched = img.dim() == 4
    x = img if batched else img.unsqueeze(0)
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=antialias)
    return x if batched else x.squeeze(0)


def resize_shorter(img: Tensor, size: int, antialias: bool = True) -> Tensor:
    """Resize so the shorter side is ``size``, keeping the aspect ratio."""
    _check_image(img)
    return resize(img, shorter_side_size(img.shape[-2], img.shape[-1], size), antialias)


def center_crop(img: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Crop the centre ``size`` region; zero-pads first if the image is smaller."""
    th, tw = (size, size) if isinstance(size, int) else size
    h, w = img.shape[-2:]
    if h < th or w < tw:
        pad_h, pad_w = max(th - h, 0), max(tw - w, 0)
        img = F.pad(img, [pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2])
        h, w = img.shape[-2:]
    top = int(round((h - th) / 2.0))
    left = int(round((w - tw) / 2.0))
    return img[..., top:top + th, left:left + tw]


def normalize(img: Tensor, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> Tensor:
    """(img - mean) / std per channel."""
    _check_image(img)
    m = torch.as_tensor(mean, dtype=img.dtype).reshape(-1, 1, 1)
    s = torch.as_tensor(std, dtype=img.dtype).reshape(-1, 1, 1)
    return (img - m) / s


@dataclass(frozen=True)
class ClassificationPreset:
    """Eval preset: resize shorter side (256; 232 for Large V2) -> centre crop 224 -> normalize."""

    crop_size: int = 224
    resize_size: int = 256
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __call__(self, img: Tensor) -> Tensor:
        img = resize_shorter(img, self.resize_size)
        return normalize(center_crop(img, self.crop_size), self.mean, self.std)


@dataclass(frozen=True)
class SegmentationPreset:
    """Eval preset: resize shorter side (520; 320 for the low-res preset) -> normalize. No crop."""

    resize_size: int = 520
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __call__(self, img: Tensor) -> Tensor:
        return normalize(resize_shorter(img, self.resize_size), self.mean, self.std)
