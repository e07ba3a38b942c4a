"""From annotate outputs to COCO: results JSON for other tools, and scores against ground truth.

Outputs are read with pyarrow alone (no Ray) from a prefix of per-shard Parquet files written
with schema v1. Rows are tied to ground-truth images by name (file name, key, stem), and
predicted labels to ground-truth categories by name, so a model whose label ids differ from
the dataset's (COCO 91-index, VOC 21, a fine-tuned head) is still scored correctly.

Evaluation:
- ``bbox``: pycocotools COCOeval on the detections against the ground-truth instances.
- ``segm``: the segmentation models are semantic (one mask per present class, no score), so
  each per-class mask is one result with score 1, scored against the ground-truth instances of
  that class in the image merged into one region (crowd instances stay as they are).
- ``semantic``: mIoU and pixel accuracy over background + the ground-truth categories, with the
  ground-truth map painted from the instance masks (255 = ignored: crowd regions and pixels where
  instances of different classes overlap).
Rows whose status is not ``ok`` stay in the evaluated image set with no predictions (they count
as misses) and are reported by status; rows with no ground-truth image are skipped and counted.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import posixpath
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pipeline import storage
from pipeline.commit import FAILED, OutputStore
from pipeline.schema import OUTPUT_SCHEMA, STATUS_OK, read_metadata

TASKS = ("detect", "segment", "classify")
BACKGROUND_NAMES = frozenset({"__background__", "background", "_background_"})
IGNORE = 255
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


# ---------------------------------------------------------------- reading outputs


def list_output_files(output_url: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """The Parquet files of an annotate output (a prefix searched recursively, or one file), sorted.

    Hidden and temporary files and folders (names starting with ``.`` or ``_``, such as the run's
    ``_manifest``) are skipped, as pyarrow, pandas and DuckDB do.
    """
    fs, root = storage.open_fs(output_url, storage_options)
    if fs.isfile(root):
        return [root]
    if not fs.exists(root):
        raise FileNotFoundError(f"annotate output {output_url!r} does not exist; pass the --output URL "
                                f"of an annotate run")
    prefix = root.rstrip("/") + "/"
    files = [p for p in fs.find(root) if p.endswith(".parquet")
             and not any(part.startswith((".", "_")) for part in p[len(prefix):].split("/"))]
    if not files:
        raise FileNotFoundError(f"no Parquet files under {output_url!r}; pass the --output URL of an "
                                f"annotate run (it holds one .parquet file per shard)")
    return sorted(files)


def iter_output_tables(output_url: str, *, storage_options: Mapping[str, Any] | None = None,
                       columns: Iterable[str] | None = None) -> Iterator[tuple[str, pa.Table]]:
    """(path, table) per Parquet file of an annotate output, in path order; schema v1 checked per file."""
    fs, _ = storage.open_fs(output_url, storage_options)
    wanted = list(columns) if columns is not None else list(OUTPUT_SCHEMA.names)
    unknown = [c for c in wanted if c not in OUTPUT_SCHEMA.names]
    if unknown:
        raise ValueError(f"columns {unknown} are not in output schema v1 ({OUTPUT_SCHEMA.names})")
    for path in list_output_files(output_url, storage_options):
        with fs.open(path, "rb") as f:
            try:
                pf = pq.ParquetFile(f)
            except (pa.ArrowException, OSError) as e:
                raise ValueError(f"{path} is not a readable Parquet file ({e}); remove it from the output "
                                 f"or re-run annotate with --overwrite") from e
            try:
                read_metadata(pf.schema_arrow)
            except ValueError as e:
                raise ValueError(f"{path}: {e}; re-run annotate with this version or point --input at "
                                 f"an mnv3-pipeline output") from e
            missing = [c for c in wanted if c not in pf.schema_arrow.names]
            if missing:
                raise ValueError(f"{path}: schema v1 file lacks columns {missing}")
            yield path, pf.read(columns=wanted).replace_schema_metadata(None)


def read_outputs(output_url: str, *, storage_options: Mapping[str, Any] | None = None,
                 columns: Iterable[str] | None = None) -> pa.Table:
    """All rows of an annotate output as one Arrow table (schema v1 checked file by file)."""
    return pa.concat_tables([t for _, t in iter_output_tables(output_url, storage_options=storage_options,
                                                              columns=columns)])


def failed_shards(output_url: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Shards the annotate run recorded as failed (unreadable: no rows) -> their error."""
    fs, root = storage.open_fs(output_url, storage_options)
    if fs.isfile(root):
        return {}
    records = OutputStore(output_url, storage_options).records()
    return {sid: r.error or "" for sid, r in sorted(records.items()) if r.status == FAILED}


