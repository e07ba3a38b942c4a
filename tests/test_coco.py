"""export-coco and evaluate on synthetic data: ground truth fed back as predictions scores perfectly,
and each kind of damage lowers exactly the numbers it should."""

from __future__ import annotations

import copy
import io
import json
import math

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from outputs_from_gt import perfect_rows, write_outputs
from pycocotools.coco import COCO

from jobs import cli
from pipeline import coco, synth
from pipeline.commit import OutputStore
from pipeline.schema import STATUS_DECODE_ERROR, make_table


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    data = root / "data"
    synth.write_dataset(str(data), images=8, shards=2, seed=3, min_size=64, max_size=128)
    gt_path = data / synth.ANNOTATIONS_FILE
    gt = json.loads(gt_path.read_text())
    return root, gt_path, gt, perfect_rows(gt, str(data))


def outputs(dataset, rows, name):
    root = dataset[0]
    return str(write_outputs(rows, root / name))


def image_with_most_instances(rows):
    return max(range(len(rows)), key=lambda i: len(rows[i]["det_boxes"]))


def test_perfect_predictions_score_one(dataset):
    _, gt_path, gt, rows = dataset
    m = coco.evaluate(outputs(dataset, rows, "perfect"), str(gt_path))
    assert m["images"]["evaluated"] == len(gt["images"]) == 8
    assert m["images"]["status"] == {"ok": 8}
    assert m["bbox"]["AP"] == pytest.approx(1.0) and m["bbox"]["AP75"] == pytest.approx(1.0)
    assert m["segm"]["AP"] == pytest.approx(1.0)
    assert m["semantic"]["mIoU"] == pytest.approx(1.0)
    assert m["semantic"]["pixel_accuracy"] == pytest.approx(1.0)
    assert set(m["semantic"]["per_class_iou"]) <= {"background"} | {c["name"] for c in synth.CATEGORIES}
    assert m["warnings"] == [] and m["unmatched_labels"] == {}


def test_categories_matched_by_name_when_ids_differ(dataset):
    _, gt_path, _, rows = dataset
    rows = copy.deepcopy(rows)
    for row in rows:
        row["det_label_ids"] = [i + 100 for i in row["det_label_ids"]]
        for mask in row["seg_masks"]:
            mask["label_id"] += 100
        # a background entry, as a semantic model may emit, must not count as a class
        h, w = row["height"], row["width"]
        counts = row["seg_masks"][0]["counts"] if row["seg_masks"] else "0"
        row["seg_masks"].append({"label_id": 0, "label": "__background__", "size": [h, w], "counts": counts,
                                 "area": 0})
    row = dict(rows[0], image_id="elsewhere/zzz", key="zzz", source_uri="mem://x/zzz.jpg")
    m = coco.evaluate(outputs(dataset, rows + [row], "renumbered"), str(gt_path))
    assert m["bbox"]["AP"] == pytest.approx(1.0)
    assert m["segm"]["AP"] == pytest.approx(1.0)
    assert m["semantic"]["mIoU"] == pytest.approx(1.0)
    assert m["images"]["not_in_gt"] == 1
    assert any("no image in the ground truth" in w for w in m["warnings"])


def test_partial_output_scores_its_images_and_says_so(dataset):
    _, gt_path, _, rows = dataset
    first = [r for r in rows if r["shard"] == rows[0]["shard"]]
    m = coco.evaluate(outputs(dataset, first, "partial"), str(gt_path))
    assert m["images"]["evaluated"] == len(first) == 4
    assert m["images"]["gt_images_not_in_output"] == 4
    assert m["bbox"]["AP"] == pytest.approx(1.0)
    assert any("cover the 4 evaluated images only" in w for w in m["warnings"])


def shifted(rows, fraction):
    rows = copy.deepcopy(rows)
    for row in rows:
        row["det_boxes"] = [[x0 + fraction * (x1 - x0), y0, x1 + fraction * (x1 - x0), y1]
                            for x0, y0, x1, y1 in row["det_boxes"]]
    return rows


def test_shifted_boxes_lower_strict_thresholds_only(dataset):
    _, gt_path, _, rows = dataset
    # IoU of a box with itself shifted by f of its width is (1 - f) / (1 + f)
    small = coco.evaluate(outputs(dataset, shifted(rows, 0.05), "shift5"), str(gt_path))["bbox"]
    assert small["AP50"] == pytest.approx(1.0) and small["AP75"] == pytest.approx(1.0)
    assert small["AP"] == pytest.approx(0.9)  # IoU 0.905 passes thresholds 0.50..0.90
    large = coco.evaluate(outputs(dataset, shifted(rows, 0.2), "shift20"), str(gt_path))["bbox"]
    assert large["AP50"] == pytest.approx(1.0) and large["AP75"] == 0.0
    assert large["AP"] == pytest.approx(0.4)  # IoU 0.667 passes 0.50, 0.55, 0.60, 0.65


