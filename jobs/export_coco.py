"""``mnv3-pipeline export-coco``: annotate outputs -> a COCO results JSON that pycocotools loads."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from jobs import config
from jobs.synth import parse_storage_options
from pipeline import coco


def add_storage_flags(p: argparse.ArgumentParser) -> None:
    """``--config`` (its ``storage`` section) and ``--storage-option`` flags, shared with ``evaluate``."""
    p.add_argument("--config", help="annotate config file (YAML/TOML) whose storage options to use")
    p.add_argument("--storage-option", action="append", metavar="KEY=VALUE",
                   help="fsspec storage option, repeatable, over the config's (e.g. "
                        "endpoint_url=http://127.0.0.1:9000)")


def storage_options(args: argparse.Namespace) -> dict[str, Any]:
    """The config's output storage options with ``--storage-option`` values on top."""
    base = config.load(args.config).storage.for_output() if args.config else {}
    return {**base, **parse_storage_options(args.storage_option)}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export-coco",
        help="write annotate outputs as a COCO results JSON (detections, masks or labels)",
        description="Read the per-shard Parquet files of an annotate run (no Ray needed) and write a COCO "
                    "results list: detect -> bbox [x, y, w, h] + score; segment -> one compressed RLE per "
                    "class with score 1; classify -> top-k labels. With --gt, image ids and category ids "
                    "are the ground truth's (matched by file name and category name).",
    )
    p.add_argument("--input", required=True, help="output URL of an annotate run (prefix of Parquet files)")
    p.add_argument("--output", required=True, help="results JSON to write (local path or fsspec URL)")
    p.add_argument("--gt", help="COCO ground-truth annotations JSON whose image/category ids to use")
    p.add_argument("--task", choices=coco.TASKS, default="detect", help="which results to export "
                   "(default detect)")
    add_storage_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        summary = coco.export_coco(args.input, args.output, gt_url=args.gt, task=args.task,
                                   storage_options=storage_options(args))
    except (FileNotFoundError, ValueError) as e:
        print(f"mnv3-pipeline export-coco: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {summary['results']} {summary['task']} results from {summary['rows']} rows "
          f"(status {summary['status']}) to {summary['output']}")
    if not summary["results"]:
        print("warning: no results to export (an empty list, which pycocotools loadRes rejects); check "
              "--task and that the run had this task enabled", file=sys.stderr)
    if summary["not_in_gt"]:
        print(f"warning: {summary['not_in_gt']} rows have no image in {args.gt} and were skipped",
              file=sys.stderr)
    if summary["unmatched_labels"]:
        print(f"warning: labels not in the ground truth's categories were skipped: "
              f"{summary['unmatched_labels']}", file=sys.stderr)
    return 0