def _output_rows(output_url: str, storage_options: Mapping[str, Any] | None) -> list[dict]:
    return read_outputs(output_url, storage_options=storage_options).to_pylist()


# ---------------------------------------------------------------- ground truth


def load_gt(gt_url: str, storage_options: Mapping[str, Any] | None = None) -> COCO:
    """A COCO ground-truth JSON (any fsspec URL) as a pycocotools ``COCO`` object."""
    fs, path = storage.open_fs(gt_url, storage_options)
    if not fs.isfile(path):
        raise FileNotFoundError(f"ground-truth file {gt_url!r} does not exist; pass a COCO annotations "
                                f"JSON with --gt")
    try:
        with fs.open(path, "rb") as f:
            dataset = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"ground-truth file {gt_url!r} is not JSON: {e}") from e
    if not isinstance(dataset, dict) or not all(k in dataset for k in ("images", "categories")):
        raise ValueError(f"ground-truth file {gt_url!r} is not a COCO annotations file (needs 'images' "
                         f"and 'categories')")
    dataset.setdefault("annotations", [])
    return _coco_from(dataset)


def _coco_from(dataset: dict) -> COCO:
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _stem(name: str) -> str:
    base = posixpath.basename(name)
    return base.rsplit(".", 1)[0] if "." in base else base


def _row_names(row: Mapping[str, Any]) -> list[str]:
    """Names a row may be known by in a ground truth, most specific first."""
    key = row.get("key") or ""
    names = [row.get("image_id") or "", f"{row.get('shard')}/{key}", key, posixpath.basename(key), _stem(key)]
    uri = row.get("source_uri") or ""
    member = uri.split("#", 1)[1] if "#" in uri else uri
    names += [member, posixpath.basename(member), _stem(member)]
    return [n for n in dict.fromkeys(names) if n]


class ImageMatcher:
    """Ties output rows to ground-truth image ids by file name, key or stem (ambiguous names unused)."""

    def __init__(self, gt: COCO):
        owners: dict[str, set[int]] = {}
        for img in gt.dataset["images"]:
            file_name = str(img.get("file_name", ""))
            names = {file_name, posixpath.basename(file_name), _stem(file_name), str(img.get("key") or "")}
            for name in names - {""}:
                owners.setdefault(name, set()).add(img["id"])
        self._ids = {name: next(iter(ids)) for name, ids in owners.items() if len(ids) == 1}

    def match(self, row: Mapping[str, Any]) -> int | None:
        for name in _row_names(row):
            if name in self._ids:
                return self._ids[name]
        return None


def stable_image_id(image_id: str) -> int:
    """An integer id for an output image id string, the same in every run (52 bits: JSON-safe)."""
    return int(hashlib.sha1(image_id.encode()).hexdigest()[:13], 16)


class CategoryMapper:
    """Predicted (label_id, label) -> ground-truth category id, by name; by id when no name is given."""

    def __init__(self, gt: COCO | None):
        cats = gt.dataset["categories"] if gt is not None else []
        self.by_name = {c["name"]: c["id"] for c in cats}
        self.ids = {c["id"] for c in cats}
        self.unmatched: Counter[str] = Counter()
        self._has_gt = gt is not None

    def map(self, label_id: int | None, label: str | None) -> int | None:
        if not self._has_gt:
            return None if label_id is None else int(label_id)
        if label and label in self.by_name:
            return self.by_name[label]
        if not label and label_id is not None and int(label_id) in self.ids:
            return int(label_id)
        self.unmatched[label or f"id {label_id}"] += 1
        return None

    def is_background(self, label_id: int | None, label: str | None) -> bool:
        if label in BACKGROUND_NAMES:
            return True
        return label_id == 0 and label not in self.by_name and 0 not in self.ids


