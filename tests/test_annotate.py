"""End-to-end tests of ``mnv3-pipeline annotate`` on a real local Ray cluster (real parts, tiny data).

Covered: S3 in and out (moto server) with no credential in logs, reports or Parquet, the
bad-input corpus in one shard plus a corrupt tar and a path-traversal tar, EXIF orientation
and draft decode (boxes in the displayed frame, in original pixels), all three tasks on synth
data then export-coco + evaluate through the annotate output, --max-images and --preview,
exactly-once after killing the driver (and the report naming what was redone), a second run
doing nothing, --retry-failed, nightly incremental runs (growing prefix and dated
``{date}`` outputs), 1-CPU and 2-node clusters, and reading the output without Ray.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import corpus
import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from outputs_from_gt import perfect_rows
from PIL import Image
from pycocotools import mask as mask_utils

from jobs import config as cfgmod
from jobs.annotate import task_specs
from jobs.cli import main
from pipeline.commit import MANIFEST_DIR, RUNS_DIR
from pipeline.schema import STATUS_OK, make_table, read_metadata
from pipeline.synth import write_dataset

# Small, fast settings: Small classifier at 64 px, the 320 detector at 96 px, LR-ASPP at 64 px.
FAST = {
    "tasks": {
        "classify": {"builder": "mobilenet_v3_small", "resize_size": 72, "crop_size": 64, "top_k": 3},
        "detect": {"min_size": 96, "max_size": 160, "threshold": 0.0, "top_k": 5},
        "segment": {"resize_size": 64},
    },
    "batch": {"max_images": 8},
    "run": {"progress_interval_s": 2.0, "no_progress_timeout_s": 120.0},
}


def write_config(path: Path, **sections) -> Path:
    data = json.loads(json.dumps(FAST))
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(data))
    return path


def latest_report(fs, root: str) -> dict:
    fs.invalidate_cache()
    names = sorted(fs.ls(f"{root}/{RUNS_DIR}", detail=False))
    return json.loads(fs.cat(names[-1]))


def read_parts(fs, root: str) -> list[dict]:
    fs.invalidate_cache()
    rows = []
    for path in sorted(fs.glob(f"{root}/part-*.parquet")):
        with fs.open(path, "rb") as f:
            rows += pq.read_table(f).to_pylist()
    return rows


# --------------------------------------------------------------------------- S3 in and out


def test_s3_in_and_out_then_second_run_does_nothing(ray_cluster, s3_bucket, tmp_path, monkeypatch, capfd):
    import pyarrow.fs as pafs
    import s3fs

    bucket, options = s3_bucket
    secret = "SECRET-must-not-leak-42"
    token = "ENV-TOKEN-must-not-leak-77"
    monkeypatch.setenv("MNV3_TEST_S3_SECRET", secret)
    monkeypatch.setenv("MNV3_TEST_SESSION_TOKEN", token)  # a credential-like variable of the environment
    opts = {**options, "key": "AKIDLEAKCHECK", "secret": secret}  # moto accepts any credentials
    write_dataset(f"{bucket}/in", images=12, shards=3, storage_options=opts, min_size=64, max_size=96)
    # The secret reaches the job through ${ENV} in the config; the input URL carries a password.
    cfg = write_config(tmp_path / "c.yaml", storage={"options": {**opts, "secret": "${MNV3_TEST_S3_SECRET}"}})
    args = ["annotate", "--input", f"{bucket}/in", "--output", f"{bucket}/out", "--config", str(cfg)]
    capfd.readouterr()
    assert main(args) == 0
    logs = capfd.readouterr()
    assert "[annotate]" in logs.err and "RANDOM weights" in logs.err  # the loud warning
    for leak in (secret, token, "AKIDLEAKCHECK"):
        assert leak not in logs.out + logs.err

    fs = s3fs.S3FileSystem(**opts)
    root = f"{bucket[5:]}/out"
    rows = read_parts(fs, root)
    assert len(rows) == 12 and len({r["image_id"] for r in rows}) == 12
    assert all(r["status"] == STATUS_OK and len(r["cls_labels"]) == 3 for r in rows)
    assert all(r["det_boxes"] is None for r in rows)  # detect not enabled
    part = sorted(fs.glob(f"{root}/part-*.parquet"))[0]
    with fs.open(part, "rb") as f:
        meta = read_metadata(pq.read_schema(f))
    model = meta["models"][0]
    assert model["builder"] == "mobilenet_v3_small" and model["random_weights"] is True
    assert meta["run_id"] and meta["code_version"] and meta["decode"]["max_pixels"] > 0
    report = latest_report(fs, root)
    assert report["shards"]["committed"] == 3 and report["images"]["total"] == 12
    stats = report["per_shard"][0]["stats"]
    assert {"decode_s", "model_s", "write_s", "images_per_s"} <= set(stats)
    # No credential anywhere in what the job wrote (raw bytes, Parquet values and metadata).
    for path in fs.find(root):
        data = fs.cat(path)
        if path.endswith(".parquet"):
            with fs.open(path, "rb") as f:
                table = pq.read_table(f)
            data += json.dumps(table.to_pylist()).encode() + str(table.schema.metadata).encode()
        for leak in (secret, token, "AKIDLEAKCHECK"):
            assert leak.encode() not in data, (path, leak)

    # pyarrow's own S3 client reads the output prefix as a dataset (ignores _manifest/, _runs/).
    host = options["endpoint_url"].split("://", 1)[1]
    s3 = pafs.S3FileSystem(endpoint_override=host, scheme="http", access_key="a", secret_key="b",
                           region="eu-west-1")
    assert pq.read_table(root, filesystem=s3).num_rows == 12

    records_before = {p: fs.cat(p) for p in fs.find(f"{root}/{MANIFEST_DIR}")}
    assert main(args) == 0
    report = latest_report(fs, root)
    assert report["shards"]["pending"] == 0 and report["shards"]["skipped_committed"] == 3
    fs.invalidate_cache()
    assert {p: fs.cat(p) for p in fs.find(f"{root}/{MANIFEST_DIR}")} == records_before


# --------------------------------------------------------------------------- bad input


def _exif_png(array: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[corpus.EXIF_ORIENTATION] = orientation
    return corpus.encode(Image.fromarray(array), "PNG", exif=exif.tobytes())


def test_bad_input_corpus_exif_and_retry(ray_cluster, tmp_path):
    src = tmp_path / "in"
    corpus.write_corpus_tar(src / "corpus.tar")
    corpus.write_corrupt_tar(src / "corrupt.tar")
    corpus.write_traversal_tar(src / "traversal.tar")
    # The same picture twice: stored sideways with EXIF orientation 6, and already upright.
    stored = corpus.gradient_rgb(96, 64)
    stored[10:30, 20:50] = (250, 20, 20)
    upright = np.ascontiguousarray(np.rot90(stored, k=-1))  # orientation 6 = rotate 90 deg clockwise
    corpus.write_tar(src / "exif.tar", {
        "rotated.png": _exif_png(stored, 6), "upright.png": corpus.encode(Image.fromarray(upright), "PNG"),
        "large_rot6.jpg": corpus.large_jpeg(1600, 1200, orientation=6)})
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.yaml")
    args = ["annotate", "--input", str(src), "--output", str(out), "--config", str(cfg),
            "--tasks", "classify,detect,segment"]
    assert main(args) == 1  # some images / one shard failed

    frame = _read_without_ray(out)
    rows = {r["image_id"]: r for r in frame}
    assert len(frame) == len(rows)
    by_member = {r["source_uri"].rsplit("#", 1)[-1]: r for r in frame if r["shard"] == "corpus"}
    assert len(by_member) == len(corpus.CASES)
    for case in corpus.CASES:
        row = by_member[case.name]
        if case.ok:
            assert row["status"] == STATUS_OK, (case.name, row["error"])
            assert (row["width"], row["height"]) == case.size, case.name
            assert len(row["cls_labels"]) == 3
            assert row["det_boxes"] is not None and row["seg_masks"] is not None
        else:
            assert row["status"] == "decode_error", case.name
            assert case.error in row["error"], (case.name, row["error"])
            assert row["cls_labels"] is None
    manifest = {p.stem: json.loads(p.read_text()) for p in (out / MANIFEST_DIR).glob("*.json")}
    by_input = {Path(m["inputs"][0]).name: m for m in manifest.values()}
    traversal = [r for r in frame if r["shard"] == by_input["traversal.tar"]["shard_id"]]
    assert len(traversal) == 1 + len(corpus.TRAVERSAL_NAMES)
    assert [r["status"] for r in traversal].count(STATUS_OK) == 1
    assert all(r["error"] for r in traversal if r["status"] != STATUS_OK)

    # EXIF: the rotated file is annotated exactly like the upright one, in the displayed frame.
    rot, up = rows["exif/rotated"], rows["exif/upright"]
    assert (rot["width"], rot["height"]) == (64, 96) == (up["width"], up["height"])
    assert rot["det_boxes"] == up["det_boxes"] and rot["cls_labels"] == up["cls_labels"]
    assert rot["seg_masks"] == up["seg_masks"]
    # Draft decode: boxes of the 1600x1200 (displayed 1200x1600) JPEG are in original pixels.
    big = rows["exif/large_rot6"]
    assert (big["width"], big["height"]) == (1200, 1600)
    boxes = np.array(big["det_boxes"])
    assert len(boxes) and boxes[:, 2].max() <= 1200 and boxes[:, 3].max() <= 1600
    assert boxes[:, 3].max() > 400  # beyond the ~200x150 draft array: scaled back up
    for mask in big["seg_masks"]:
        assert mask["size"] == [1600, 1200]

    failed = [m for m in manifest.values() if m["status"] == "failed"]
    assert len(failed) == 1 and "corrupt.tar" in " ".join(failed[0]["inputs"])
    assert failed[0]["error"] and not (out / f"part-{failed[0]['shard_id']}.parquet").exists()
    assert len(list(out.glob("part-*.parquet"))) == 3

    # A plain re-run has nothing to do but still exits 1: the failed shard is missing from the output.
    seen = set((out / RUNS_DIR).glob("*.json"))
    assert main(args) == 1
    (new_report,) = set((out / RUNS_DIR).glob("*.json")) - seen  # run ids sort by second only
    report = json.loads(new_report.read_text())
    assert report["shards"]["pending"] == 0 and report["status"] == "ok"
    assert report["shards"]["earlier_failed_ids"] == [failed[0]["shard_id"]]
    assert report["shards"]["earlier_failed_images"] == sum(
        m["failed_rows"] for m in manifest.values() if m["status"] != "failed") > 0

    # --retry-failed redoes the corrupt shard and the shards with failed rows only.
    needs = {sid for sid, m in manifest.items() if m["status"] == "failed" or m["failed_rows"]}
    seen = set((out / RUNS_DIR).glob("*.json"))
    assert main(args + ["--retry-failed"]) == 1
    (new_report,) = set((out / RUNS_DIR).glob("*.json")) - seen
    report = json.loads(new_report.read_text())
    assert report["shards"]["pending"] == len(needs) == report["shards"]["retried"]
    assert report["shards"]["skipped_committed"] == len(manifest) - len(needs)
    again = _read_without_ray(out)
    assert sorted(r["image_id"] for r in again) == sorted(r["image_id"] for r in frame)


def _read_without_ray(out: Path) -> list[dict]:
    """Open the output directory in a fresh interpreter that never imports Ray: pyarrow.dataset
    always, pandas and DuckDB when installed (each must see the same rows)."""
    code = (
        "import json, sys, pyarrow.dataset as ds\n"
        f"t = ds.dataset({str(out)!r}, format='parquet').to_table()\n"
    )
    if importlib.util.find_spec("pandas"):
        code += f"import pandas as pd\nassert len(pd.read_parquet({str(out)!r})) == t.num_rows\n"
    if importlib.util.find_spec("duckdb"):
        query = f"select count(*) from read_parquet('{out}/part-*.parquet')"
        code += f"import duckdb\nassert duckdb.sql({query!r}).fetchone()[0] == t.num_rows\n"
    code += "assert 'ray' not in sys.modules\nprint(json.dumps(t.to_pylist()))\n"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


# --------------------------------------------------------------------------- the bundle alone (no Ray)


def test_bundle_int8_tasks_threads_and_byte_bounded_batches():
    """int8 for classify and segment (PTQ calibrated on the first batch), torch threads set to
    the actor's CPUs, model calls bounded by decoded bytes, and one bad model call per group."""
    import pyarrow as pa
    import torch

    from mnv3.categories import get_categories
    from pipeline.bundle import InferenceBundle, TaskSpec

    rng = np.random.default_rng(0)
    sizes = [(40, 50), (64, 48), (30, 30), (50, 40)]
    rows = []
    for i, (h, w) in enumerate(sizes):
        pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        rows.append({"image_id": f"s/{i}", "key": str(i), "source_uri": "x", "shard": "s", "width": w * 2,
                     "height": h * 2, "status": STATUS_OK, "error": None, "_pixels": pixels.tobytes(),
                     "_pix_h": h, "_pix_w": w})  # a 2x draft decode: outputs in original pixels
    specs = [TaskSpec(task="classify", builder="mobilenet_v3_small", precision="int8",
                      labels=tuple(get_categories("imagenet1k")),
                      params={"resize_size": 40, "crop_size": 32, "top_k": 2}),
             TaskSpec(task="segment", builder="lraspp_mobilenet_v3_large", precision="int8",
                      labels=tuple(get_categories("voc21")), params={"resize_size": 32})]
    before = torch.get_num_threads()
    try:
        bundle = InferenceBundle(specs, num_threads=2, max_images=8, max_decoded_bytes=16_000)
        assert torch.get_num_threads() == 2
        out = bundle(pa.Table.from_pylist(rows)).to_pylist()
    finally:
        torch.set_num_threads(before)
    assert bundle.groups([0, 1, 2, 3], [len(r["_pixels"]) for r in rows]) == [[0, 1], [2, 3]]
    for runner in bundle.runners:  # converted after calibration: int8 kernels inside
        assert any(".quantized" in type(m).__module__ for m in runner.model.modules()), runner.spec.task
    for row, (h, w) in zip(out, sizes):
        assert row["status"] == STATUS_OK and len(row["cls_labels"]) == 2 and row["_threads"] == 2
        for m in row["seg_masks"]:
            assert m["size"] == [h * 2, w * 2]
            decoded = mask_utils.decode({"size": m["size"], "counts": m["counts"].encode()})
            assert decoded.shape == (h * 2, w * 2) and int(decoded.sum()) == m["area"]


