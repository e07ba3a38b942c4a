"""The output schema (v1): one Parquet row per image. The single definition used everywhere.

Plain Arrow types only (no Ray tensor extensions), so pyarrow, pandas and DuckDB read the
files without Ray. Boxes are absolute-pixel xyxy float32 in the original (EXIF-rotated)
image; masks are COCO RLE (pycocotools compressed ``counts`` as an ASCII string, ``size``
[h, w]) with one entry per present class.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa

SCHEMA_VERSION = "1"

STATUS_OK = "ok"
STATUS_DECODE_ERROR = "decode_error"
STATUS_INFERENCE_ERROR = "inference_error"
STATUS_READ_ERROR = "read_error"
STATUSES = (STATUS_OK, STATUS_DECODE_ERROR, STATUS_INFERENCE_ERROR, STATUS_READ_ERROR)

MASK_TYPE = pa.struct([
    ("label_id", pa.int32()),
    ("label", pa.string()),
    ("size", pa.list_(pa.int32(), 2)),
    ("counts", pa.string()),
    ("area", pa.int64()),
])

OUTPUT_SCHEMA = pa.schema([
    pa.field("image_id", pa.string(), nullable=False),   # "<shard_id>/<key>", unique in a run
    pa.field("key", pa.string(), nullable=False),        # member/object key inside the shard
    pa.field("source_uri", pa.string(), nullable=False),  # where the bytes came from
    pa.field("shard", pa.string(), nullable=False),      # shard id (deterministic)
    pa.field("width", pa.int32()),                       # original width after EXIF orientation
    pa.field("height", pa.int32()),
    pa.field("status", pa.string(), nullable=False),     # one of STATUSES
    pa.field("error", pa.string()),                      # null when status == "ok"
    pa.field("cls_label_ids", pa.list_(pa.int32())),     # top-k, best first
    pa.field("cls_labels", pa.list_(pa.string())),
    pa.field("cls_scores", pa.list_(pa.float32())),
    pa.field("det_boxes", pa.list_(pa.list_(pa.float32(), 4))),  # xyxy, pixels
    pa.field("det_label_ids", pa.list_(pa.int32())),
    pa.field("det_labels", pa.list_(pa.string())),
    pa.field("det_scores", pa.list_(pa.float32())),
    pa.field("seg_masks", pa.list_(MASK_TYPE)),          # one RLE per present class
])

REQUIRED = ("image_id", "key", "source_uri", "shard", "status")


def make_table(rows: Iterable[Mapping[str, Any]], metadata: Mapping[str, Any] | None = None) -> pa.Table:
    """Rows (dicts keyed by column name; absent task columns become null) -> a v1 table.

    ``metadata`` (lineage: models, weights sha256, thresholds, run id, ...) is stored as JSON
    under the ``mnv3`` key of the schema metadata, next to ``mnv3.schema_version``.
    """
    rows = list(rows)
    for i, row in enumerate(rows):
        missing = [k for k in REQUIRED if row.get(k) is None]
        if missing:
            raise ValueError(f"output row {i} (key={row.get('key')!r}) lacks required columns {missing}")
        unknown = set(row) - set(OUTPUT_SCHEMA.names)
        if unknown:
            raise ValueError(f"output row {i} (key={row.get('key')!r}) has columns not in schema v1: "
                             f"{sorted(unknown)}")
        if row["status"] not in STATUSES:
            raise ValueError(f"output row {i} (key={row['key']!r}) has unknown status {row['status']!r}")
    columns = {name: [row.get(name) for row in rows] for name in OUTPUT_SCHEMA.names}
    table = pa.Table.from_pydict(columns, schema=OUTPUT_SCHEMA)
    return table.replace_schema_metadata(schema_metadata(metadata))


def schema_metadata(metadata: Mapping[str, Any] | None = None) -> dict[bytes, bytes]:
    """Parquet/Arrow key-value metadata for a v1 file."""
    meta = {b"mnv3.schema_version": SCHEMA_VERSION.encode()}
    if metadata:
        meta[b"mnv3"] = json.dumps(metadata, sort_keys=True, default=str).encode()
    return meta


def read_metadata(schema: pa.Schema) -> dict[str, Any]:
    """The lineage dict stored by ``make_table`` (empty if absent); checks the schema version."""
    meta = schema.metadata or {}
    version = meta.get(b"mnv3.schema_version", b"").decode()
    if version != SCHEMA_VERSION:
        raise ValueError(f"not an mnv3 schema v{SCHEMA_VERSION} file (found version {version or 'none'!r})")
    return json.loads(meta[b"mnv3"]) if b"mnv3" in meta else {}