# ---------------------------------------------------------------- building results


@dataclass
class Matched:
    """Output rows paired with the image id they get in the results, plus what was left out."""

    pairs: list[tuple[dict, int]] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)
    not_in_gt: int = 0
    duplicates: int = 0


def match_rows(rows: list[dict], gt: COCO | None) -> Matched:
    """Pair each row with a ground-truth image id (or a stable id when there is no ground truth)."""
    out = Matched()
    matcher = ImageMatcher(gt) if gt is not None else None
    seen: set[int] = set()
    for row in sorted(rows, key=lambda r: r["image_id"]):
        out.statuses[row["status"]] += 1
        image_id = matcher.match(row) if matcher else stable_image_id(row["image_id"])
        if image_id is None:
            out.not_in_gt += 1
            continue
        if image_id in seen:
            out.duplicates += 1
            continue
        seen.add(image_id)
        out.pairs.append((row, image_id))
    return out


def _box_scale(row: Mapping[str, Any], gt: COCO | None, image_id: int) -> tuple[float, float]:
    """Scale from the row's pixel frame to the ground truth's (1, 1 unless the sizes differ)."""
    if gt is None or not row.get("width") or not row.get("height"):
        return 1.0, 1.0
    img = gt.imgs[image_id]
    if not img.get("width") or not img.get("height"):
        return 1.0, 1.0
    return img["width"] / row["width"], img["height"] / row["height"]


def detection_results(matched: Matched, gt: COCO | None, cats: CategoryMapper) -> list[dict]:
    """COCO detection results: bbox xywh in ground-truth pixels, score, category_id, image_id."""
    results = []
    for row, image_id in matched.pairs:
        if row["status"] != STATUS_OK or not row.get("det_boxes"):
            continue
        sx, sy = _box_scale(row, gt, image_id)
        for box, label_id, label, score in zip(row["det_boxes"], row["det_label_ids"] or [],
                                               row["det_labels"] or [], row["det_scores"] or []):
            category_id = cats.map(label_id, label)
            if category_id is None:
                continue
            x0, y0, x1, y1 = (float(v) for v in box)
            results.append({"image_id": image_id, "category_id": category_id,
                            "bbox": [x0 * sx, y0 * sy, (x1 - x0) * sx, (y1 - y0) * sy],
                            "score": float(score)})
    return results


def segmentation_results(matched: Matched, gt: COCO | None, cats: CategoryMapper,
                         size_mismatch: Counter | None = None) -> list[dict]:
    """COCO segmentation results: one compressed RLE per present class, score 1 (masks are semantic)."""
    results = []
    for row, image_id in matched.pairs:
        if row["status"] != STATUS_OK or not row.get("seg_masks"):
            continue
        for m in row["seg_masks"]:
            if cats.is_background(m["label_id"], m["label"]):
                continue
            if gt is not None and list(m["size"]) != [gt.imgs[image_id].get("height"),
                                                      gt.imgs[image_id].get("width")]:
                if size_mismatch is not None:
                    size_mismatch[row["image_id"]] += 1
                continue
            category_id = cats.map(m["label_id"], m["label"])
            if category_id is None:
                continue
            results.append({"image_id": image_id, "category_id": category_id,
                            "segmentation": {"size": [int(s) for s in m["size"]], "counts": m["counts"]},
                            "score": 1.0})
    return results


def classification_results(matched: Matched) -> list[dict]:
    """Top-k labels per image: image_id, category_id (the model's label id), label, score, rank."""
    results = []
    for row, image_id in matched.pairs:
        if row["status"] != STATUS_OK or not row.get("cls_label_ids"):
            continue
        for rank, (label_id, label, score) in enumerate(zip(row["cls_label_ids"], row["cls_labels"] or [],
                                                            row["cls_scores"] or [])):
            results.append({"image_id": image_id, "category_id": int(label_id), "label": label,
                            "score": float(score), "rank": rank})
    return results


