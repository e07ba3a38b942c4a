"""Match anchors/proposals to ground truth by IoU and draw balanced training samples."""

from __future__ import annotations

import torch
from torch import Tensor

BELOW_LOW_THRESHOLD = -1
BETWEEN_THRESHOLDS = -2


class Matcher:
    """For each prediction (column of an IoU matrix [G, P]) the best ground truth index.

    IoU < low -> -1 (background), low <= IoU < high -> -2 (ignored). With
    ``allow_low_quality_matches`` each ground truth also keeps the predictions it overlaps
    best (ties included), even below ``high``.
    """

    def __init__(self, high_threshold: float, low_threshold: float,
                 allow_low_quality_matches: bool = False) -> None:
        if low_threshold > high_threshold:
            raise ValueError(f"low_threshold {low_threshold} must be <= high_threshold {high_threshold}")
        self.high_threshold = high_threshold
        self.low_threshold = low_threshold
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, quality: Tensor) -> Tensor:
        if quality.numel() == 0:
            if quality.shape[0] == 0:
                raise ValueError("No ground-truth boxes available for one of the images during training")
            raise ValueError("No proposal boxes available for one of the images during training")
        matched_vals, matches = quality.max(dim=0)
        all_matches = matches.clone() if self.allow_low_quality_matches else None
        below = matched_vals < self.low_threshold
        between = (matched_vals >= self.low_threshold) & (matched_vals < self.high_threshold)
        matches[below] = BELOW_LOW_THRESHOLD
        matches[between] = BETWEEN_THRESHOLDS
        if all_matches is not None:
            best_per_gt = quality.max(dim=1)[0]
            preds = torch.where(quality == best_per_gt[:, None])[1]
            matches[preds] = all_matches[preds]
        return matches


class BalancedPositiveNegativeSampler:
    """Draw up to ``batch_size_per_image`` labels per image, ``positive_fraction`` positive.

    Labels: >= 1 positive, 0 negative, -1 ignored. The draws are ``torch.randperm`` of the
    positives then of the negatives, image by image, i.e. the same calls in the same order
    as torchvision, so a shared ``torch.manual_seed`` gives both the same samples.
    """

    def __init__(self, batch_size_per_image: int, positive_fraction: float) -> None:
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction

    def __call__(self, labels: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        pos_masks, neg_masks = [], []
        for lab in labels:
            positive = torch.where(lab >= 1)[0]
            negative = torch.where(lab == 0)[0]
            num_pos = min(positive.numel(), int(self.batch_size_per_image * self.positive_fraction))
            num_neg = min(negative.numel(), self.batch_size_per_image - num_pos)
            pos_idx = positive[torch.randperm(positive.numel(), device=positive.device)[:num_pos]]
            neg_idx = negative[torch.randperm(negative.numel(), device=negative.device)[:num_neg]]
            pos_mask = torch.zeros_like(lab, dtype=torch.bool)
            neg_mask = torch.zeros_like(lab, dtype=torch.bool)
            pos_mask[pos_idx] = True
            neg_mask[neg_idx] = True
            pos_masks.append(pos_mask)
            neg_masks.append(neg_mask)
        return pos_masks, neg_masks
