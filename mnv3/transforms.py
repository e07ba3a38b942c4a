"""Preprocessing presets shared by training and inference (one resize/normalize path).

Everything works on CHW (or NCHW) float tensors in [0, 1]; ``to_tensor`` converts an HWC
uint8 array or PIL image. Resizing is bilinear with antialias, as torchvision's presets.
"""

from __future__ import annotations

import math
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


# --------------------------------------------------------------------------- training augmentations
#
# Randomness comes from torch's global generator (seed it per worker), so a run is repeatable.
# Detection and segmentation augmentations move their targets with the pixels; images stay
# float CHW in [0, 1] until ``normalize``.

IGNORE_LABEL = 255  # segmentation pixels that are not scored (padding, class clashes)


def _coin(p: float) -> bool:
    return bool(torch.rand(()) < p)


def hflip(img: Tensor) -> Tensor:
    """Mirror a CHW/HW tensor left-right."""
    return img.flip(-1)


def hflip_boxes(boxes: Tensor, width: int) -> Tensor:
    """Mirror xyxy boxes of an image ``width`` pixels wide."""
    out = boxes.clone()
    out[:, 0] = width - boxes[:, 2]
    out[:, 2] = width - boxes[:, 0]
    return out


def random_hflip_detection(img: Tensor, target: dict[str, Tensor], p: float = 0.5
                           ) -> tuple[Tensor, dict[str, Tensor]]:
    """With probability ``p`` mirror the image, its boxes (and ``masks`` [N, H, W] if present)."""
    if not _coin(p):
        return img, target
    target = dict(target)
    target["boxes"] = hflip_boxes(target["boxes"], int(img.shape[-1]))
    if "masks" in target:
        target["masks"] = target["masks"].flip(-1)
    return hflip(img), target


def resize_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest-neighbour resize of an HW label map (labels must never be blended)."""
    return F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0].to(mask.dtype)


def pad_to(img: Tensor, mask: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Pad bottom/right so both sides are >= ``size``: image with 0, mask with ``IGNORE_LABEL``."""
    h, w = img.shape[-2:]
    ph, pw = max(size - h, 0), max(size - w, 0)
    if ph or pw:
        img = F.pad(img, [0, pw, 0, ph], value=0.0)
        mask = F.pad(mask[None], [0, pw, 0, ph], value=IGNORE_LABEL)[0]
    return img, mask


