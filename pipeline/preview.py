"""A quick visual check of annotate outputs: K overlay images and an index.html that lists them.

Overlays are drawn on the original image bytes, re-read through each row's ``source_uri`` and
decoded by ``pipeline.decode`` (so the EXIF-rotated frame the boxes are in): semi-transparent
class-coloured masks, boxes with label and score, and the top-1 label. Colours are chosen by
label name, so a class has the same colour in detections and masks even when the two models
number their classes differently. Rows that failed are listed in the index with their error.
"""

from __future__ import annotations

import colorsys
import html
import io
import re
import tarfile
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont
from pycocotools import mask as mask_utils

from pipeline import storage
from pipeline.coco import iter_output_tables
from pipeline.decode import decode_image
from pipeline.schema import STATUS_OK

MASK_ALPHA = 0.45
MAX_SIDE = 1024  # overlays are downscaled to this longer side
MAX_BOXES = 50  # most confident detections drawn (and listed) per image
JPEG_QUALITY = 90
SourceLoader = Callable[[str], bytes]


def label_colour(label: str | None) -> tuple[int, int, int]:
    """A bright colour chosen by the label name (same name, same colour, in every run)."""
    hue = (zlib.crc32((label or "").encode()) % 360) / 360.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


class StorageSourceLoader:
    """Reads image bytes by the source URIs ``pipeline.sources`` writes.

    ``<url>`` (one object), ``<tar url>#<member name>`` (a tar member) or
    ``<parquet url>#row=<n>`` (row n of a Parquet file's image-bytes column: the file's only
    binary column, or a struct column with a binary ``bytes`` field). Tar files stay open (their
    member index read once) until ``close``, since previews usually come from a few shards.
    """

    def __init__(self, storage_options: Mapping[str, Any] | None = None):
        self.storage_options = storage_options
        self._tars: dict[str, tuple[Any, tarfile.TarFile]] = {}

    def __call__(self, source_uri: str) -> bytes:
        url, _, member = source_uri.partition("#")
        if not member:
            fs, path = storage.open_fs(url, self.storage_options)
            return fs.cat_file(path)
        if member.startswith("row=") and member[4:].isdigit():
            return self._parquet_row(url, int(member[4:]))
        tar = self._tar(url)
        try:
            extracted = tar.extractfile(member)
        except KeyError:
            raise FileNotFoundError(f"tar {url!r} has no member {member!r}") from None
        if extracted is None:
            raise ValueError(f"tar member {member!r} of {url!r} is not a regular file")
        return extracted.read()

    def _tar(self, url: str) -> tarfile.TarFile:
        if url not in self._tars:
            fs, path = storage.open_fs(url, self.storage_options)
            f = fs.open(path, "rb")
            try:
                self._tars[url] = (f, tarfile.open(fileobj=f, mode="r:*"))
            except tarfile.TarError as e:
                f.close()
                raise ValueError(f"{url!r} is not a readable tar file ({e}); source URIs with '#' name "
                                 f"tar members") from e
        return self._tars[url][1]

    def _parquet_row(self, url: str, row: int) -> bytes:
        fs, path = storage.open_fs(url, self.storage_options)
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            column, field = _image_column(pf.schema_arrow, url)
            start = 0
            for group in range(pf.metadata.num_row_groups):
                rows = pf.metadata.row_group(group).num_rows
                if row < start + rows:
                    values = pf.read_row_group(group, columns=[column]).column(column)
                    value = values[row - start].as_py()
                    data = value.get(field) if field and value else value
                    if data is None:
                        raise ValueError(f"row {row} of {url!r} has no image bytes in column {column!r}")
                    return data
                start += rows
        raise ValueError(f"{url!r} has {start} rows, no row {row}")

    def close(self) -> None:
        for f, tar in self._tars.values():
            tar.close()
            f.close()
        self._tars.clear()


def _image_column(schema: pa.Schema, url: str) -> tuple[str, str | None]:
    """(column, struct field or None) holding the image bytes of a Parquet source file."""
    binary = [f.name for f in schema if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)]
    structs = [f.name for f in schema if pa.types.is_struct(f.type) and f.type.get_field_index("bytes") >= 0]
    if len(binary) == 1:
        return binary[0], None
    if not binary and len(structs) == 1:
        return structs[0], "bytes"
    raise ValueError(f"cannot tell which column of {url!r} holds the images (binary columns {binary}, "
                     f"image structs {structs}); pass source_loader to render_previews")


def _decode_rle(m: Mapping[str, Any]) -> np.ndarray:
    with warnings.catch_warnings():  # pycocotools vs numpy 2's __array__(copy=) deprecation
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode({"size": list(m["size"]), "counts": m["counts"].encode()}).astype(bool)


def draw_overlay(image: np.ndarray, row: Mapping[str, Any], max_side: int = MAX_SIDE) -> Image.Image:
    """The image (HxWx3 uint8, the row's pixel frame) with the row's masks, boxes and top-1 label."""
    h, w = image.shape[:2]
    canvas = image.astype(np.float32)
    for m in row.get("seg_masks") or []:
        if m["label"] in ("__background__", "background"):
            continue
        mask = _decode_rle(m)
        if mask.shape != (h, w):
            mask = np.asarray(Image.fromarray(mask).resize((w, h), Image.Resampling.NEAREST))
        canvas[mask] = (1 - MASK_ALPHA) * canvas[mask] + MASK_ALPHA * np.array(label_colour(m["label"]))
    out = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    scale = min(1.0, max_side / max(h, w))
    if scale < 1.0:
        out = out.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR)
    # boxes are in the row's frame (width x height); the decoded image may differ if rescaled
    sx = scale * w / (row.get("width") or w)
    sy = scale * h / (row.get("height") or h)
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    line = max(1, round(max(out.size) / 300))
    for box, label, score in _detections(row)[:MAX_BOXES]:
        colour = label_colour(label)
        x0, y0, x1, y1 = box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=line)
        _text(draw, (x0, max(0.0, y0 - 11)), f"{label} {score:.2f}", colour, font)
    top = _top1(row)
    if top:
        _text(draw, (2, 2), top, (255, 255, 255), font)
    return out