def test_quant_engine_key_reaches_the_actor_and_the_lineage(monkeypatch):
    import torch

    from mnv3.quantization.engine import ENGINE_ENV, supported_engines
    from pipeline.bundle import InferenceBundle, TaskSpec

    if "qnnpack" not in supported_engines():
        pytest.skip("this torch build has no qnnpack engine")
    monkeypatch.delenv(ENGINE_ENV, raising=False)
    cfg = cfgmod.load(None, {"tasks.classify.precision": "int8", "actors.quant_engine": "qnnpack"})
    (spec,) = [s for s in task_specs(cfg) if s.task == "classify"]
    assert spec.quant_engine == "qnnpack" and "qnnpack engine" in spec.lineage()["quantization"]
    with pytest.raises(cfgmod.ConfigError, match="actors.quant_engine"):
        cfgmod.load(None, {"actors.quant_engine": "arm64"})
    before = torch.backends.quantized.engine
    try:
        InferenceBundle([TaskSpec(task="classify", builder="mobilenet_v3_small", precision="int8",
                                  num_classes=3, quant_engine="qnnpack")])
        assert torch.backends.quantized.engine == "qnnpack" and os.environ[ENGINE_ENV] == "qnnpack"
        # a node whose torch lacks the engine: the actor fails naming the key, before any model is built
        monkeypatch.setattr("mnv3.quantization.engine.supported_engines", lambda: ["x86"])
        with pytest.raises(ValueError, match="actors.quant_engine 'qnnpack' cannot be used on this node"):
            InferenceBundle([TaskSpec(task="classify", builder="mobilenet_v3_small", precision="int8",
                                      num_classes=3, quant_engine="qnnpack")])
    finally:
        torch.backends.quantized.engine = before
        os.environ.pop(ENGINE_ENV, None)


