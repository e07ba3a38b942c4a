"""The finetune job end to end on the shared 2-CPU Ray cluster, with tiny synthetic data.

1. Training the 320 detector from scratch for a bounded number of steps raises box mAP@0.5 over
   the same (seeded) untrained model; with a test-sized budget that is shown on the 8 images it
   trains on (generalisation on held-out data is the quality run in docs/finetune.md).
2. The export loads into a fresh model and reproduces the reported metric; annotate + evaluate on
   the validation shards reproduce it too (when the annotate job is installed).
3. A training worker killed mid-run is restarted from the last checkpoint and the run finishes;
   re-running an interrupted run by name continues it.
"""

from __future__ import annotations

import json

import pytest
import torch

from jobs.finetune import run_finetune
from pipeline.synth import write_dataset
from pipeline.training import data, export, models, trainer, validation

SIZES = {"min_size": 96, "max_size": 144}
DETECT = {
    "task": "detect",
    "epochs": 3,
    "max_steps_per_epoch": 50,  # 150 steps over 8 images
    "batch_size": 4,
    "lr": 0.05,
    "lr_schedule": "cosine",
    "warmup_epochs": 0.2,
    "warmup_factor": 0.1,
    "box_batch_size_per_image": 32,
    "rpn_pre_nms_top_n_train": 200,
    "rpn_post_nms_top_n_train": 100,
    "workers": 1,
    "cpus_per_worker": 1.5,
    "seed": 0,
    "log_every": 0,
    **SIZES,
}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    write_dataset(str(root / "train"), images=40, shards=2, seed=1, min_size=96, max_size=160)
    write_dataset(str(root / "val"), images=12, shards=1, seed=2, min_size=96, max_size=160)
    # The detector learns from scratch; in a test-sized budget it can only show that training
    # works on the images it sees: 8 small images, validated on themselves.
    write_dataset(str(root / "small"), images=8, shards=1, seed=1, min_size=64, max_size=96)
    return root


@pytest.fixture(scope="module")
def detect_run(synth, ray_cluster):
    small = str(synth / "small")
    return run_finetune({**DETECT, "train": small, "val": small, "output": str(synth / "runs")})


def _val_images(synth):
    src = data.load_source(str(synth / "small"))
    raw = data.read_image_bytes(src)
    items = [validation.ValImage(r, data.decode_rgb(raw[r["id"]])) for r in src.images]
    return src, items


