"""Detector input/output transform: normalize, resize, pad into a batch; map boxes back.

Same order as torchvision's GeneralizedRCNNTransform: normalize first, then a bilinear
resize without antialias so that the shorter side is ``min_size`` unless the longer side
would exceed ``max_size``, then zero padding (in normalized space) to a multiple of 32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mnv3.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize, resize


@dataclass
class ImageList:
    """A padded batch and the (H, W) of each image inside it before padding."""

    tensors: Tensor
    image_sizes: list[tuple[int, int]]


def resize_boxes(boxes: Tensor, original_size: tuple[int, int], new_size: tuple[int, int]) -> Tensor:
    """Scale xyxy boxes from an (H, W) image to another (H, W), with float32 ratios per axis."""
    ratio_h = torch.tensor(new_size[0], dtype=torch.float32, device=boxes.device) / \
        torch.tensor(original_size[0], dtype=torch.float32, device=boxes.device)
    ratio_w = torch.tensor(new_size[1], dtype=torch.float32, device=boxes.device) / \
        torch.tensor(original_size[1], dtype=torch.float32, device=boxes.device)
    x1, y1, x2, y2 = boxes.unbind(1)
    return torch.stack((x1 * ratio_w, y1 * ratio_h, x2 * ratio_w, y2 * ratio_h), dim=1)


def check_images(images: list[Tensor]) -> None:
    """Raise a ValueError naming the first image that a detector cannot take."""
    if isinstance(images, Tensor) and images.dim() == 4:
        raise ValueError("images must be a list of [3, H, W] tensors, not one batched tensor; "
                         "use list(batch)")
    if len(images) == 0:
        raise ValueError("images is an empty list; pass at least one [3, H, W] float tensor")
    for i, img in enumerate(images):
        if not isinstance(img, Tensor):
            raise ValueError(f"images[{i}] is a {type(img).__name__}, expected a [3, H, W] float tensor")
        if img.dim() != 3:
            raise ValueError(f"images is expected to be a list of 3d tensors of shape [C, H, W], "
                             f"got images[{i}] with shape {tuple(img.shape)}")
        if img.shape[0] != 3:
            raise ValueError(f"images[{i}] has {img.shape[0]} channels (shape {tuple(img.shape)}); "
                             "expected 3 (RGB); convert greyscale/RGBA images to RGB first")
        if img.shape[1] == 0 or img.shape[2] == 0:
            raise ValueError(f"images[{i}] has an empty dimension (shape {tuple(img.shape)}); "
                             "every image needs H >= 1 and W >= 1")
        if not img.is_floating_point():
            raise ValueError(f"images[{i}] has dtype {img.dtype}; expected float pixels in [0, 1] "
                             "(divide uint8 images by 255)")


class DetectionTransform(nn.Module):
    """Batch preparation for Faster R-CNN (and box mapping back to the input images)."""

    def __init__(self, min_size: int | tuple[int, ...], max_size: int,
                 image_mean: tuple[float, ...] = IMAGENET_MEAN, image_std: tuple[float, ...] = IMAGENET_STD,
                 size_divisible: int = 32) -> None:
        super().__init__()
        self.min_size = (min_size,) if isinstance(min_size, int) else tuple(min_size)
        self.max_size = max_size
        self.image_mean = tuple(image_mean)
        self.image_std = tuple(image_std)
        self.size_divisible = size_divisible

    def _choose_min_size(self) -> int:
        if not self.training:
            return self.min_size[-1]
        # One uniform draw per image in training, as torchvision (keeps RNG streams aligned).
        index = int(torch.empty(1).uniform_(0.0, float(len(self.min_size))).item())
        return self.min_size[index]

    def resize(self, image: Tensor, target: dict[str, Tensor] | None
               ) -> tuple[Tensor, dict[str, Tensor] | None]:
        h, w = image.shape[-2:]
        size = float(self._choose_min_size())
        scale = min(size / float(min(h, w)), float(self.max_size) / float(max(h, w)))
        new_size = (math.floor(h * scale), math.floor(w * scale))
        if new_size[0] < 1 or new_size[1] < 1:
            raise ValueError(f"image of size {h}x{w} would be resized to {new_size[0]}x{new_size[1]} "
                             f"(min_size {self.min_size}, max_size {self.max_size}); "
                             "its aspect ratio is too extreme")
        image = resize(image, new_size, antialias=False)
        if target is not None and "boxes" in target:
            target = dict(target)
            target["boxes"] = resize_boxes(target["boxes"], (h, w), new_size)
        return image, target

    def batch_images(self, images: list[Tensor]) -> Tensor:
        stride = self.size_divisible
        max_h = max(img.shape[-2] for img in images)
        max_w = max(img.shape[-1] for img in images)
        shape = (len(images), images[0].shape[0],
                 int(math.ceil(max_h / stride) * stride), int(math.ceil(max_w / stride) * stride))
        batch = images[0].new_zeros(shape)
        for img, slot in zip(images, batch):
            slot[:, :img.shape[-2], :img.shape[-1]].copy_(img)
        return batch

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
                ) -> tuple[ImageList, list[dict[str, Tensor]] | None]:
        check_images(images)
        out_images, out_targets = [], [] if targets is not None else None
        for i, image in enumerate(images):
            target = targets[i] if targets is not None else None
            image = normalize(image, self.image_mean, self.image_std)
            image, target = self.resize(image, target)
            out_images.append(image)
            if out_targets is not None:
                out_targets.append(target)
        sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in out_images]
        return ImageList(self.batch_images(out_images), sizes), out_targets

    def postprocess(self, results: list[dict[str, Tensor]], image_sizes: list[tuple[int, int]],
                    original_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        if self.training:
            return results
        for res, size, orig in zip(results, image_sizes, original_sizes):
            res["boxes"] = resize_boxes(res["boxes"], size, orig)
        return results