def test_dropped_and_relabelled_detections_lower_ap(dataset):
    _, gt_path, gt, rows = dataset
    i = image_with_most_instances(rows)
    dropped = copy.deepcopy(rows)
    for column in ("det_boxes", "det_label_ids", "det_labels", "det_scores"):
        dropped[i][column] = dropped[i][column][1:]
    m = coco.evaluate(outputs(dataset, dropped, "dropped"), str(gt_path))["bbox"]
    assert 0.5 < m["AP"] < 1.0 and m["AR100"] < 1.0

    wrong = copy.deepcopy(rows)
    old = wrong[i]["det_label_ids"][0]
    new = next(c for c in synth.CATEGORIES if c["id"] != old)
    wrong[i]["det_label_ids"][0], wrong[i]["det_labels"][0] = new["id"], new["name"]
    m = coco.evaluate(outputs(dataset, wrong, "relabelled"), str(gt_path))["bbox"]
    assert m["AP50"] < 1.0 and m["AR100"] < 1.0

    unknown = copy.deepcopy(rows)
    unknown[i]["det_labels"][0] = "unicorn"
    m = coco.evaluate(outputs(dataset, unknown, "unknown"), str(gt_path))
    assert m["unmatched_labels"] == {"unicorn": 1}
    assert m["bbox"]["AR100"] < 1.0


def test_failed_rows_are_reported_and_count_as_misses(dataset):
    _, gt_path, _, rows = dataset
    rows = copy.deepcopy(rows)
    i = image_with_most_instances(rows)
    keep = {k: rows[i][k] for k in ("image_id", "key", "source_uri", "shard")}
    rows[i] = {**keep, "status": STATUS_DECODE_ERROR, "error": "truncated JPEG"}
    out = outputs(dataset, rows, "failed")
    OutputStore(out).record_failed("shard-00009", "corrupt tar: unexpected end", {}, run_id="t")
    # Parquet under folders starting with "_" or "." is not output (pyarrow/DuckDB convention)
    pq.write_table(pa.table({"x": [1]}), dataset[0] / "failed" / "_manifest" / "stray.parquet")
    m = coco.evaluate(out, str(gt_path))
    assert m["images"]["failed_shards"] == 1
    assert any("shard-00009: corrupt tar" in w for w in m["warnings"])
    assert m["images"]["status"] == {"decode_error": 1, "ok": 7}
    assert m["images"]["evaluated"] == 8
    assert m["bbox"]["AR100"] < 1.0 and m["segm"]["AR100"] < 1.0
    assert m["semantic"]["mIoU"] < 1.0
    assert any("did not succeed" in w for w in m["warnings"])


def test_missing_mask_lowers_its_class_iou(dataset):
    _, gt_path, _, rows = dataset
    rows = copy.deepcopy(rows)
    i = image_with_most_instances(rows)
    lost = rows[i]["seg_masks"].pop(0)
    sem = coco.evaluate(outputs(dataset, rows, "lostmask"), str(gt_path))["semantic"]
    assert sem["per_class_iou"][lost["label"]] < 1.0
    assert sem["per_class_iou"]["background"] < 1.0  # the lost pixels were predicted as background
    assert sem["mIoU"] < 1.0 and sem["pixel_accuracy"] < 1.0
    others = [v for k, v in sem["per_class_iou"].items() if k not in (lost["label"], "background")]
    assert all(v == pytest.approx(1.0) for v in others)


def test_export_loads_in_pycocotools(dataset, tmp_path):
    _, gt_path, gt, rows = dataset
    out = outputs(dataset, rows, "perfect")
    ref = COCO(str(gt_path))

    det = coco.export_coco(out, str(tmp_path / "det.json"), gt_url=str(gt_path))
    results = json.loads((tmp_path / "det.json").read_text())
    assert det["results"] == len(results) == len(gt["annotations"])
    loaded = ref.loadRes(str(tmp_path / "det.json"))
    assert set(loaded.getImgIds()) <= set(ref.getImgIds())
    by_box = {(a["image_id"], a["category_id"], tuple(a["bbox"])) for a in gt["annotations"]}
    for r in results:
        assert r["score"] == 1.0
        assert any(k[:2] == (r["image_id"], r["category_id"])
                   and all(math.isclose(a, b, abs_tol=1e-3) for a, b in zip(k[2], r["bbox"])) for k in by_box)

    seg = coco.export_coco(out, str(tmp_path / "seg.json"), gt_url=str(gt_path), task="segment")
    pairs = {(a["image_id"], a["category_id"]) for a in gt["annotations"]}
    assert seg["results"] == len(pairs)
    loaded = ref.loadRes(str(tmp_path / "seg.json"))
    assert {(a["image_id"], a["category_id"]) for a in loaded.dataset["annotations"]} == pairs

    # without a ground truth: stable integer ids that name the output row
    coco.export_coco(out, str(tmp_path / "free.json"))
    free = json.loads((tmp_path / "free.json").read_text())
    assert len(free) == len(gt["annotations"])
    assert all(r["image_id"] == coco.stable_image_id(r["mnv3_image_id"]) for r in free)