def export_coco(output_url: str, dest_url: str, *, gt_url: str | None = None, task: str = "detect",
                storage_options: Mapping[str, Any] | None = None) -> dict:
    """Write the outputs' ``task`` results as a COCO results JSON list at ``dest_url``; returns a summary.

    With ``gt_url`` image ids (and category ids, matched by name) are the ground truth's and rows
    with no ground-truth image are skipped; without it image ids are ``stable_image_id`` of the
    output image id and category ids are the model's label ids.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    gt = load_gt(gt_url, storage_options) if gt_url else None
    rows = _output_rows(output_url, storage_options)
    matched = match_rows(rows, gt)
    cats = CategoryMapper(gt)
    if task == "detect":
        results = detection_results(matched, gt, cats)
    elif task == "segment":
        results = segmentation_results(matched, gt, cats)
    else:
        results = classification_results(matched)
    if not results:
        raise ValueError(_no_results_message(output_url, task, rows, matched, gt_url))
    if gt is None:
        names = {image_id: row["image_id"] for row, image_id in matched.pairs}
        for r in results:
            r["mnv3_image_id"] = names[r["image_id"]]
    fs, path = storage.open_fs(dest_url, storage_options)
    storage.write_bytes_atomic(fs, path, json.dumps(results).encode())
    return {"output": dest_url, "task": task, "results": len(results), "rows": len(rows),
            "status": dict(matched.statuses), "not_in_gt": matched.not_in_gt,
            "duplicates": matched.duplicates, "unmatched_labels": dict(cats.unmatched)}


def _no_results_message(output_url: str, task: str, rows: list[dict], matched: Matched,
                        gt_url: str | None) -> str:
    """Why an export found nothing (pycocotools ``loadRes`` rejects an empty list, so none is written)."""
    column = {"detect": "det_boxes", "segment": "seg_masks", "classify": "cls_label_ids"}[task]
    statuses = ", ".join(f"{s}: {n}" for s, n in sorted(matched.statuses.items())) or "no rows"
    if not rows:
        why = "the output has no rows"
    elif gt_url and not matched.pairs:
        why = f"no output row matches an image of {gt_url} (by file name, key or stem)"
    elif not any(r.get(column) is not None for r in rows):
        why = (f"no row has {column}: the run did not have the {task} task enabled (use --task with a task "
               f"the run had, or re-run annotate with --tasks {task})")
    elif not any(r["status"] == STATUS_OK for r in rows):
        why = "no row has status ok"
    else:
        why = (f"every {task} result is empty (no boxes above the threshold, no masks, or labels not in the "
               f"ground truth's categories)")
    return (f"no {task} results to export from {output_url} ({len(rows)} rows; status {statuses}): {why}. "
            f"No file was written, because pycocotools loadRes rejects an empty results list")


# ---------------------------------------------------------------- evaluation


def _cocoeval(gt: COCO, results: list[dict], iou_type: str, image_ids: list[int]) -> dict[str, float | None]:
    """COCOeval summary stats by name; None where the ground truth has nothing to score."""
    if not results:
        has_gt = any(gt.getAnnIds(imgIds=image_ids, iscrowd=False))
        return {name: (0.0 if has_gt else None) for name in STAT_NAMES}
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes([dict(r) for r in results])
        ev = COCOeval(gt, dt, iou_type)
        ev.params.imgIds = sorted(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {name: (None if v < 0 else float(v)) for name, v in zip(STAT_NAMES, ev.stats)}


def class_region_gt(gt: COCO, image_ids: list[int]) -> COCO:
    """Ground truth with the non-crowd instances of each (image, class) merged into one region."""
    anns: list[dict] = []
    images = [gt.imgs[i] for i in image_ids]
    for image_id in image_ids:
        groups: dict[int, list[dict]] = {}
        for ann in gt.imgToAnns.get(image_id, []):
            if "segmentation" not in ann:
                continue
            if ann.get("iscrowd", 0):
                anns.append({**ann, "id": len(anns) + 1})
            else:
                groups.setdefault(ann["category_id"], []).append(gt.annToRLE(ann))
        for category_id, rles in sorted(groups.items()):
            merged = mask_utils.merge(rles, intersect=False) if len(rles) > 1 else rles[0]
            merged = {"size": list(merged["size"]), "counts": merged["counts"]}
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": category_id,
                         "segmentation": merged, "area": float(mask_utils.area(merged)),
                         "bbox": [float(v) for v in mask_utils.toBbox(merged)], "iscrowd": 0})
    return _coco_from({"images": images, "annotations": anns, "categories": gt.dataset["categories"]})


def semantic_gt_map(gt: COCO, image_id: int, class_index: Mapping[int, int]) -> np.ndarray:
    """HxW class-index map from the instance masks: 0 background, IGNORE for crowd and class clashes."""
    img = gt.imgs[image_id]
    out = np.zeros((img["height"], img["width"]), dtype=np.uint8)
    for ann in gt.imgToAnns.get(image_id, []):
        if "segmentation" not in ann or ann["category_id"] not in class_index:
            continue
        m = gt.annToMask(ann).astype(bool)
        if ann.get("iscrowd", 0):
            out[m] = IGNORE
            continue
        cls = class_index[ann["category_id"]]
        clash = m & (out != 0) & (out != cls)
        out[m & (out == 0)] = cls
        out[clash] = IGNORE
    return out


def _confuse(row: Mapping[str, Any], gt: COCO, image_id: int, class_index: Mapping[int, int],
             cats: CategoryMapper, confusion: np.ndarray) -> int:
    """Add one image's pixels to ``confusion`` (target x prediction); 1 if skipped (size mismatch)."""
    n = confusion.shape[0]
    target = semantic_gt_map(gt, image_id, class_index)
    pred = np.zeros_like(target)
    if row["status"] == STATUS_OK:
        masks = row.get("seg_masks") or []
        if any(list(m["size"]) != list(target.shape) for m in masks):
            return 1
        for m in masks:
            if cats.is_background(m["label_id"], m["label"]):
                continue
            category_id = cats.map(m["label_id"], m["label"])
            if category_id is None:
                continue
            decoded = mask_utils.decode({"size": list(m["size"]), "counts": m["counts"].encode()})
            pred[decoded.astype(bool)] = class_index[category_id]
    valid = target != IGNORE
    confusion += np.bincount(target[valid].astype(np.int64) * n + pred[valid],
                             minlength=n * n).reshape(n, n)
    return 0