@dataclass(frozen=True)
class SegmentationTrainPreset:
    """Random resize of the shorter side in [0.5, 2] x ``base_size`` -> hflip -> random crop
    ``crop_size`` (mask padded with 255) -> normalize. ``mask`` is an HW uint8/int64 label map."""

    base_size: int = 520
    crop_size: int = 480
    hflip_prob: float = 0.5
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __call__(self, img: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        lo, hi = int(0.5 * self.base_size), int(2.0 * self.base_size)
        size = int(torch.randint(lo, hi + 1, ()).item())
        new_size = shorter_side_size(img.shape[-2], img.shape[-1], size)
        img, mask = resize(img, new_size), resize_mask(mask, new_size)
        if _coin(self.hflip_prob):
            img, mask = hflip(img), hflip(mask)
        img, mask = pad_to(img, mask, self.crop_size)
        h, w = img.shape[-2:]
        top = int(torch.randint(0, h - self.crop_size + 1, ()).item())
        left = int(torch.randint(0, w - self.crop_size + 1, ()).item())
        img = img[..., top:top + self.crop_size, left:left + self.crop_size]
        mask = mask[top:top + self.crop_size, left:left + self.crop_size]
        return normalize(img, self.mean, self.std), mask


def random_resized_crop_box(height: int, width: int, scale: tuple[float, float] = (0.08, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop covering ``scale`` of the area with aspect in ``ratio``;
    after 10 failed draws, the centre crop with the aspect ratio clamped to ``ratio``."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * float(torch.empty(()).uniform_(scale[0], scale[1]))
        aspect = math.exp(float(torch.empty(()).uniform_(log_lo, log_hi)))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, ()).item())
            left = int(torch.randint(0, width - w + 1, ()).item())
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(img: Tensor, size: int, scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Tensor:
    """Crop a random area/aspect region and resize it (bilinear, antialias) to ``size`` x ``size``."""
    top, left, h, w = random_resized_crop_box(img.shape[-2], img.shape[-1], scale, ratio)
    return resize(img[..., top:top + h, left:left + w], (size, size))


def random_erasing(img: Tensor, p: float = 0.5, scale: tuple[float, float] = (0.02, 0.33),
                   ratio: tuple[float, float] = (0.3, 3.3)) -> Tensor:
    """With probability ``p`` replace a random rectangle of a (normalized) CHW image with N(0, 1) noise."""
    if not _coin(p):
        return img
    c, height, width = img.shape
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = height * width * float(torch.empty(()).uniform_(scale[0], scale[1]))
        aspect = math.exp(float(torch.empty(()).uniform_(log_lo, log_hi)))
        h = int(round(math.sqrt(target * aspect)))
        w = int(round(math.sqrt(target / aspect)))
        if h < height and w < width:
            top = int(torch.randint(0, height - h + 1, ()).item())
            left = int(torch.randint(0, width - w + 1, ()).item())
            img = img.clone()
            img[:, top:top + h, left:left + w] = torch.randn(c, h, w, dtype=img.dtype)
            return img
    return img


# AutoAugment, ImageNet policy (Cubuk et al. 2019, appendix): 25 sub-policies of two
# (operation, probability, magnitude bin 0-9) steps; one sub-policy is drawn per image.
IMAGENET_POLICY: tuple[tuple[tuple[str, float, int], tuple[str, float, int]], ...] = (
    (("Posterize", 0.4, 8), ("Rotate", 0.6, 9)), (("Solarize", 0.6, 5), ("AutoContrast", 0.6, 0)),
    (("Equalize", 0.8, 0), ("Equalize", 0.6, 0)), (("Posterize", 0.6, 7), ("Posterize", 0.6, 6)),
    (("Equalize", 0.4, 0), ("Solarize", 0.2, 4)), (("Equalize", 0.4, 0), ("Rotate", 0.8, 8)),
    (("Solarize", 0.6, 3), ("Equalize", 0.6, 0)), (("Posterize", 0.8, 5), ("Equalize", 1.0, 0)),
    (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)), (("Equalize", 0.6, 0), ("Posterize", 0.4, 6)),
    (("Rotate", 0.8, 8), ("Color", 0.4, 0)), (("Rotate", 0.4, 9), ("Equalize", 0.6, 0)),
    (("Equalize", 0.0, 0), ("Equalize", 0.8, 0)), (("Invert", 0.6, 0), ("Equalize", 1.0, 0)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)), (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
    (("Color", 0.8, 8), ("Solarize", 0.8, 7)), (("Sharpness", 0.4, 7), ("Invert", 0.6, 0)),
    (("ShearX", 0.6, 5), ("Equalize", 1.0, 0)), (("Color", 0.4, 0), ("Equalize", 0.6, 0)),
    (("Equalize", 0.4, 0), ("Solarize", 0.2, 4)), (("Solarize", 0.6, 5), ("AutoContrast", 0.6, 0)),
    (("Invert", 0.6, 0), ("Equalize", 1.0, 0)), (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Equalize", 0.8, 0), ("Equalize", 0.6, 0)),
)


def _autoaugment_op(image, name: str, level: int):
    """Apply one AutoAugment operation at magnitude bin ``level`` (0-9) to a PIL RGB image."""
    from PIL import Image, ImageEnhance, ImageOps

    frac = level / 9.0
    sign = -1.0 if _coin(0.5) else 1.0
    if name == "Posterize":
        return ImageOps.posterize(image, int(round(8 - 4 * frac)))
    if name == "Solarize":
        return ImageOps.solarize(image, int(round(256 * (1 - frac))))
    if name == "Equalize":
        return ImageOps.equalize(image)
    if name == "AutoContrast":
        return ImageOps.autocontrast(image)
    if name == "Invert":
        return ImageOps.invert(image)
    if name == "Rotate":
        return image.rotate(sign * 30.0 * frac, resample=Image.Resampling.NEAREST, fillcolor=(0, 0, 0))
    if name in ("ShearX", "ShearY"):
        s = sign * 0.3 * frac
        coeffs = (1, s, 0, 0, 1, 0) if name == "ShearX" else (1, 0, 0, s, 1, 0)
        return image.transform(image.size, Image.Transform.AFFINE, coeffs, Image.Resampling.NEAREST,
                                fillcolor=(0, 0, 0))
    enhancers = {"Color": ImageEnhance.Color, "Contrast": ImageEnhance.Contrast,
                 "Sharpness": ImageEnhance.Sharpness, "Brightness": ImageEnhance.Brightness}
    if name in enhancers:
        return enhancers[name](image).enhance(1.0 + sign * 0.9 * frac)
    raise ValueError(f"unknown AutoAugment operation {name!r}")


def autoaugment_imagenet(img: Tensor) -> Tensor:
    """AutoAugment with the ImageNet policy on a CHW float image in [0, 1] (via 8-bit PIL)."""
    from PIL import Image

    first, second = IMAGENET_POLICY[int(torch.randint(0, len(IMAGENET_POLICY), ()).item())]
    arr = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    image = Image.fromarray(np.ascontiguousarray(arr))
    for name, prob, level in (first, second):
        if _coin(prob):
            image = _autoaugment_op(image, name, level)
    return to_tensor(np.array(image))


@dataclass(frozen=True)
class ClassificationTrainPreset:
    """RandomResizedCrop -> hflip -> AutoAugment (ImageNet policy, optional) -> normalize ->
    RandomErasing (optional), as the MobileNetV3 ImageNet recipe."""

    crop_size: int = 224
    hflip_prob: float = 0.5
    auto_augment: bool = True
    random_erase: float = 0.0
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __call__(self, img: Tensor) -> Tensor:
        img = random_resized_crop(img, self.crop_size)
        if _coin(self.hflip_prob):
            img = hflip(img)
        if self.auto_augment:
            img = autoaugment_imagenet(img)
        img = normalize(img, self.mean, self.std)
        return random_erasing(img, self.random_erase) if self.random_erase > 0 else img