# --------------------------------------------------------------------------- three tasks, COCO round trip


def test_three_tasks_max_images_preview_then_coco_round_trip(ray_cluster, tmp_path, capsys):
    from pycocotools.coco import COCO

    src, out = tmp_path / "in", tmp_path / "out"
    write_dataset(str(src), images=6, shards=3, min_size=64, max_size=112)
    cfg = write_config(tmp_path / "c.yaml")
    args = ["annotate", "--input", str(src), "--output", str(out), "--config", str(cfg),
            "--tasks", "classify,detect,segment"]
    assert main(args + ["--max-images", "3"]) == 0  # whole shards: 2 of 3 shards (4 images)
    first = json.loads(sorted((out / RUNS_DIR).glob("*.json"))[-1].read_text())
    assert first["images"]["total"] == 4 and first["shards"]["committed"] == 2
    assert main(args + ["--preview", "2"]) == 0
    report = json.loads(sorted((out / RUNS_DIR).glob("*.json"))[-1].read_text())
    assert report["shards"]["committed"] == 1 and report["shards"]["skipped_committed"] == 2
    assert report["pool"]["actor_torch_threads"] == [report["pool"]["threads"]]
    assert {m["task"] for m in report["lineage"]["models"]} == {"classify", "detect", "segment"}

    rows = _read_without_ray(out)
    assert len(rows) == 6 and all(r["status"] == STATUS_OK for r in rows)
    for r in rows:
        w, h = r["width"], r["height"]
        assert len(r["cls_labels"]) == 3 and r["det_boxes"] and r["seg_masks"] is not None
        boxes = np.array(r["det_boxes"])  # xyxy in original pixels
        assert (boxes[:, 0] <= boxes[:, 2]).all() and (boxes[:, 1] <= boxes[:, 3]).all()
        assert boxes.min() >= 0 and boxes[:, 2].max() <= w and boxes[:, 3].max() <= h
        for m in r["seg_masks"]:
            decoded = mask_utils.decode({"size": m["size"], "counts": m["counts"].encode()})
            assert decoded.shape == (h, w) and int(decoded.sum()) == m["area"] > 0
    index = (out / "_preview" / "index.html").read_text()
    assert index.count("<img ") == 2 and len(list((out / "_preview").glob("*.jpg"))) == 2

    # Ground truth as predictions, written into the annotate job's own files (same ids, keys,
    # sizes, metadata): export-coco + evaluate must give a perfect score.
    gt_path = src / "annotations.json"
    perfect = {r["key"]: r for r in perfect_rows(json.loads(gt_path.read_text()), str(src))}
    for part in out.glob("part-*.parquet"):
        table = pq.read_table(part)
        fixed = []
        for r in table.to_pylist():
            gt = perfect[r["key"]]
            assert (r["width"], r["height"]) == (gt["width"], gt["height"])
            fixed.append({**r, **{k: gt[k] for k in ("det_boxes", "det_label_ids", "det_labels",
                                                     "det_scores", "seg_masks")}})
        pq.write_table(make_table(fixed, read_metadata(table.schema)), part)
    results = tmp_path / "results.json"
    assert main(["export-coco", "--input", str(out), "--output", str(results), "--gt", str(gt_path)]) == 0
    assert COCO(str(gt_path)).loadRes(str(results))
    metrics_path = tmp_path / "metrics.json"
    assert main(["evaluate", "--input", str(out), "--gt", str(gt_path), "--output", str(metrics_path)]) == 0
    metrics = json.loads(metrics_path.read_text())
    assert metrics["bbox"]["AP"] == pytest.approx(1.0) and metrics["segm"]["AP"] == pytest.approx(1.0)
    assert metrics["semantic"]["mIoU"] == pytest.approx(1.0)
    # Outputs without detections: export-coco says so clearly instead of writing an empty list.
    capsys.readouterr()
    for part in out.glob("part-*.parquet"):
        table = pq.read_table(part)
        pq.write_table(make_table([{**r, "det_boxes": None, "det_label_ids": None, "det_labels": None,
                                    "det_scores": None} for r in table.to_pylist()],
                                  read_metadata(table.schema)), part)
    assert main(["export-coco", "--input", str(out), "--output", str(tmp_path / "none.json")]) == 2
    assert "no detect results" in capsys.readouterr().err and not (tmp_path / "none.json").exists()


