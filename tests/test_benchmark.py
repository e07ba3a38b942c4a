"""`mnv3-pipeline benchmark` on tiny settings, and the `quantize` job end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from jobs.cli import main
from pipeline.benchmark import (
    CASES,
    ROW_PROVIDERS,
    BenchmarkConfig,
    Case,
    format_table,
    register_rows,
    run_benchmark,
    select_cases,
)


def test_benchmark_quick_cli(tmp_path, capsys):
    report_path, png_path = tmp_path / "report.json", tmp_path / "chart.png"
    rc = main(["benchmark", "--quick", "--models", "mobilenet_v3_small", "--modes", "fp32,channels_last,int8",
               "--batch-sizes", "1,2", "--clock", "cpu", "--output", str(report_path),
               "--plot", str(png_path)])
    assert rc == 0
    report = json.loads(report_path.read_text())
    rows = report["rows"]
    assert {(r["mode"], r["batch"]) for r in rows} == {(m, b) for m in ("fp32", "channels_last", "int8")
                                                       for b in (1, 2)}
    for r in rows:
        assert r["error"] is None, r["error"]
        assert r["kind"] == "model" and r["clock"] == "cpu"
        assert r["images_per_s_per_core"] > 0 and r["peak_rss_mb"] > 0 and len(r["seconds_all"]) == 2
        # cpu clock, 1 thread: images per CPU second of the median call
        assert r["images_per_s_per_core"] == pytest.approx(r["batch"] / r["cpu_seconds_median"])
        assert r["vs_fp32"] == pytest.approx(r["images_per_s_per_core"] / next(
            f["images_per_s_per_core"] for f in rows if f["mode"] == "fp32" and f["batch"] == r["batch"]),
            rel=1e-2)
    assert report["machine"]["threads"] == 1 and report["machine"]["quantized_engine"]
    out = capsys.readouterr().out
    assert "mobilenet_v3_small" in out and "vs fp32" in out
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_benchmark_cases_cover_the_issue_and_are_extensible():
    names = set(CASES)
    assert {"mobilenet_v3_large", "mobilenet_v3_small", "frcnn_fpn@640x480", "frcnn_320_fpn@640x480",
            "lraspp@520", "lraspp@320", "deeplabv3@520", "deeplabv3@320"} <= names
    assert [c.name for c in select_cases(["lraspp_mobilenet_v3_large"])] == ["lraspp@520", "lraspp@320"]
    with pytest.raises(ValueError, match="unknown benchmark model"):
        select_cases(["resnet50"])
    with pytest.raises(ValueError, match="unknown modes"):
        BenchmarkConfig(modes=["fp16"])


def test_a_failing_mode_becomes_a_row_not_a_crash():
    def broken(**_):
        raise RuntimeError("no such model yet")

    case = Case("broken", "broken", "classification", (32, 32), broken)
    report = run_benchmark([case], BenchmarkConfig(modes=["fp32"], quick=True), log=lambda m: None)
    assert report["rows"][0]["error"].startswith("RuntimeError: no such model yet")
    assert "skipped" in format_table(report)


def test_extra_row_providers_join_the_report(monkeypatch):
    seen = {}

    def end_to_end(cfg, log):
        seen["threads"] = cfg.threads
        return [{"kind": "end_to_end", "model": "bundle", "mode": mode, "batch": 16, "input": "jpeg",
                 "images_per_s_per_core": rate, "images_per_s": rate} for mode, rate in (("fp32", 4.0),
                                                                                       ("int8", 10.0))]

    monkeypatch.setattr("pipeline.benchmark.ROW_PROVIDERS", dict(ROW_PROVIDERS))
    register_rows("e2e", end_to_end)
    report = run_benchmark([], BenchmarkConfig(threads=1), log=lambda m: None, extra=["e2e"])
    assert seen == {"threads": 1} and report["config"]["extra"] == ["e2e"]
    assert [(r["kind"], r["mode"], r["vs_fp32"]) for r in report["rows"]] == [("end_to_end", "fp32", 1.0),
                                                                             ("end_to_end", "int8", 2.5)]
    assert "end_to_end" in format_table(report)
    with pytest.raises(ValueError, match="unknown extra benchmark rows"):
        run_benchmark([], BenchmarkConfig(), log=lambda m: None, extra=["nope"])


def _image_dir(tmp_path, n):
    rng = np.random.default_rng(0)
    d = tmp_path / "images"
    d.mkdir()
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(d / f"img{i:02d}.png")
    return d


def test_quantize_job_writes_gated_artifact_or_refuses(tmp_path, capsys):
    from mnv3.quantization.artifact import load_int8_artifact

    images = _image_dir(tmp_path, 6)
    out = tmp_path / "small.int8.pt"
    common = ["quantize", "--builder", "mobilenet_v3_small", "--num-classes", "10", "--calibration",
              str(images), "--calib-images", "3", "--holdout-images", "3", "--resize-size", "72"]
    # The gate cannot pass a negative allowance: refused, with advice, and nothing written.
    assert main(common + ["--output", str(out), "--max-drop", "-1"]) == 4
    err = capsys.readouterr().err
    assert "int8 refused" in err and "fp32 or bf16" in err and not out.exists()
    assert main(common + ["--output", str(out), "--max-drop", "100"]) == 0
    with out.open("rb") as f:
        model, meta = load_int8_artifact(f)
    assert meta["task"] == "classification" and meta["calibration"]["images"] == 3
    assert meta["gate"]["images"] == 3 and meta["gate"]["metric"] == "top1_agreement"
    assert model.classifier[3].out_features == 10
