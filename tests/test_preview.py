"""Previews: K overlays drawn on the original tar members and an index.html that lists them."""

from __future__ import annotations

import copy
import io
import json
import re
import tarfile

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from outputs_from_gt import perfect_rows, write_outputs
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline import synth
from pipeline.preview import JPEG_QUALITY, render_previews
from pipeline.schema import STATUS_DECODE_ERROR, make_table


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("preview")
    data = root / "data"
    synth.write_dataset(str(data), images=5, shards=1, seed=4, min_size=96, max_size=160)
    gt = json.loads((data / synth.ANNOTATIONS_FILE).read_text())
    rows = perfect_rows(gt, str(data))
    for row in rows:
        row.update(cls_label_ids=[2], cls_labels=["rectangle"], cls_scores=[0.5])
    rows[-1] = {**{k: rows[-1][k] for k in ("image_id", "key", "source_uri", "shard")},
                "status": STATUS_DECODE_ERROR, "error": "truncated <JPEG>"}
    with tarfile.open(data / synth.shard_name(0)) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    return root, rows, members, str(write_outputs(rows, root / "out"))


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64)


def test_overlays_and_index(outputs, tmp_path):
    _, rows, members, out = outputs
    index = render_previews(out, str(tmp_path / "previews"), 3)
    assert index == str(tmp_path / "previews" / "index.html")
    page = (tmp_path / "previews" / "index.html").read_text()
    overlays = sorted(p.name for p in (tmp_path / "previews").glob("*.jpg"))
    assert len(overlays) == 3
    for name in overlays:
        assert f"src='{name}'" in page
    assert "rectangle (0.50)" in page and "decode_error" in page
    assert "truncated &lt;JPEG&gt;" in page  # failed rows are listed, escaped
    assert re.search(r"ok: 4", page) and re.search(r"decode_error: 1", page)

    row = rows[0]
    source = pixels(members[row["source_uri"].split("#", 1)[1]])
    overlay = pixels((tmp_path / "previews" / overlays[0]).read_bytes())
    assert overlay.shape == source.shape
    diff = np.abs(overlay - source).mean(axis=2)
    x0, y0, x1, y1 = (int(round(v)) for v in row["det_boxes"][0])
    assert diff[y0 + 1:y1 - 1, x0 + 1:x1 - 1].mean() > 15, "the box's inside should be tinted by its mask"
    drawn = np.zeros(source.shape[:2], bool)
    for m in row["seg_masks"]:
        drawn |= mask_utils.decode({"size": m["size"], "counts": m["counts"].encode()}).astype(bool)
    for (bx0, by0, bx1, by1), label in zip(row["det_boxes"], row["det_labels"]):
        text_end = int(bx0) + 7 * len(f"{label} 1.00") + 4
        drawn[max(int(by0) - 14, 0):int(by1) + 3, max(int(bx0) - 3, 0):max(int(bx1), text_end) + 3] = True
    drawn[:16, :7 * len("rectangle (0.50)") + 6] = True  # the top-1 label
    assert (~drawn).sum() > 1000
    # away from the drawing the overlay is the source re-encoded as JPEG (median: 8x8 blocks that
    # straddle a drawn edge differ a little)
    buf = io.BytesIO()
    Image.fromarray(source.astype(np.uint8)).save(buf, format="JPEG", quality=JPEG_QUALITY)
    untouched = np.abs(overlay - pixels(buf.getvalue())).mean(axis=2)
    assert np.median(untouched[~drawn]) < 1.5, "pixels away from the drawing should stay as they were"


def test_custom_loader_and_unreadable_source(outputs, tmp_path):
    _, rows, members, out = outputs
    calls = []

    def loader(uri: str) -> bytes:
        calls.append(uri)
        if len(calls) == 2:
            raise FileNotFoundError(f"gone: {uri}")
        return members[uri.split("#", 1)[1]]

    render_previews(out, str(tmp_path / "p"), 10, source_loader=loader)
    assert len(calls) == 4  # every ok row, once
    assert len(list((tmp_path / "p").glob("*.jpg"))) == 3
    page = (tmp_path / "p" / "index.html").read_text()
    assert "no overlay: FileNotFoundError: gone:" in page


