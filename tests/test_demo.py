"""The demo: end to end on a tiny setting, its error paths, and the documented config examples.

1. ``mnv3-pipeline demo`` on a few tiny images and a few training seconds runs every stage
   (synth, finetune x3, int8 quantize, annotate, evaluate, preview) on the shared 2-CPU Ray
   cluster and writes the summary, one Parquet file per validation shard and the previews.
2. A work directory holding someone else's files is refused (nothing deleted); a failing stage
   exits 1 and names the stage.
3. Every ```yaml block of README.md and docs/*.md that starts with ``# mnv3-pipeline config``
   parses and validates with the product's config loader.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs import config as cfgmod
from jobs import demo
from jobs.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIG_MARK = "# mnv3-pipeline config"

TINY = {
    "demo.train_images": 12,
    "demo.val_images": 4,
    "demo.train_shards": 2,
    "demo.val_shards": 2,
    "demo.image_min_size": 64,
    "demo.image_max_size": 96,
    "demo.detect_min_size": 96,
    "demo.detect_max_size": 128,
    "demo.segment_size": 96,
    "demo.classify_size": 64,
    "demo.calib_images": 3,
    "demo.holdout_images": 3,
    "demo.previews": 2,
    "demo.no_progress_timeout_s": 120,
}


def _sets(values: dict) -> list[str]:
    out = []
    for key, value in values.items():
        out += ["--set", f"{key}={json.dumps(value)}"]
    return out


def test_tiny_demo_runs_end_to_end(ray_cluster, tmp_path, capsys):
    workdir = tmp_path / "demo"
    code = main(["demo", "--workdir", str(workdir), "--train-minutes", "0.3", *_sets(TINY)])
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]

    summary = json.loads((workdir / "summary.json").read_text())
    for stage in ("ray", "synth", "finetune detect", "finetune segment", "finetune classify", "quantize",
                  "annotate", "evaluate", "preview"):
        assert f"] {stage}: done in" in out, stage
        assert stage in summary["stage_seconds"]
    assert set(summary["models"]) == {"detect", "segment", "classify"}
    for info in summary["models"].values():
        assert info["precision"] in ("int8", "fp32") and info["steps"] >= 1
        assert Path(info["weights"]).is_file()
    # real metrics from the evaluator, not placeholders
    m = summary["metrics"]
    for key in ("box_map", "box_map50", "miou", "pixel_accuracy", "cls_top1"):
        assert isinstance(m[key], float) and 0.0 <= m[key] <= 1.0, key
    assert summary["annotate"]["images"] == 4 and summary["annotate"]["failed"] == 0
    assert summary["annotate"]["images_per_s"] > 0

    parts = sorted(Path(summary["outputs"]["parquet"]).glob("*.parquet"))
    assert len(parts) == 2
    table = pq.read_table(parts[0])
    assert table.num_rows == 2
    row = table.to_pylist()[0]
    assert row["status"] == "ok" and row["cls_labels"] and row["det_boxes"] is not None
    assert row["seg_masks"] is not None
    index = Path(summary["outputs"]["previews"])
    assert index.name == "index.html" and "<html" in index.read_text()
    assert len(list(index.parent.glob("*.jpg"))) == 2

    printed = out[out.index("mnv3-pipeline demo summary"):]
    assert "images/s" in printed and "mAP@0.5" in printed and "mIoU" in printed
    assert str(parts[0].parent) in printed and str(index) in printed

    # A second run clears the work directory it made and starts over.
    (workdir / "runs" / "stale.txt").write_text("left from a previous run")
    assert demo.prepare_workdir(str(workdir)) == str(workdir)
    assert sorted(p.name for p in workdir.iterdir()) == [demo.MARKER]


def test_foreign_workdir_is_refused_and_left_alone(tmp_path, capsys):
    (tmp_path / "precious.txt").write_text("not the demo's")
    assert main(["demo", "--workdir", str(tmp_path)]) == 2
    assert "not empty and was not made by the demo" in capsys.readouterr().err
    assert (tmp_path / "precious.txt").read_text() == "not the demo's"
    assert main(["demo", "--workdir", "s3://bucket/demo"]) == 2
    assert "must be a local directory" in capsys.readouterr().err


def test_bad_settings_exit_2_naming_the_key(tmp_path, capsys):
    code = main(["demo", "--workdir", str(tmp_path / "w"), "--set", "demo.val_shards=9",
                 "--set", "demo.val_images=4"])
    assert code == 2 and "demo.val_shards" in capsys.readouterr().err
    assert main(["demo", "--workdir", str(tmp_path / "w"), "--set", "demo.train_minutes=0"]) == 2
    assert "demo.train_minutes must be > 0" in capsys.readouterr().err
    assert main(["demo", "--set", "demo.trian_images=3"]) == 2
    assert "did you mean train_images" in capsys.readouterr().err


def test_failing_stage_exits_1_and_names_it(ray_cluster, tmp_path, capsys, monkeypatch):
    import pipeline.synth

    def broken(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(pipeline.synth, "write_dataset", broken)
    assert main(["demo", "--workdir", str(tmp_path / "w"), *_sets(TINY)]) == 1
    err = capsys.readouterr().err
    assert "FAILED in stage 'synth'" in err and "disk full (simulated)" in err


def test_budget_split_and_schedule_fit_the_budget():
    d = demo.DemoConfig(train_minutes=10.0, detect_share=0.5, segment_share=0.3, classify_share=0.2)
    assert demo.split_budget(d) == pytest.approx({"detect": 300.0, "segment": 180.0, "classify": 120.0})
    assert "classify" not in demo.split_budget(demo.DemoConfig(classify_share=0.0))
    plan = demo.plan_schedule({"task": "detect", "batch_size": 4}, train_images=100, budget_s=100.0,
                              step_s=0.5)
    steps = plan["epochs"] * plan["max_steps_per_epoch"]
    # 200 steps at the probe's pace; 1.5x planned (rounded down per epoch): the budget ends the run
    assert 290 <= steps <= 300 and steps == pytest.approx(200 * demo.STEP_HEADROOM, abs=10)
    assert plan["max_steps_per_epoch"] <= 25 and plan["max_minutes"] == pytest.approx(100 / 60)
    long = demo.plan_schedule({"task": "detect", "batch_size": 4}, train_images=384, budget_s=600.0,
                              step_s=0.5)
    assert 1700 <= long["epochs"] * long["max_steps_per_epoch"] <= 1800  # not capped by the data size
    assert long["max_steps_per_epoch"] <= 96
    assert long["warmup_epochs"] == pytest.approx(30 / long["max_steps_per_epoch"])  # 30 warm-up steps
    slow = demo.plan_schedule({"task": "segment", "batch_size": 8}, train_images=100, budget_s=5.0,
                              step_s=30.0)
    assert slow["epochs"] == 1 and slow["max_steps_per_epoch"] == 1 and slow["warmup_epochs"] == 0.0


def test_finetune_settings_are_valid_finetune_configs(tmp_path):
    from jobs.finetune import resolve_settings

    d = demo.DemoConfig(backbone_weights="/weights/mobilenet_v3_large-8738ca79.pth")
    for task in ("detect", "segment", "classify"):
        settings = demo.finetune_settings(task, d, str(tmp_path / "data"), str(tmp_path / "runs"), cpus=2)
        resolved = resolve_settings(demo._finetune_config(settings))
        assert resolved["task"] == task and resolved["cpus_per_worker"] == 2.0
        assert resolved["train"] == str(tmp_path / "data" / "train")
        assert resolved.get("init") == (d.backbone_weights if task != "classify" else None)
    assert resolve_settings(demo._finetune_config(demo.finetune_settings(
        "detect", demo.DemoConfig(), "d", "r", 1)))["builder"] == "fasterrcnn_mobilenet_v3_large_320_fpn"


def _config_blocks() -> list[tuple[str, str]]:
    blocks = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(r"^```ya?ml[^\n]*\n(.*?)^```", text, flags=re.S | re.M):
            body = match.group(1)
            if body.lstrip().startswith(CONFIG_MARK):
                line = text[: match.start()].count("\n") + 1
                blocks.append((f"{path.relative_to(ROOT)}:{line}", body))
    return blocks


def test_documented_config_examples_parse(monkeypatch):
    blocks = _config_blocks()
    assert any(where.startswith("docs/demo.md") for where, _ in blocks), "docs/demo.md has no config example"
    # Examples may reference secrets as ${VAR}; give them values so expansion is exercised too.
    for where, body in blocks:
        for name in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", body):
            monkeypatch.setenv(name, "example")
        cfg = cfgmod.from_dict(cfgmod.parse_text(body, "yaml", where), where)
        assert isinstance(cfg, cfgmod.Config), where


def test_a_broken_config_example_would_fail():
    """The check above is not vacuous: a misspelt key in such a block is an error naming the key."""
    body = f"{CONFIG_MARK}\ndemo:\n  train_minuts: 3\n"
    with pytest.raises(cfgmod.ConfigError, match="did you mean train_minutes"):
        cfgmod.from_dict(cfgmod.parse_text(body, "yaml", "example"), "example")
