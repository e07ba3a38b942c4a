"""Per-epoch validation with the same numbers the annotate + evaluate path reports.

Detection: pycocotools COCOeval on the validation ground truth (box mAP, mAP@0.5), through
``pipeline.coco``. Segmentation: mIoU and pixel accuracy over background + the categories
from a confusion matrix (255 = not scored), logits upsampled to the original image size as
the annotate job does. Classification: top-1 (and top-5 when there are >= 5 classes).
Images are preprocessed through ``mnv3.transforms`` exactly as at inference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mnv3 import transforms
from pipeline import coco as coco_eval
from pipeline.training.data import IGNORE_INDEX, CategoryMap, CocoSource, classification_label, semantic_mask


@dataclass
class ValImage:
    """One decoded validation image with its dataset record."""

    record: dict
    pixels: np.ndarray  # HWC uint8


@torch.no_grad()
def evaluate_detection(
    model: nn.Module, images: Sequence[ValImage], source: CocoSource, cats: CategoryMap, batch_size: int = 1
) -> dict[str, float | None]:
    """COCO box metrics of ``model`` (eval mode) on ``images``: map (AP@[.5:.95]), map50, map75, ar100.

    One image per call by default: a detector pads a batch to its largest image, which shifts
    the outputs slightly, so the metric would depend on how images happen to be grouped.
    """
    model.eval()
    results: list[dict] = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        outputs = model([transforms.to_tensor(v.pixels) for v in chunk])
        for v, out in zip(chunk, outputs):
            for box, label, score in zip(
                out["boxes"].tolist(), out["labels"].tolist(), out["scores"].tolist()
            ):
                category_id = cats.category_id(label)
                if category_id is None:
                    continue
                x1, y1, x2, y2 = box
                results.append(
                    {
                        "image_id": int(v.record["id"]),
                        "category_id": category_id,
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "score": float(score),
                    }
                )
    gt = coco_eval._coco_from(source.coco_dict())
    stats = coco_eval._cocoeval(gt, results, "bbox", [int(v.record["id"]) for v in images])
    return {
        "map": stats["AP"],
        "map50": stats["AP50"],
        "map75": stats["AP75"],
        "ar100": stats["AR100"],
        "detections": len(results),
    }


@torch.no_grad()
def evaluate_segmentation(
    model: nn.Module, images: Sequence[ValImage], cats: CategoryMap, resize_size: int
) -> dict[str, float | None]:
    """mIoU and pixel accuracy at original resolution (prediction = argmax of upsampled logits)."""
    model.eval()
    preset = transforms.SegmentationPreset(resize_size=resize_size)
    n = cats.num_classes
    confusion = np.zeros((n, n), dtype=np.int64)
    for v in images:
        h, w = v.pixels.shape[:2]
        logits = model(preset(transforms.to_tensor(v.pixels))[None])["out"]
        pred = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False).argmax(1)[0].numpy()
        target = semantic_mask(v.record, cats)
        valid = target != IGNORE_INDEX
        confusion += np.bincount(target[valid].astype(np.int64) * n + pred[valid], minlength=n * n).reshape(
            n, n
        )
    tp = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - tp
    ious = [tp[i] / union[i] for i in range(n) if union[i] > 0]
    total = confusion.sum()
    return {
        "miou": float(np.mean(ious)) if ious else None,
        "pixel_accuracy": float(tp.sum() / total) if total else None,
    }


@torch.no_grad()
def evaluate_classification(
    model: nn.Module,
    images: Sequence[ValImage],
    source: CocoSource,
    cats: CategoryMap,
    resize_size: int,
    crop_size: int,
    batch_size: int = 16,
) -> dict[str, float | None]:
    """Top-1 (and top-5) accuracy with the eval preset (resize shorter side, centre crop)."""
    model.eval()
    preset = transforms.ClassificationPreset(crop_size=crop_size, resize_size=resize_size)
    correct1 = correct5 = 0
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        x = torch.stack([preset(transforms.to_tensor(v.pixels)) for v in chunk])
        y = torch.tensor([classification_label(v.record, cats, source) for v in chunk])
        logits = model(x)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += int((top[:, 0] == y).sum())
        correct5 += int((top == y[:, None]).any(1).sum())
    total = max(len(images), 1)
    out = {"top1": correct1 / total}
    if cats.num_classes >= 5:
        out["top5"] = correct5 / total
    return out


# The metric that decides "best" and is printed first, per task.
PRIMARY_METRIC = {"detect": "map50", "segment": "miou", "classify": "top1"}
