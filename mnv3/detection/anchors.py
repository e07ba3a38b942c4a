"""Anchor boxes for the RPN: one set of (size x aspect ratio) boxes per feature-map cell."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def base_anchors(sizes: tuple[float, ...], aspect_ratios: tuple[float, ...],
                 dtype: torch.dtype = torch.float32) -> Tensor:
    """Zero-centred anchors [A, 4], ratio-major then size; half-extents rounded to integers.

    aspect ratio = h / w, so h = size * sqrt(r) and w = size / sqrt(r).
    """
    scales = torch.as_tensor(sizes, dtype=dtype)
    ratios = torch.as_tensor(aspect_ratios, dtype=dtype)
    h_ratios = torch.sqrt(ratios)
    w_ratios = 1 / h_ratios
    ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
    hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
    return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()


class AnchorGenerator(nn.Module):
    """Anchors for every image of a batch over several feature maps.

    Level i uses ``sizes[i]`` x ``aspect_ratios[i]``. The stride of a level is the padded
    batch size integer-divided by the grid size, per axis, so a level whose grid does not
    divide the image evenly (e.g. 800 // 13 = 61) gets that stride, as in torchvision.
    Anchors are ordered (y, x, anchor) within a level and levels are concatenated.
    """

    def __init__(self, sizes: tuple[tuple[int, ...], ...] = ((128, 256, 512),),
                 aspect_ratios: tuple[tuple[float, ...], ...] = ((0.5, 1.0, 2.0),)) -> None:
        super().__init__()
        if len(sizes) != len(aspect_ratios):
            raise ValueError(f"sizes ({len(sizes)} levels) and aspect_ratios ({len(aspect_ratios)} levels) "
                             "must have one entry per feature map")
        self.sizes = sizes
        self.aspect_ratios = aspect_ratios
        self.cell_anchors = [base_anchors(s, r) for s, r in zip(sizes, aspect_ratios)]

    def num_anchors_per_location(self) -> list[int]:
        return [len(s) * len(r) for s, r in zip(self.sizes, self.aspect_ratios)]

    def grid_anchors(self, grid_sizes: list[tuple[int, int]], strides: list[tuple[int, int]],
                     dtype: torch.dtype, device: torch.device) -> list[Tensor]:
        if len(grid_sizes) != len(self.cell_anchors):
            raise ValueError(f"got {len(grid_sizes)} feature maps but anchors are configured for "
                             f"{len(self.cell_anchors)}; sizes and aspect_ratios need one entry per map")
        out = []
        for (gh, gw), (sh, sw), base in zip(grid_sizes, strides, self.cell_anchors):
            base = base.to(dtype=dtype, device=device)
            shifts_x = torch.arange(gw, dtype=torch.int64, device=device) * sw
            shifts_y = torch.arange(gh, dtype=torch.int64, device=device) * sh
            sy, sx = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
            sx, sy = sx.reshape(-1), sy.reshape(-1)
            shifts = torch.stack((sx, sy, sx, sy), dim=1)
            out.append((shifts.view(-1, 1, 4) + base.view(1, -1, 4)).reshape(-1, 4))
        return out

    def forward(self, batch_shape: tuple[int, int], num_images: int,
                feature_maps: list[Tensor]) -> list[Tensor]:
        """Anchors [sum(H_i * W_i * A_i), 4] for each of ``num_images`` (all identical)."""
        grid_sizes = [(int(f.shape[-2]), int(f.shape[-1])) for f in feature_maps]
        strides = [(batch_shape[0] // gh, batch_shape[1] // gw) for gh, gw in grid_sizes]
        f = feature_maps[0]
        per_image = torch.cat(self.grid_anchors(grid_sizes, strides, f.dtype, f.device))
        return [per_image for _ in range(num_images)]
