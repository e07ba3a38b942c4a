"""Annotate outputs (schema v1 Parquet) built from a COCO ground truth: "perfect predictions".

Tests of export, evaluation and previews use these instead of running Ray: every ground-truth
instance becomes a detection with score 1, and the instance masks of each class become that
class's semantic RLE, exactly as the annotate job would write them.
"""

from __future__ import annotations

import posixpath
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from pycocotools import mask as mask_utils

from pipeline.schema import STATUS_OK, make_table


def encode(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def perfect_rows(coco: dict, data_url: str) -> list[dict]:
    """One ok row per ground-truth image with its instances as detections and per-class masks."""
    names = {c["id"]: c["name"] for c in coco["categories"]}
    anns: dict[int, list[dict]] = {}
    for ann in coco["annotations"]:
        anns.setdefault(ann["image_id"], []).append(ann)
    rows = []
    for img in coco["images"]:
        key = posixpath.splitext(img["file_name"])[0]
        shard = posixpath.splitext(img["shard"])[0]
        h, w = img["height"], img["width"]
        own = anns.get(img["id"], [])
        semantic: dict[int, np.ndarray] = {}
        for ann in own:
            m = mask_utils.decode({"size": ann["segmentation"]["size"],
                                   "counts": ann["segmentation"]["counts"].encode()}).astype(bool)
            semantic[ann["category_id"]] = semantic.get(ann["category_id"], np.zeros((h, w), bool)) | m
        rows.append({
            "image_id": f"{shard}/{key}", "key": key, "shard": shard,
            "source_uri": f"{data_url}/{img['shard']}#{img['file_name']}",
            "width": w, "height": h, "status": STATUS_OK,
            "det_boxes": [[x, y, x + bw, y + bh] for x, y, bw, bh in (a["bbox"] for a in own)],
            "det_label_ids": [a["category_id"] for a in own],
            "det_labels": [names[a["category_id"]] for a in own],
            "det_scores": [1.0] * len(own),
            "seg_masks": [{"label_id": cid, "label": names[cid], **encode(m), "area": int(m.sum())}
                          for cid, m in sorted(semantic.items())],
        })
    return rows


def write_outputs(rows: list[dict], out_dir: Path, metadata: dict | None = None) -> Path:
    """Write rows as one v1 Parquet file per shard under ``out_dir`` (like the annotate job)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    by_shard: dict[str, list[dict]] = {}
    for row in rows:
        by_shard.setdefault(row["shard"], []).append(row)
    for shard, shard_rows in by_shard.items():
        pq.write_table(make_table(shard_rows, metadata or {"run_id": "test"}), out_dir / f"{shard}.parquet")
    return out_dir
