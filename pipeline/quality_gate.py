"""Accuracy gate for int8 models: measure int8 against fp32 on held-out images, refuse big drops.

Int8 must not silently lose quality. Before an int8 model is saved, ``evaluate_gate`` runs
the fp32 and int8 models on held-out images and scores both with the task's metric, in
percentage points:

* classification: top-1 accuracy against labels, or (no labels) top-1 agreement with fp32;
* detection: COCO box mAP (pycocotools) against labels, or AP50 against the fp32
  detections (score >= ``pseudo_gt_score``, or half fp32's best score when lower) taken as
  ground truth;
* segmentation: mIoU against label maps (255 = ignore), or against the fp32 argmax.

``drop = fp32 - int8``; above ``max_drop`` ``enforce`` raises ``QualityGateError`` telling
the user to run fp32/bf16 or to fine-tune with QAT. The numbers go into the artifact.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

DEFAULT_MAX_DROP = {"classification": 3.0, "detection": 5.0, "segmentation": 3.0}
IGNORE_INDEX = 255


class QualityGateError(RuntimeError):
    """The int8 model loses more accuracy than allowed."""


@dataclass
class GateResult:
    """Scores of fp32 and int8 on the same images, in percentage points."""

    task: str
    metric: str
    reference: str  # "labels" or "fp32" (fp32 outputs used as ground truth)
    fp32: float
    int8: float
    images: int
    max_drop: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def drop(self) -> float:
        return self.fp32 - self.int8

    @property
    def passed(self) -> bool:
        return self.drop <= self.max_drop

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(drop=round(self.drop, 4), passed=self.passed)
        return out

    def summary(self) -> str:
        ref = "against labels" if self.reference == "labels" else "with fp32 outputs as ground truth"
        return (f"{self.task} {self.metric} {ref} on {self.images} held-out images: fp32 {self.fp32:.2f}, "
                f"int8 {self.int8:.2f}, drop {self.drop:.2f} (allowed {self.max_drop:.2f})")


def enforce(result: GateResult, model_name: str = "the model") -> GateResult:
    """Return ``result`` if it passed, else raise ``QualityGateError`` saying what to do instead."""
    if not result.passed:
        raise QualityGateError(
            f"int8 refused for {model_name}: {result.summary()}. Int8 loses too much quality here; "
            "run this model in fp32 or bf16 (precision: fp32 / bf16), or fine-tune it with "
            "quantization-aware training (mnv3-pipeline finetune with QAT) and quantize that checkpoint. "
            "To accept the loss anyway, raise --max-drop.")
    return result


def _split(batch: Any) -> tuple[Any, Any]:
    """A batch is the model input, or a *tuple* (input, labels); detector inputs are lists."""
    if isinstance(batch, tuple) and len(batch) == 2:
        return batch
    return batch, None


# --------------------------------------------------------------------------- classification

def classification_gate(fp32: nn.Module, int8: nn.Module, batches: Iterable[Any],
                        max_drop: float) -> GateResult:
    """``batches`` yield NCHW tensors or (tensor, labels) pairs."""
    n = agree = fp_right = q_right = 0
    labelled = True
    with torch.no_grad():
        for batch in batches:
            x, labels = _split(batch)
            a = fp32(x).argmax(1)
            b = int8(x).argmax(1)
            n += len(a)
            agree += int((a == b).sum())
            if labels is None:
                labelled = False
            else:
                labels = torch.as_tensor(labels)
                fp_right += int((a == labels).sum())
                q_right += int((b == labels).sum())
    if n == 0:
        raise ValueError("accuracy gate got no held-out images")
    agreement = 100.0 * agree / n
    if labelled:
        return GateResult("classification", "top1", "labels", 100.0 * fp_right / n, 100.0 * q_right / n, n,
                          max_drop, {"top1_agreement": agreement})
    return GateResult("classification", "top1_agreement", "fp32", 100.0, agreement, n, max_drop,
                      {"top1_agreement": agreement})


# --------------------------------------------------------------------------- detection

def _coco_gt(targets: Sequence[dict[str, Tensor]], sizes: Sequence[tuple[int, int]]):
    from pycocotools.coco import COCO

    images, anns, cats = [], [], set()
    for i, (t, (h, w)) in enumerate(zip(targets, sizes)):
        images.append({"id": i + 1, "height": int(h), "width": int(w)})
        for box, label in zip(t["boxes"].tolist(), t["labels"].tolist()):
            x0, y0, x1, y1 = box
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(label), "iscrowd": 0,
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "area": max(x1 - x0, 0) * max(y1 - y0, 0)})
            cats.add(int(label))
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": c} for c in sorted(cats)]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def box_map(predictions: Sequence[dict[str, Tensor]], targets: Sequence[dict[str, Tensor]],
            sizes: Sequence[tuple[int, int]]) -> tuple[float, float]:
    """(mAP@[.5:.95], AP50) in percent with pycocotools; 0 when nothing is detected."""
    from pycocotools.cocoeval import COCOeval

    gt = _coco_gt(targets, sizes)
    if not gt.dataset["annotations"]:
        return (100.0, 100.0) if all(len(p["boxes"]) == 0 for p in predictions) else (0.0, 0.0)
    dets = []
    for i, p in enumerate(predictions):
        for box, label, score in zip(p["boxes"].tolist(), p["labels"].tolist(), p["scores"].tolist()):
            x0, y0, x1, y1 = box
            dets.append({"image_id": i + 1, "category_id": int(label), "bbox": [x0, y0, x1 - x0, y1 - y0],
                         "score": float(score)})
    if not dets:
        return 0.0, 0.0
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return max(float(ev.stats[0]), 0.0) * 100.0, max(float(ev.stats[1]), 0.0) * 100.0


def detection_gate(fp32: nn.Module, int8: nn.Module, batches: Iterable[Any], max_drop: float,
                   pseudo_gt_score: float = 0.5) -> GateResult:
    """``batches`` yield lists of CHW images, or (images, targets) with ``boxes``/``labels`` targets."""
    fp_out, q_out, targets, sizes = [], [], [], []
    labelled = True
    with torch.no_grad():
        for batch in batches:
            images, t = _split(batch)
            fp_out += [{k: v.detach() for k, v in o.items()} for o in fp32(list(images))]
            q_out += [{k: v.detach() for k, v in o.items()} for o in int8(list(images))]
            sizes += [tuple(img.shape[-2:]) for img in images]
            if t is None:
                labelled = False
            else:
                targets += list(t)
    if not sizes:
        raise ValueError("accuracy gate got no held-out images")
    if labelled:
        fp_map, fp_50 = box_map(fp_out, targets, sizes)
        q_map, q_50 = box_map(q_out, targets, sizes)
        return GateResult("detection", "box_map", "labels", fp_map, q_map, len(sizes), max_drop,
                          {"box_map50_fp32": fp_50, "box_map50_int8": q_50})
    threshold = pseudo_gt_threshold(fp_out, pseudo_gt_score)
    pseudo = [{"boxes": o["boxes"][o["scores"] >= threshold],
               "labels": o["labels"][o["scores"] >= threshold]} for o in fp_out]
    fp_map, fp_50 = box_map(fp_out, pseudo, sizes)
    q_map, q_50 = box_map(q_out, pseudo, sizes)
    return GateResult("detection", "box_map50", "fp32", fp_50, q_50, len(sizes), max_drop,
                      {"box_map_fp32": fp_map, "box_map_int8": q_map, "pseudo_gt_score": threshold,
                       "pseudo_gt_boxes": int(sum(len(p["boxes"]) for p in pseudo))})


def pseudo_gt_threshold(fp_out: Sequence[dict[str, Tensor]], pseudo_gt_score: float) -> float:
    """Score above which fp32 detections count as ground truth: ``pseudo_gt_score``, lowered to half
    the best fp32 score when no detection reaches it.

    A young or weak detector (a short fine-tune) may score nothing above 0.5; with an empty
    pseudo ground truth both models would score 0 and the gate would pass without comparing
    anything. Its most confident boxes are still what int8 has to reproduce.
    """
    best = max((float(o["scores"].max()) for o in fp_out if len(o["scores"])), default=0.0)
    return pseudo_gt_score if best >= pseudo_gt_score else best / 2.0


# --------------------------------------------------------------------------- segmentation

def confusion(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """num_classes x num_classes confusion counts (rows: target), ignoring IGNORE_INDEX."""
    keep = target != IGNORE_INDEX
    idx = target[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(idx, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def mean_iou(conf: Tensor) -> float:
    """Mean IoU in percent over classes that appear in target or prediction."""
    conf = conf.double()
    inter = conf.diag()
    union = conf.sum(0) + conf.sum(1) - inter
    present = union > 0
    if not bool(present.any()):
        return 100.0
    return float((inter[present] / union[present]).mean()) * 100.0


def segmentation_gate(fp32: nn.Module, int8: nn.Module, batches: Iterable[Any],
                      max_drop: float) -> GateResult:
    """``batches`` yield NCHW tensors or (tensor, NHW label maps); models return {"out": logits}."""
    conf_fp = conf_q = None
    n = 0
    labelled = True
    with torch.no_grad():
        for batch in batches:
            x, labels = _split(batch)
            a = fp32(x)["out"]
            b = int8(x)["out"]
            c = a.shape[1]
            pa, pb = a.argmax(1), b.argmax(1)
            if conf_fp is None:
                conf_fp = torch.zeros(c, c, dtype=torch.long)
                conf_q = torch.zeros(c, c, dtype=torch.long)
            if labels is None:
                labelled = False
                labels = pa
            conf_fp += confusion(pa, torch.as_tensor(labels), c)
            conf_q += confusion(pb, torch.as_tensor(labels), c)
            n += len(x)
    if n == 0:
        raise ValueError("accuracy gate got no held-out images")
    pixel_agreement = float(np.trace(conf_q.numpy()) / max(conf_q.sum().item(), 1)) * 100.0
    return GateResult("segmentation", "miou", "labels" if labelled else "fp32", mean_iou(conf_fp),
                      mean_iou(conf_q), n, max_drop, {"pixel_accuracy_int8": pixel_agreement})


_GATES = {"classification": classification_gate, "detection": detection_gate,
          "segmentation": segmentation_gate}


def evaluate_gate(task: str, fp32: nn.Module, int8: nn.Module, batches: Iterable[Any],
                  max_drop: float | None = None) -> GateResult:
    """Score fp32 and int8 on ``batches`` with the task's metric (does not raise on a drop)."""
    if task not in _GATES:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(_GATES)}")
    if max_drop is None:
        max_drop = DEFAULT_MAX_DROP[task]
    fp32.eval()
    int8.eval()
    return _GATES[task](fp32, int8, batches, float(max_drop))