# --------------------------------------------------------------------------- exactly once


def test_killed_driver_then_rerun_gives_every_image_exactly_once(ray_cluster, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    write_dataset(str(src), images=64, shards=16, min_size=64, max_size=96)
    # Large at 224 with one image per model call: slow enough to kill between commits.
    cfg = write_config(tmp_path / "c.yaml", batch={"max_images": 1}, actors={"max_actors": 1})
    data = yaml.safe_load(cfg.read_text())
    data["tasks"]["classify"].update(builder="mobilenet_v3_large", resize_size=256, crop_size=224)
    cfg.write_text(yaml.safe_dump(data))
    args = ["annotate", "--input", str(src), "--output", str(out), "--config", str(cfg)]
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", *args, "--ray-address", ray_cluster],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    manifest = out / MANIFEST_DIR
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if manifest.exists() and any(manifest.glob("*.json")):
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"the driver ended before the kill: {proc.stderr.read().decode()[-2000:]}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    committed = len(list(manifest.glob("*.json")))
    assert 1 <= committed < 16

    assert main(args) == 0
    report = json.loads(sorted((out / RUNS_DIR).glob("*.json"))[-1].read_text())
    assert report["shards"]["skipped_committed"] == committed
    assert report["shards"]["committed"] == 16 - committed
    # The report names the killed run and the shards it left unfinished (re-done here).
    retries = report["retries"]
    assert len(retries["interrupted_runs"]) == 1 and retries["interrupted_runs"][0] != report["run_id"]
    assert sorted(retries["shards_redone_after_interrupt"]) == sorted(report["shards"]["pending_ids"])
    assert len(retries["shards_redone_after_interrupt"]) == 16 - committed
    im = report["images"]  # steady end to end (after warm-up -> last commit) vs the same window's model time
    assert 0 < im["steady_per_s"] <= im["model_only_per_s"] and im["overhead_pct"] >= 0
    ids = []
    for part in out.glob("part-*.parquet"):
        ids += pq.read_table(part, columns=["image_id"]).column("image_id").to_pylist()
    assert len(ids) == 64 and len(set(ids)) == 64
    assert len(list(manifest.glob("*.json"))) == 16

    assert main(args) == 0  # a second complete run does nothing
    report = json.loads(sorted((out / RUNS_DIR).glob("*.json"))[-1].read_text())
    assert report["shards"]["pending"] == 0 and report["images"]["total"] == 0
    assert report["retries"]["interrupted_runs"] == []  # the finished re-run closed the story


def test_nightly_growing_prefix_processes_only_new_shards(ray_cluster, tmp_path):
    import pyarrow.dataset as pads

    src, out, dated = tmp_path / "in", tmp_path / "out", tmp_path / "dated"
    write_dataset(str(src / "day1"), images=4, shards=2, min_size=64, max_size=96)
    cfg = write_config(tmp_path / "c.yaml")
    args = ["annotate", "--input", str(src), "--output", str(out), "--config", str(cfg)]
    nightly = ["annotate", "--input", str(src), "--output", str(dated / "dt={date}"), "--config", str(cfg)]
    assert main(args) == 0
    assert main(nightly + ["--date", "2026-01-01"]) == 0
    write_dataset(str(src / "day2"), images=4, shards=2, seed=1, min_size=64, max_size=96)
    assert main(args) == 0
    report = json.loads(sorted((out / RUNS_DIR).glob("*.json"))[-1].read_text())
    assert report["shards"]["skipped_committed"] == 2 and report["shards"]["committed"] == 2
    assert pq.read_table(out).num_rows == 8

    # Dated outputs: the second night writes only the new shards, under its own date.
    assert main(nightly + ["--date", "2026-01-02"]) == 0
    day2 = dated / "dt=2026-01-02"
    report = json.loads(next((day2 / RUNS_DIR).glob("*.json")).read_text())
    assert report["shards"]["skipped_earlier_dates"] == 2 and report["shards"]["committed"] == 2
    assert report["output_template"].endswith("dt={date}") and report["date"] == "2026-01-02"
    table = pads.dataset(str(dated), format="parquet", partitioning="hive").to_table()
    ids = table.column("image_id").to_pylist()
    assert len(ids) == 8 == len(set(ids))
    assert sorted(set(table.column("dt").to_pylist())) == ["2026-01-01", "2026-01-02"]
    assert main(nightly + ["--date", "2026-01-03", "--tasks", "bogus"]) == 2
    assert not (dated / "dt=2026-01-03").exists()


# --------------------------------------------------------------------------- pool sizing, 1 CPU and 2 nodes


def test_pool_plan_never_takes_the_read_cpu():
    from pipeline.run import plan_pool

    one = plan_pool(1.0)
    assert one.max_actors == 1 and one.actor_cpus == 0.75 and one.threads == 1
    two = plan_pool(2.0)
    assert two.max_actors * two.actor_cpus + two.read_cpus <= 2.0
    big = plan_pool(16.0, actor_cpus=2.0)
    assert big.max_actors == 7 and big.threads == 2
    capped = plan_pool(2.0, actor_cpus=4.0, max_actors=5)
    assert capped.actor_cpus == 1.75 and capped.max_actors == 1 and capped.notes
    # The same config on 200 CPUs (12 nodes of 16 + a head with 8): the pool grows, reads still fit.
    wide = plan_pool(200.0, largest_node_cpus=16.0)
    assert wide.max_actors == 199 and wide.actor_cpus == 1.0 and wide.max_read_tasks == 200
    fat = plan_pool(200.0, actor_cpus=4.0, largest_node_cpus=16.0)
    assert fat.max_actors == 49 and fat.threads == 4 and not fat.notes
    too_big = plan_pool(200.0, actor_cpus=32.0, largest_node_cpus=16.0)
    assert too_big.actor_cpus == 16.0 and too_big.notes  # an actor must fit on one node


_CLUSTER_SCRIPT = """
import json, sys
import ray
from ray.cluster_utils import Cluster
from jobs.cli import main
from pipeline.synth import write_dataset

src, cfg, out1, out2 = sys.argv[1:5]
write_dataset(src, images=8, shards=4, min_size=64, max_size=96)
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
ray.init(address=cluster.address, log_to_driver=False)
codes = [main(["annotate", "--input", src, "--output", out1, "--config", cfg])]   # one CPU in all
cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
nodes = len([n for n in ray.nodes() if n["Alive"]])
codes.append(main(["annotate", "--input", src, "--output", out2, "--config", cfg]))  # two nodes
ray.shutdown()
cluster.shutdown()
print("RESULT " + json.dumps({"codes": codes, "nodes": nodes}))
"""


def test_one_cpu_cluster_then_two_node_cluster(tmp_path):
    """Separate Ray clusters in a subprocess (the session cluster stays untouched)."""
    cfg = write_config(tmp_path / "c.yaml", run={"no_progress_timeout_s": 90.0})
    out1, out2 = tmp_path / "out1", tmp_path / "out2"
    res = subprocess.run([sys.executable, "-c", _CLUSTER_SCRIPT, str(tmp_path / "in"), str(cfg), str(out1),
                          str(out2)], capture_output=True, text=True, timeout=400)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    assert res.returncode == 0 and lines, res.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result == {"codes": [0, 0], "nodes": 2}
    for out in (out1, out2):
        table = pq.read_table(out)
        assert table.num_rows == 8 and set(table.column("status").to_pylist()) == {STATUS_OK}
    report = json.loads(next((out2 / RUNS_DIR).glob("*.json")).read_text())
    assert report["pool"]["cluster_cpus"] == 2.0



def test_measure_end_to_end_rows(ray_cluster, tmp_path):
    """The function the benchmark command calls: one row per (bundle, storage), in-run ratio."""
    from mnv3.categories import get_categories
    from pipeline.bundle import TaskSpec
    from pipeline.overhead import format_rows, measure_end_to_end

    labels = tuple(get_categories("imagenet1k"))
    tiny = [TaskSpec(task="classify", builder="mobilenet_v3_small", labels=labels,
                     params={"resize_size": 72, "crop_size": 64, "top_k": 1})]
    rows = measure_end_to_end({"tiny": tiny}, storages=("local",), images=12, shards=3, image_size=(64, 96),
                              model_only_images=8, workdir=str(tmp_path))
    (row,) = rows
    assert row["bundle"] == "tiny" and row["storage"] == "local" and row["images"] == 12
    assert row["actors"] == 1 and row["threads_per_actor"] == 1 and row["model_only_separate_img_s"] > 0
    assert row["e2e_whole_run_img_s"] > 0 and "tiny" in format_rows(rows)