def test_export_classification(dataset, tmp_path):
    _, gt_path, _, rows = dataset
    rows = copy.deepcopy(rows)
    for row in rows:
        row.update(cls_label_ids=[2, 7], cls_labels=["rectangle", "kite"], cls_scores=[0.75, 0.25])
    summary = coco.export_coco(outputs(dataset, rows, "cls"), str(tmp_path / "cls.json"),
                               gt_url=str(gt_path), task="classify")
    results = json.loads((tmp_path / "cls.json").read_text())
    assert summary["results"] == len(results) == 2 * len(rows)
    first = [r for r in results if r["rank"] == 0]
    assert {r["label"] for r in first} == {"rectangle"} and {r["score"] for r in first} == {0.75}


def test_bad_inputs_give_clear_errors(dataset, tmp_path):
    _, gt_path, _, rows = dataset
    out = outputs(dataset, rows, "perfect")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        coco.evaluate(out, str(tmp_path / "nope.json"))
    (tmp_path / "notjson.json").write_text("{")
    with pytest.raises(ValueError, match="not JSON"):
        coco.evaluate(out, str(tmp_path / "notjson.json"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no Parquet files"):
        coco.evaluate(str(tmp_path / "empty"), str(gt_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        coco.export_coco(str(tmp_path / "missing"), str(tmp_path / "x.json"))
    (tmp_path / "foreign").mkdir()
    pq.write_table(pa.table({"image_id": ["a"]}), tmp_path / "foreign" / "part-0.parquet")
    with pytest.raises(ValueError, match=r"part-0\.parquet.*schema v1"):
        coco.evaluate(str(tmp_path / "foreign"), str(gt_path))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "part-x.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match=r"part-x\.parquet is not a readable Parquet file"):
        coco.export_coco(str(tmp_path / "broken"), str(tmp_path / "x.json"))
    other = dict(json.loads(gt_path.read_text()))
    other["images"] = [{"id": 1, "file_name": "unrelated.jpg", "width": 10, "height": 10}]
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="no output row"):
        coco.evaluate(out, str(tmp_path / "other.json"))
    with pytest.raises(ValueError, match="task must be one of"):
        coco.export_coco(out, str(tmp_path / "x.json"), task="pose")


def test_cli_export_and_evaluate(dataset, tmp_path, capsys):
    _, gt_path, _, rows = dataset
    out = outputs(dataset, rows, "perfect")
    assert cli.main(["export-coco", "--input", out, "--output", str(tmp_path / "r.json"),
                     "--gt", str(gt_path)]) == 0
    assert COCO(str(gt_path)).loadRes(str(tmp_path / "r.json"))
    assert cli.main(["evaluate", "--input", out, "--gt", str(gt_path),
                     "--output", str(tmp_path / "metrics.json")]) == 0
    printed = capsys.readouterr().out
    assert "bbox" in printed and "segm" in printed and "mIoU 1.0000" in printed
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["bbox"]["AP"] == pytest.approx(1.0)
    assert cli.main(["evaluate", "--input", out, "--gt", str(tmp_path / "absent.json")]) == 2
    assert "absent.json" in capsys.readouterr().err
    # storage options come from the annotate config's storage section; a bad key is named
    (tmp_path / "good.yaml").write_text("storage:\n  options: {auto_mkdir: true}\n")
    assert cli.main(["export-coco", "--input", out, "--output", str(tmp_path / "new" / "r.json"),
                     "--config", str(tmp_path / "good.yaml"), "--task", "segment"]) == 0
    assert (tmp_path / "new" / "r.json").exists()
    (tmp_path / "bad.yaml").write_text("storage:\n  optons: {}\n")
    bad = ["evaluate", "--input", out, "--gt", str(gt_path), "--config", str(tmp_path / "bad.yaml")]
    assert cli.main(bad) == 2
    assert "storage.optons" in capsys.readouterr().err


def test_outputs_and_ground_truth_on_s3(dataset, s3_bucket):
    _, gt_path, _, rows = dataset
    base, options = s3_bucket
    fs = fsspec.filesystem("s3", **options)
    for shard in sorted({r["shard"] for r in rows}):
        buf = io.BytesIO()
        pq.write_table(make_table([r for r in rows if r["shard"] == shard], {"run_id": "t"}), buf)
        fs.pipe(f"{base}/out/part-{shard}.parquet", buf.getvalue())
    fs.pipe(f"{base}/annotations.json", gt_path.read_bytes())
    m = coco.evaluate(f"{base}/out", f"{base}/annotations.json", storage_options=options)
    assert m["bbox"]["AP"] == pytest.approx(1.0) and m["semantic"]["mIoU"] == pytest.approx(1.0)
    coco.export_coco(f"{base}/out", f"{base}/results.json", gt_url=f"{base}/annotations.json",
                     storage_options=options)
    expected = len(json.loads(gt_path.read_text())["annotations"])
    assert len(json.loads(fs.cat(f"{base}/results.json"))) == expected
