"""``mnv3-pipeline evaluate``: score annotate outputs against a COCO ground truth (mAP, mIoU)."""

from __future__ import annotations

import argparse
import json
import sys

from jobs.export_coco import add_storage_flags, storage_options
from pipeline import coco, storage


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="box/segm mAP (pycocotools COCOeval) and semantic mIoU of outputs vs a COCO ground truth",
        description="Read the per-shard Parquet files of an annotate run (no Ray needed), match rows to "
                    "ground-truth images by file name and labels to categories by name, and print box "
                    "mAP, segm mAP (per-class masks vs merged class regions) and semantic mIoU / pixel "
                    "accuracy. Rows that failed count as misses and are reported.",
    )
    p.add_argument("--input", required=True, help="output URL of an annotate run (prefix of Parquet files)")
    p.add_argument("--gt", required=True, help="COCO ground-truth annotations JSON (local path or URL)")
    p.add_argument("--output", help="also write the metrics as JSON here")
    add_storage_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        options = storage_options(args)
        metrics = coco.evaluate(args.input, args.gt, storage_options=options)
        if args.output:
            fs, path = storage.open_fs(args.output, options)
            storage.write_bytes_atomic(fs, path, json.dumps(metrics, indent=2).encode())
    except (FileNotFoundError, ValueError) as e:
        print(f"mnv3-pipeline evaluate: error: {e}", file=sys.stderr)
        return 2
    print(coco.format_metrics(metrics))
    if args.output:
        print(f"metrics: {args.output}")
    return 0
