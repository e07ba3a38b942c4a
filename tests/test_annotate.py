"""End-to-end tests of ``mnv3-pipeline annotate`` on a real local Ray cluster (real parts, tiny data).

Covered: S3 in and out (moto server), the bad-input corpus in one shard plus a corrupt tar
and a path-traversal tar, EXIF orientation and draft decode (boxes in the displayed frame,
in original pixels), exactly-once after killing the driver, a second run doing nothing,
--retry-failed, and reading the output with pyarrow/pandas without Ray.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import corpus
import numpy as np
import pyarrow.parquet as pq
import yaml
from PIL import Image

from jobs.cli import main
from pipeline.commit import MANIFEST_DIR, RUNS_DIR
from pipeline.schema import STATUS_OK, read_metadata
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


def test_s3_in_and_out_then_second_run_does_nothing(ray_cluster, s3_bucket, tmp_path):
    import pyarrow.fs as pafs
    import s3fs

    bucket, options = s3_bucket
    secret = "SECRET-must-not-leak-42"
    opts = {**options, "key": "AKIDLEAKCHECK", "secret": secret}  # moto accepts any credentials
    write_dataset(f"{bucket}/in", images=12, shards=3, storage_options=opts, min_size=64, max_size=96)
    cfg = write_config(tmp_path / "c.yaml", storage={"options": opts})
    args = ["annotate", "--input", f"{bucket}/in", "--output", f"{bucket}/out", "--config", str(cfg)]
    assert main(args) == 0

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
    # No credential anywhere in what the job wrote.
    for path in fs.find(root):
        assert secret.encode() not in fs.cat(path), path
        assert b"AKIDLEAKCHECK" not in fs.cat(path), path

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

    # --retry-failed redoes the corrupt shard and the shards with failed rows only.
    needs = {sid for sid, m in manifest.items() if m["status"] == "failed" or m["failed_rows"]}
    assert main(args + ["--retry-failed"]) == 1
    report = json.loads(sorted((out / RUNS_DIR).glob("*.json"))[-1].read_text())
    assert report["shards"]["pending"] == len(needs) == report["shards"]["retried"]
    assert report["shards"]["skipped_committed"] == len(manifest) - len(needs)
    again = _read_without_ray(out)
    assert sorted(r["image_id"] for r in again) == sorted(r["image_id"] for r in frame)


def _read_without_ray(out: Path) -> list[dict]:
    """Open the output with pyarrow and pandas in a fresh interpreter that never imports Ray."""
    code = (
        "import json, sys, pandas as pd, pyarrow.dataset as ds\n"
        f"t = ds.dataset({str(out)!r}, format='parquet').to_table()\n"
        f"df = pd.read_parquet({str(out)!r})\n"
        "assert len(df) == t.num_rows and 'ray' not in sys.modules\n"
        "print(json.dumps(t.to_pylist()))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


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
    ids = []
    for part in out.glob("part-*.parquet"):
        ids += pq.read_table(part, columns=["image_id"]).column("image_id").to_pylist()
    assert len(ids) == 64 and len(set(ids)) == 64
    assert len(list(manifest.glob("*.json"))) == 16

    assert main(args) == 0  # a second complete run does nothing
    report = json.loads(sorted((out / RUNS_DIR).glob("*.json"))[-1].read_text())
    assert report["shards"]["pending"] == 0 and report["images"]["total"] == 0


def test_nightly_growing_prefix_processes_only_new_shards(ray_cluster, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    write_dataset(str(src / "day1"), images=4, shards=2, min_size=64, max_size=96)
    cfg = write_config(tmp_path / "c.yaml")
    args = ["annotate", "--input", str(src), "--output", str(out), "--config", str(cfg)]
    assert main(args) == 0
    write_dataset(str(src / "day2"), images=4, shards=2, seed=1, min_size=64, max_size=96)
    assert main(args) == 0
    report = json.loads(sorted((out / RUNS_DIR).glob("*.json"))[-1].read_text())
    assert report["shards"]["skipped_committed"] == 2 and report["shards"]["committed"] == 2
    assert pq.read_table(out).num_rows == 8


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