def semantic_scores(matched: Matched, gt: COCO, cats: CategoryMapper) -> dict[str, Any]:
    """mIoU and pixel accuracy over background + the ground-truth categories, summed over images."""
    cat_ids = sorted(c["id"] for c in gt.dataset["categories"])
    class_index = {cid: i + 1 for i, cid in enumerate(cat_ids)}
    n = len(cat_ids) + 1
    if n >= IGNORE:
        raise ValueError(f"semantic evaluation supports up to {IGNORE - 2} categories, the ground truth has "
                         f"{len(cat_ids)}")
    confusion = np.zeros((n, n), dtype=np.int64)
    skipped_size = 0
    with warnings.catch_warnings():
        # pycocotools' decode trips numpy 2's __array__(copy=) deprecation on every call
        warnings.simplefilter("ignore", DeprecationWarning)
        for row, image_id in matched.pairs:
            skipped_size += _confuse(row, gt, image_id, class_index, cats, confusion)
    tp = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - tp
    names = ["background"] + [gt.cats[c]["name"] for c in cat_ids]
    per_class = {names[i]: float(tp[i] / union[i]) for i in range(n) if union[i] > 0}
    total = confusion.sum()
    return {
        "mIoU": float(np.mean(list(per_class.values()))) if per_class else None,
        "pixel_accuracy": float(tp.sum() / total) if total else None,
        "per_class_iou": per_class,
        "pixels": int(total),
        "images_skipped_size_mismatch": skipped_size,
    }


def _has(rows: list[dict], column: str) -> bool:
    return any(r["status"] == STATUS_OK and r.get(column) is not None for r in rows)