def test_finetuning_the_320_detector_raises_map50(detect_run, synth):
    src, items = _val_images(synth)
    cats = data.CategoryMap.from_categories(src.categories, background=True)
    torch.manual_seed(DETECT["seed"])  # the same initial weights the run started from
    untrained, _ = models.build_model(
        "detect", "fasterrcnn_mobilenet_v3_large_320_fpn", cats.num_classes, detector_kwargs=SIZES
    )
    before = validation.evaluate_detection(untrained, items, src, cats)["map50"]
    after = detect_run.metrics["map50"]
    assert after >= before + 0.05, f"mAP@0.5 {before:.4f} untrained -> {after:.4f} after training"
    history = json.loads((synth / "runs" / detect_run.run_name / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1, 2] and history == detect_run.history
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert (synth / "runs" / detect_run.run_name / "history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert detect_run.run_name.startswith("finetune-detect-2")


def test_export_reloads_and_annotate_reproduces_the_metric(detect_run, synth, tmp_path):
    from mnv3.detection import fasterrcnn_mobilenet_v3_large_320_fpn

    side = export.read_sidecar(detect_run.weights_uri)
    assert side["labels"] == ["__background__", "circle", "rectangle", "triangle", "ellipse", "star"]
    assert side["categories"][1] == {"label_id": 1, "category_id": 1, "name": "circle"}
    assert side["params"] == SIZES and side["metrics"]["map50"] == detect_run.metrics["map50"]
    assert side["lineage"]["run_name"] == detect_run.run_name and side["lineage"]["steps"] == 150
    src, items = _val_images(synth)
    cats = data.CategoryMap.from_categories(src.categories, background=True)
    fresh = fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=detect_run.weights_uri, num_classes=side["num_classes"], **side["params"]
    )
    assert len(fresh.state_dict()) == 284  # torchvision's trained detector layout
    again = validation.evaluate_detection(fresh, items, src, cats)
    assert again["map50"] == pytest.approx(detect_run.metrics["map50"], abs=1e-6)
    assert again["map"] == pytest.approx(detect_run.metrics["map"], abs=1e-6)

    pytest.importorskip("pipeline.run")
    from jobs.cli import main
    from pipeline.coco import evaluate

    # annotate needs nothing but the weights URI: the sidecar brings builder, classes and sizes.
    # One image per model call, as validation does (a padded batch shifts the outputs a little).
    out = str(tmp_path / "annotated")
    weights = f"tasks.detect.weights={json.dumps(detect_run.weights_uri)}"
    assert main(["annotate", "--input", str(synth / "small"), "--output", out, "--tasks", "detect",
                 "--set", weights, "--set", "batch.max_images=1"]) == 0
    scores = evaluate(out, str(synth / "small" / "annotations.json"))
    assert scores["bbox"]["AP50"] == pytest.approx(detect_run.metrics["map50"], abs=1e-3)
    assert scores["bbox"]["AP"] == pytest.approx(detect_run.metrics["map"], abs=1e-3)


CLASSIFY = {
    "task": "classify",
    "builder": "mobilenet_v3_small",
    "epochs": 3,
    "max_steps_per_epoch": 2,
    "batch_size": 4,
    "resize_size": 48,
    "crop_size": 48,
    "optimizer": "sgd",
    "lr": 0.01,
    "auto_augment": False,
    "workers": 2,
    "cpus_per_worker": 0.5,
    "log_every": 0,
}


def test_killed_worker_restarts_from_checkpoint_and_rerun_continues(synth, ray_cluster, s3_bucket, tmp_path):
    """Checkpoints, history and export on S3 (moto); a killed worker and a failed run both resume."""
    import s3fs

    bucket, options = s3_bucket
    output = f"{bucket}/runs"
    base = {**CLASSIFY, "train": str(synth / "train"), "val": str(synth / "val"), "output": output}
    marker = tmp_path / "killed"
    # 2 steps per epoch. Rank 0 exits hard at step 3 (in epoch 1): FailureConfig(max_failures=1)
    # restarts the worker group from epoch 0's checkpoint. It dies again at step 5 (epoch 2): no
    # restarts are left and the run fails, leaving epoch 1's checkpoint and no export.
    hooks = {"_fail_at_steps": [3, 5], "_fail_marker": str(marker)}
    with pytest.raises(RuntimeError, match="failed"):
        run_finetune({**base, "max_failures": 1}, storage_options=options, test_hooks=hooks)
    assert (tmp_path / "killed-3").exists() and (tmp_path / "killed-5").exists()
    fs = s3fs.S3FileSystem(**options)
    # s3fs may list the prefix's own directory marker ("runs/") beside the run folder.
    listed = [p for p in fs.ls(output.removeprefix("s3://")) if not p.endswith("/")]
    assert len(listed) == 1, listed
    (run_dir,) = listed
    name = run_dir.rsplit("/", 1)[-1]
    assert name.startswith("finetune-classify-2") and not fs.exists(f"{run_dir}/export")

    # Re-running the job with resume="auto" finds that unfinished run and finishes it.
    resumed = run_finetune({**base, "max_failures": 0, "resume": "auto"}, storage_options=options)
    assert resumed.run_name == name and resumed.resumes == [0, 1] and resumed.steps == 6
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2]
    assert resumed.weights_uri.startswith(f"{output}/{name}/export/mobilenet_v3_small-")
    side = export.read_sidecar(resumed.weights_uri, options)
    assert side["labels"][0] == "circle" and side["lineage"]["epochs_done"] == 3
    assert json.loads(fs.cat_file(f"{run_dir}/history.json")) == resumed.history
    # A finished run is never resumed: "auto" would now start a new run.
    assert trainer.unfinished_run(output, "classify", options) is None


def test_cli_resume_of_unknown_run_is_an_error(tmp_path, capsys):
    from jobs.cli import main

    args = ["finetune", "--task", "classify", "--train", str(tmp_path), "--output", str(tmp_path)]
    code = main([*args, "--resume", "nope"])
    assert code == 2 and "cannot resume run 'nope'" in capsys.readouterr().err