def test_missing_tar_member_is_reported(outputs, tmp_path):
    root, rows, _, _ = outputs
    rows = copy.deepcopy(rows[:1])
    rows[0]["source_uri"] = rows[0]["source_uri"].split("#")[0] + "#absent.jpg"
    out = write_outputs(rows, root / "absent")
    render_previews(str(out), str(tmp_path / "q"), 1)
    assert "has no member" in (tmp_path / "q" / "index.html").read_text()
    with pytest.raises(ValueError, match="integer >= 1"):
        render_previews(str(out), str(tmp_path / "q"), 0)


def test_parquet_row_and_plain_object_sources(outputs, tmp_path):
    root, rows, members, _ = outputs
    names = [r["source_uri"].split("#", 1)[1] for r in rows[:3]]
    images = tmp_path / "images.parquet"
    column = pa.array([members[n] for n in names[:2]], pa.binary())
    pq.write_table(pa.table({"key": ["a", "b"], "image": column}), images, row_group_size=1)
    (tmp_path / "plain.jpg").write_bytes(members[names[2]])
    rows = copy.deepcopy(rows[:3])
    rows[0]["source_uri"] = f"{images}#row=0"
    rows[1]["source_uri"] = f"{images}#row=1"  # in the second row group
    rows[2]["source_uri"] = str(tmp_path / "plain.jpg")
    out = write_outputs(rows, tmp_path / "out")
    render_previews(str(out), str(tmp_path / "p"), 3)
    page = (tmp_path / "p" / "index.html").read_text()
    assert "no overlay" not in page
    assert len(list((tmp_path / "p").glob("*.jpg"))) == 3


def test_sources_outputs_and_previews_on_s3(outputs, s3_bucket):
    root, rows, _, _ = outputs
    base, options = s3_bucket
    fs = fsspec.filesystem("s3", **options)
    fs.pipe(f"{base}/data/{synth.shard_name(0)}", (root / "data" / synth.shard_name(0)).read_bytes())
    rows = copy.deepcopy(rows)
    for row in rows:
        row["source_uri"] = f"{base}/data/{row['source_uri'].rsplit('/', 1)[1]}"
    buf = io.BytesIO()
    pq.write_table(make_table(rows, {"run_id": "t"}), buf)
    fs.pipe(f"{base}/out/part-shard-00000.parquet", buf.getvalue())
    index = render_previews(f"{base}/out", f"{base}/out/_preview", 2, storage_options=options)
    assert index == f"{base}/out/_preview/index.html"
    page = fs.cat(index).decode()
    assert "no overlay" not in page
    assert len(fs.glob(f"{base}/out/_preview/*.jpg")) == 2


def test_hostile_image_ids_never_leave_the_preview_folder(outputs, tmp_path):
    """Overlay file names come from image ids (tar member keys): no separator or `..` path survives."""
    _, rows, members, _ = outputs
    hostile = ["../../escape/x", "/etc/passwd", "a\\..\\..\\b", "..", "<script>alert(1)</script>"]
    bad_rows = []
    for i, image_id in enumerate(hostile):
        row = copy.deepcopy(rows[i % 4])
        row.update(image_id=image_id, key=image_id)
        bad_rows.append(row)
    out = write_outputs(bad_rows, tmp_path / "out")
    dest = tmp_path / "site" / "p"
    render_previews(str(out), str(dest), 10, source_loader=lambda uri: members[uri.split("#", 1)[1]])
    written = [p for p in tmp_path.rglob("*") if p.is_file() and "out" not in p.parts]
    assert all(p.parent == dest for p in written), written
    names = sorted(p.name for p in dest.glob("*.jpg"))
    assert len(names) == len(hostile)
    assert all(re.fullmatch(r"\d{4}_[A-Za-z0-9._-]+\.jpg", n) and n.strip(".") for n in names), names
    page = (dest / "index.html").read_text()
    assert "<script>alert" not in page and "&lt;script&gt;" in page
