"""The shared presets: sizes, crop placement, normalization and input checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mnv3.transforms import (
    ClassificationPreset,
    SegmentationPreset,
    center_crop,
    normalize,
    resize_shorter,
    shorter_side_size,
    to_tensor,
)


def test_shorter_side_size_truncates_like_torchvision():
    assert shorter_side_size(480, 640, 256) == (256, 341)
    assert shorter_side_size(640, 480, 232) == (309, 232)


def test_classification_preset_shape_and_normalization():
    img = torch.full((3, 300, 500), 0.5)
    out = ClassificationPreset()(img)
    assert out.shape == (3, 224, 224)
    expected = (0.5 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(out[:, 100, 100], expected, atol=1e-5)


def test_segmentation_preset_keeps_aspect():
    out = SegmentationPreset(resize_size=320)(torch.rand(3, 200, 400))
    assert out.shape == (3, 320, 640)


def test_center_crop_is_centered_and_pads_small_images():
    img = torch.arange(10 * 10, dtype=torch.float32).reshape(1, 10, 10).repeat(3, 1, 1)
    crop = center_crop(img, 4)
    assert crop[0, 0, 0] == img[0, 3, 3]
    padded = center_crop(torch.ones(3, 2, 2), 4)
    assert padded.shape == (3, 4, 4) and padded.sum() == 3 * 4


def test_resize_is_antialiased():
    stripes = torch.zeros(3, 64, 64)
    stripes[:, :, ::2] = 1.0
    small = resize_shorter(stripes, 8)
    assert torch.allclose(small, torch.full_like(small, 0.5), atol=0.05)


def test_to_tensor_and_bad_inputs():
    arr = np.zeros((5, 7, 3), dtype=np.uint8)
    arr[..., 0] = 255
    t = to_tensor(arr)
    assert t.shape == (3, 5, 7) and t[0].min() == 1.0 and t[1].max() == 0.0
    with pytest.raises(ValueError, match="RGB"):
        to_tensor(np.zeros((5, 7), dtype=np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        to_tensor(np.zeros((5, 7, 3), dtype=np.uint16))
    with pytest.raises(ValueError, match="3 channels"):
        normalize(torch.zeros(4, 5, 5))
    with pytest.raises(ValueError, match="empty"):
        shorter_side_size(0, 5, 10)