def _text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, colour: tuple[int, int, int],
          font: ImageFont.ImageFont) -> None:
    left, top, right, bottom = draw.textbbox(xy, text, font=font)
    draw.rectangle([left - 1, top - 1, right + 1, bottom + 1], fill=(0, 0, 0))
    draw.text(xy, text, fill=colour, font=font)


def _detections(row: Mapping[str, Any]) -> list[tuple[list[float], str, float]]:
    dets = list(zip(row.get("det_boxes") or [], row.get("det_labels") or [], row.get("det_scores") or []))
    return sorted(dets, key=lambda d: -d[2])


def _top1(row: Mapping[str, Any]) -> str:
    labels, scores = row.get("cls_labels") or [], row.get("cls_scores") or []
    return f"{labels[0]} ({scores[0]:.2f})" if labels and scores else ""


def _file_name(index: int, image_id: str) -> str:
    return f"{index:04d}_{re.sub(r'[^A-Za-z0-9._-]', '_', image_id)[-80:]}.jpg"


def _pick_rows(output_url: str, k: int, storage_options: Mapping[str, Any] | None
               ) -> tuple[list[dict], list[dict], Counter]:
    """The first ``k`` ok rows and the first ``k`` failed rows (files in path order), and status counts."""
    ok: list[dict] = []
    failed: list[dict] = []
    statuses: Counter = Counter()
    for _, table in iter_output_tables(output_url, storage_options=storage_options):
        statuses.update(table.column("status").to_pylist())
        if len(ok) >= k and len(failed) >= k:
            continue
        for row in table.to_pylist():
            target = ok if row["status"] == STATUS_OK else failed
            if len(target) < k:
                target.append(row)
    return ok, failed, statuses


def render_previews(output_url: str, dest_url: str, k: int, *,
                    storage_options: Mapping[str, Any] | None = None,
                    source_loader: SourceLoader | None = None) -> str:
    """Render ``k`` overlays of an annotate output under ``dest_url`` plus ``index.html``; returns its URL.

    ``source_loader(source_uri) -> bytes`` reads the original images; the default reads any fsspec
    URL and tar members written as ``<tar url>#<member>``. An image that cannot be re-read or
    decoded is listed in the index with the reason instead of an overlay.
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"the number of previews must be an integer >= 1, got {k!r}")
    ok, failed, statuses = _pick_rows(output_url, k, storage_options)
    fs, root = storage.open_fs(dest_url, storage_options)
    own_loader = source_loader is None
    loader = StorageSourceLoader(storage_options) if own_loader else source_loader
    entries = []
    try:
        for i, row in enumerate(ok):
            name, problem = _file_name(i, row["image_id"]), None
            try:
                decoded = decode_image(loader(row["source_uri"]))
                buf = io.BytesIO()
                draw_overlay(decoded.array, row).save(buf, format="JPEG", quality=JPEG_QUALITY)
                storage.write_bytes_atomic(fs, storage.join(root, name), buf.getvalue())
            except Exception as e:  # one unreadable source must not stop the page
                name, problem = None, f"{type(e).__name__}: {e}"
            entries.append((row, name, problem))
    finally:
        if own_loader:
            loader.close()
    page = _index_html(output_url, entries, failed, statuses)
    index = storage.join(root, "index.html")
    storage.write_bytes_atomic(fs, index, page.encode())
    return storage.join(dest_url, "index.html")


def _index_html(output_url: str, entries: list[tuple[dict, str | None, str | None]], failed: list[dict],
                statuses: Counter) -> str:
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>mnv3-pipeline previews</title>",
        "<style>body{font-family:sans-serif}td{vertical-align:top;padding:4px}img{max-width:480px}"
        "table{border-collapse:collapse}tr{border-bottom:1px solid #ccc}.err{color:#b00}</style>",
        "</head><body>",
        f"<h1>Previews of {e(output_url)}</h1>",
        "<p>Rows by status: " + ", ".join(f"{e(s)}: {n}" for s, n in sorted(statuses.items())) + "</p>",
        "<table><tr><th>overlay</th><th>image</th><th>status</th><th>top-1</th><th>detections</th>"
        "<th>mask classes</th></tr>",
    ]
    for row, name, problem in entries:
        picture = (f"<a href='{e(name)}'><img src='{e(name)}' alt='{e(row['image_id'])}'></a>" if name
                   else f"<span class='err'>no overlay: {e(problem or '')}</span>")
        dets = ", ".join(f"{e(label)} {score:.2f}" for _, label, score in _detections(row)[:MAX_BOXES])
        masks = ", ".join(e(m["label"]) for m in row.get("seg_masks") or [])
        parts.append(f"<tr><td>{picture}</td><td>{e(row['image_id'])}<br><small>{e(row['source_uri'])}"
                     f"</small></td><td>{e(row['status'])}</td><td>{e(_top1(row))}</td><td>{dets}</td>"
                     f"<td>{masks}</td></tr>")
    parts.append("</table>")
    if failed:
        parts.append(f"<h2>Failed rows (first {len(failed)})</h2><table><tr><th>image</th><th>status</th>"
                     "<th>error</th></tr>")
        for row in failed:
            parts.append(f"<tr><td>{e(row['image_id'])}<br><small>{e(row['source_uri'])}</small></td>"
                         f"<td>{e(row['status'])}</td><td class='err'>{e(row.get('error') or '')}</td></tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)