def evaluate(output_url: str, gt_url: str, *, storage_options: Mapping[str, Any] | None = None) -> dict:
    """Score an annotate output against a COCO ground truth; returns a JSON-ready metrics dict.

    Keys: ``images`` (row counts by status, matched, not in ground truth, ...), ``bbox`` and
    ``segm`` (COCOeval stats), ``semantic`` (mIoU, pixel accuracy, per-class IoU), present for the
    tasks the outputs hold, and ``warnings`` (human-readable notes about skipped data).
    """
    gt = load_gt(gt_url, storage_options)
    rows = _output_rows(output_url, storage_options)
    matched = match_rows(rows, gt)
    image_ids = [image_id for _, image_id in matched.pairs]
    cats = CategoryMapper(gt)
    shards_failed = failed_shards(output_url, storage_options)
    metrics: dict[str, Any] = {
        "images": {"rows": len(rows), "status": dict(sorted(matched.statuses.items())),
                   "failed_shards": len(shards_failed),
                   "evaluated": len(image_ids), "not_in_gt": matched.not_in_gt,
                   "duplicates": matched.duplicates,
                   "gt_images_not_in_output": len(gt.imgs) - len(image_ids)},
    }
    warnings = []
    if not image_ids:
        raise ValueError(f"no output row of {output_url!r} matches an image of {gt_url!r} (by file name, "
                         f"key or stem); check that the ground truth belongs to the annotated input")
    if _has(rows, "det_boxes"):
        metrics["bbox"] = _cocoeval(gt, detection_results(matched, gt, cats), "bbox", image_ids)
    if _has(rows, "seg_masks"):
        mismatch: Counter = Counter()
        results = segmentation_results(matched, gt, cats, mismatch)
        metrics["segm"] = _cocoeval(class_region_gt(gt, image_ids), results, "segm", image_ids)
        metrics["semantic"] = semantic_scores(matched, gt, CategoryMapper(gt))  # labels counted once
        if mismatch:
            warnings.append(f"{len(mismatch)} images have masks whose size differs from the ground truth's; "
                            f"their masks were not scored")
    if "bbox" not in metrics and "segm" not in metrics:
        warnings.append("the outputs hold no detections or masks (classification only): nothing to score")
    failed = {s: c for s, c in matched.statuses.items() if s != STATUS_OK}
    if failed:
        warnings.append(f"{sum(failed.values())} rows did not succeed ({failed}); "
                        f"their images count as misses")
    if shards_failed:
        first = "; ".join(f"{sid}: {err}" for sid, err in list(shards_failed.items())[:3])
        warnings.append(f"{len(shards_failed)} shards failed as a whole and have no rows (their ground-truth "
                        f"images count as not in output): {first}")
    if matched.not_in_gt:
        warnings.append(f"{matched.not_in_gt} rows have no image in the ground truth and were skipped")
    missing = metrics["images"]["gt_images_not_in_output"]
    if missing:
        warnings.append(f"{missing} ground-truth images are not in the output; the scores cover the "
                        f"{len(image_ids)} evaluated images only")
    if matched.duplicates:
        warnings.append(f"{matched.duplicates} rows repeat an image already seen and were skipped")
    if cats.unmatched:
        warnings.append(f"predicted labels not in the ground truth's categories were skipped: "
                        f"{dict(cats.unmatched.most_common(10))}")
    metrics["unmatched_labels"] = dict(cats.unmatched)
    metrics["warnings"] = warnings
    return metrics


def format_metrics(metrics: Mapping[str, Any]) -> str:
    """A plain-text table of the headline numbers of ``evaluate``'s result."""
    def fmt(v: Any) -> str:
        return "n/a" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = []
    images = metrics["images"]
    lines.append(f"images: {images['evaluated']} evaluated, status {images['status']}, "
                 f"{images['failed_shards']} failed shards, "
                 f"{images['not_in_gt']} not in ground truth, "
                 f"{images['gt_images_not_in_output']} ground-truth images not in output")
    shown = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")
    if "bbox" in metrics or "segm" in metrics:
        lines.append(f"{'metric':<10}" + "".join(f"{n:>9}" for n in shown))
        for kind in ("bbox", "segm"):
            if kind in metrics:
                lines.append(f"{kind:<10}" + "".join(f"{fmt(metrics[kind][n]):>9}" for n in shown))
    if "semantic" in metrics:
        sem = metrics["semantic"]
        lines.append(f"semantic  mIoU {fmt(sem['mIoU'])}  pixel accuracy {fmt(sem['pixel_accuracy'])}")
        lines.append("  " + "  ".join(f"{k}={v:.3f}" for k, v in sem["per_class_iou"].items()))
    for w in metrics.get("warnings", []):
        lines.append(f"warning: {w}")
    return "\n".join(lines)
