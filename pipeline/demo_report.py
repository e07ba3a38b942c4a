"""What the demo shows at the end: stage timings, headline metrics and where the outputs are.

The demo (``jobs/demo.py``) runs many jobs in a row; this module holds the parts that do not
need Ray or the other jobs: a clock that prints one progress line per stage with its wall
time, the top-1 accuracy of the classification column against the synthetic ground truth
(``pipeline.coco.evaluate`` scores boxes and masks only), and the final summary table.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TextIO

from pipeline import storage
from pipeline.coco import iter_output_tables
from pipeline.schema import STATUS_OK


class StageError(RuntimeError):
    """A demo stage failed; ``stage`` names it and the message says what to do."""

    def __init__(self, stage: str, message: str):
        self.stage = stage
        super().__init__(message)


@dataclass
class StageClock:
    """Numbered progress lines (``[demo 3/9] finetune detect ... done in 12.3s``) and per-stage times."""

    total: int
    out: TextIO = field(default_factory=lambda: sys.stdout)
    seconds: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    _index: int = 0

    def say(self, message: str) -> None:
        """A line under the current stage (details the user should see)."""
        print(f"[demo]   {message}", file=self.out, flush=True)

    @contextmanager
    def stage(self, name: str, what: str) -> Iterator[None]:
        """Time one stage; an exception inside becomes a ``StageError`` naming the stage."""
        self._index += 1
        print(f"[demo {self._index}/{self.total}] {name}: {what} ...", file=self.out, flush=True)
        start = time.perf_counter()
        try:
            yield
        except StageError:
            raise
        except Exception as e:  # noqa: BLE001 - every failure is reported with the stage it stopped
            self.seconds[name] = time.perf_counter() - start
            raise StageError(name, f"{type(e).__name__}: {e}") from e
        self.seconds[name] = time.perf_counter() - start
        print(f"[demo {self._index}/{self.total}] {name}: done in {self.seconds[name]:.1f}s "
              f"(total {self.elapsed:.0f}s)", file=self.out, flush=True)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def _largest_category(annotations: list[dict]) -> int | None:
    best = max(annotations, key=lambda a: float(a.get("area", 0.0)), default=None)
    return int(best["category_id"]) if best is not None else None


def classification_top1(output_url: str, gt_url: str,
                        storage_options: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """Top-1 accuracy of ``cls_labels`` against each image's largest ground-truth instance class.

    That is the class the fine-tuned classifier is trained on (``pipeline.training.data``'s rule
    for images without a class of their own). Rows are matched to ground-truth images by the
    file-name stem of their key. Returns None when the output has no classification column.
    """
    fs, path = storage.open_fs(gt_url, storage_options)
    with fs.open(path, "rb") as f:
        gt = json.load(f)
    names = {int(c["id"]): str(c["name"]) for c in gt["categories"]}
    by_image: dict[int, list[dict]] = {}
    for ann in gt.get("annotations", []):
        by_image.setdefault(int(ann["image_id"]), []).append(ann)
    truth: dict[str, str] = {}
    for img in gt["images"]:
        cat = _largest_category(by_image.get(int(img["id"]), []))
        if cat is not None:
            stem = str(img["file_name"]).rsplit("/", 1)[-1].rsplit(".", 1)[0]
            truth[stem] = names[cat]
    correct = scored = 0
    seen_column = False
    for _, table in iter_output_tables(output_url, storage_options=storage_options):
        if "cls_labels" not in table.column_names:
            continue
        for row in table.select(["key", "status", "cls_labels"]).to_pylist():
            if row["status"] != STATUS_OK or row["cls_labels"] is None:
                continue
            seen_column = True
            stem = str(row["key"]).rsplit("/", 1)[-1].rsplit(".", 1)[0]
            if stem not in truth:
                continue
            scored += 1
            correct += int(bool(row["cls_labels"]) and row["cls_labels"][0] == truth[stem])
    if not seen_column:
        return None
    return {"top1": correct / scored if scored else None, "images": scored}


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_summary(summary: Mapping[str, Any]) -> str:
    """The table printed at the end of the demo (``summary`` is what ``summary.json`` holds)."""
    m = summary.get("metrics", {})
    ann = summary.get("annotate", {})
    lines = ["", "=" * 72, "mnv3-pipeline demo summary", "=" * 72]
    lines.append(f"data         {summary['data']['train_images']} train / {summary['data']['val_images']} "
                 f"validation synthetic images ({summary['data']['url']})")
    for task, info in summary.get("models", {}).items():
        lines.append(f"model        {task:<9} {info['builder']} {info['precision']:<5} "
                     f"trained {info['train_seconds']:.0f}s / {info['steps']} steps; {info['note']}")
    lines.append(f"annotate     {ann.get('images', 0)} images ({ann.get('failed', 0)} failed) in "
                 f"{_fmt(ann.get('wall_s'), 1)}s: {_fmt(ann.get('images_per_s'), 2)} images/s end to end, "
                 f"{_fmt(ann.get('model_only_per_s'), 2)} images/s model-only "
                 f"({ann.get('cpus', '?')} CPUs, {ann.get('actors', '?')} actor(s))")
    lines.append(f"detection    box mAP {_fmt(m.get('box_map'))}   mAP@0.5 {_fmt(m.get('box_map50'))}   "
                 f"(synthetic validation split)")
    lines.append(f"segmentation mIoU {_fmt(m.get('miou'))}   "
                 f"pixel accuracy {_fmt(m.get('pixel_accuracy'))}   segm mAP {_fmt(m.get('segm_map'))}")
    if m.get("cls_top1") is not None:
        lines.append(f"classify     top-1 {_fmt(m.get('cls_top1'))} (largest shape's class)")
    out = summary.get("outputs", {})
    lines.append(f"parquet      {out.get('parquet')}")
    lines.append(f"previews     {out.get('previews')}")
    lines.append(f"summary      {out.get('summary')}")
    stages = summary.get("stage_seconds", {})
    lines.append("stages       " + ", ".join(f"{k} {v:.0f}s" for k, v in stages.items()))
    lines.append(f"wall time    {summary.get('wall_s', 0.0):.0f}s")
    for note in summary.get("notes", []):
        lines.append(f"note         {note}")
    lines.append("=" * 72)
    return "\n".join(lines)
