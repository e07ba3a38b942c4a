"""``mnv3-pipeline synth``: write a synthetic COCO shapes dataset (tar shards + annotations.json)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from pipeline import synth


def parse_storage_options(items: list[str] | None) -> dict[str, Any]:
    """``["key=value", ...]`` -> dict; values are parsed as JSON when they can be (true, 3, {...})."""
    options: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--storage-option expects key=value, got {item!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="write a synthetic COCO dataset of shapes (WebDataset tar shards + annotations.json)",
        description="Render coloured shapes on textured backgrounds with exact instance masks and write "
                    "them as tar shards (<key>.jpg + <key>.json) plus a COCO annotations.json to any "
                    "fsspec URL. Deterministic by --seed.",
    )
    p.add_argument("--output", required=True, help="destination URL or path (local, s3://..., memory://...)")
    p.add_argument("--images", type=int, required=True, help="number of images")
    p.add_argument("--shards", type=int, required=True, help="number of tar shards (1..images)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--min-size", type=int, default=160, help="smallest image side in pixels (default 160)")
    p.add_argument("--max-size", type=int, default=480, help="largest image side in pixels (default 480)")
    p.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality 1-100 (default 90)")
    p.add_argument("--storage-option", action="append", metavar="KEY=VALUE",
                   help="fsspec storage option, repeatable (e.g. endpoint_url=http://127.0.0.1:9000)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        options = parse_storage_options(args.storage_option)
        start = time.perf_counter()
        summary = synth.write_dataset(
            args.output, images=args.images, shards=args.shards, seed=args.seed, storage_options=options,
            min_size=args.min_size, max_size=args.max_size, jpeg_quality=args.jpeg_quality,
        )
    except ValueError as e:
        print(f"mnv3-pipeline synth: error: {e}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    print(f"wrote {summary['images']} images, {summary['instances']} instances "
          f"({summary['categories']} categories) in {len(summary['shards'])} shards, "
          f"{summary['bytes'] / 1e6:.1f} MB, {seconds:.1f} s ({summary['images'] / seconds:.0f} images/s)")
    print(f"annotations: {summary['annotations']}")
    shards = summary["shards"]
    print(f"shards: {shards[0]}" + (f" ... {shards[-1]}" if len(shards) > 1 else ""))
    return 0
