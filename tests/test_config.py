"""The config loader: YAML/TOML, validation that names the key, overrides, secrets, reference."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import typing

import pytest

from jobs import config as cfgmod
from jobs.cli import main


def test_defaults_are_valid_and_cpu_friendly():
    cfg = cfgmod.load()
    assert cfg.tasks.enabled() == ["classify"]
    assert cfg.tasks.detect.builder == "fasterrcnn_mobilenet_v3_large_320_fpn"
    assert cfg.tasks.segment.builder == "lraspp_mobilenet_v3_large"
    assert cfg.run.no_progress_timeout_s > 0 and cfg.actors.read_num_cpus < 1


def test_yaml_and_toml_give_the_same_config(tmp_path):
    yml = tmp_path / "c.yaml"
    yml.write_text("tasks:\n  detect: {enabled: true, threshold: 0.4, top_k: 7}\nbatch: {max_images: 4}\n")
    toml = tmp_path / "c.toml"
    toml.write_text("[tasks.detect]\nenabled = true\nthreshold = 0.4\ntop_k = 7\n[batch]\nmax_images = 4\n")
    a, b = cfgmod.load(yml), cfgmod.load(toml)
    assert a == b
    assert a.tasks.detect.threshold == 0.4 and a.tasks.enabled() == ["classify", "detect"]


@pytest.mark.parametrize("data, message", [
    ({"tasks": {"detect": {"treshold": 0.5}}}, "unknown key tasks.detect.treshold; did you mean threshold?"),
    ({"taks": {}}, "unknown key taks; did you mean tasks?"),
    ({"batch": {"max_images": 0}}, "batch.max_images must be >= 1, got 0"),
    ({"tasks": {"classify": {"precision": "fp16"}}},
     "tasks.classify.precision must be one of fp32, bf16, int8"),
    ({"run": {"draft_decode": "yes"}}, "run.draft_decode must be bool"),
    ({"actors": {"num_cpus": 0}}, "actors.num_cpus must be > 0"),
    ({"tasks": {"segment": {"labels": "vocc"}}}, "tasks.segment.labels: unknown category list 'vocc'"),
    ({"tasks": {"classify": {"enabled": False}}}, "no task is enabled"),
    ({"tasks": {"classify": {"crop_size": 300}}}, "tasks.classify.crop_size (300) is larger"),
])
def test_invalid_config_names_the_key(tmp_path, data, message):
    path = tmp_path / "bad.yaml"
    import yaml

    path.write_text(yaml.safe_dump(data))
    with pytest.raises(cfgmod.ConfigError) as info:
        cfgmod.load(path)
    assert message in str(info.value)
    assert str(path) in str(info.value)


def test_syntax_error_is_a_config_error(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[tasks\n")
    with pytest.raises(cfgmod.ConfigError, match="cannot parse the config as TOML"):
        cfgmod.load(path)


def test_overrides_win_and_are_validated(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("tasks: {detect: {threshold: 0.2}}\n")
    key, value = cfgmod.parse_assignment("tasks.detect.threshold=0.7")
    cfg = cfgmod.load(path, {key: value})
    assert cfg.tasks.detect.threshold == 0.7
    with pytest.raises(cfgmod.ConfigError, match="unknown key tasks.detect.thresh; did you mean threshold"):
        cfgmod.load(path, {"tasks.detect.thresh": 1})


def test_env_references_and_redaction(monkeypatch, tmp_path):
    monkeypatch.setenv("MY_S3_SECRET", "s3cr3t-value")
    path = tmp_path / "c.yaml"
    path.write_text("storage:\n  options: {endpoint_url: 'http://127.0.0.1:9', key: AKIA, "
                    "secret: '${MY_S3_SECRET}', client_kwargs: {region_name: us-east-1}}\n")
    cfg = cfgmod.load(path)
    assert cfg.storage.options["secret"] == "s3cr3t-value"
    shown = json.dumps(cfg.to_dict(redact=True))
    assert "s3cr3t-value" not in shown and "AKIA" not in shown
    monkeypatch.delenv("MY_S3_SECRET")
    with pytest.raises(cfgmod.ConfigError, match="storage.options.secret refers to environment variable"):
        cfgmod.load(path)


def _leaf_keys(cls: type, prefix: str = "") -> list[str]:
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        key = f"{prefix}.{f.name}" if prefix else f.name
        keys += _leaf_keys(hints[f.name], key) if dataclasses.is_dataclass(hints[f.name]) else [key]
    return keys


def test_reference_documents_every_key():
    text = cfgmod.render_reference()
    keys = _leaf_keys(cfgmod.Config)
    assert len(keys) > 30
    for key in keys:
        assert f"| `{key}` |" in text, key
    assert "`tasks.detect.threshold` | float | `0.05` |" in text


def test_registered_sections_are_parsed_and_documented():
    @dataclasses.dataclass
    class DemoSection:
        """A section another job adds."""

        epochs: int = cfgmod.opt(3, "Epochs to train.", minimum=1)

    cfgmod.register_section("unit_test_section", DemoSection)
    try:
        cfg = cfgmod.from_dict({"unit_test_section": {"epochs": 5}})
        assert cfg.section("unit_test_section").epochs == 5
        with pytest.raises(cfgmod.ConfigError, match="unknown key unit_test_section.epoch; did you mean"):
            cfgmod.from_dict({"unit_test_section": {"epoch": 5}})
        assert "| `unit_test_section.epochs` | int | `3` |" in cfgmod.render_reference()
    finally:
        cfgmod._REGISTERED.pop("unit_test_section")


def test_cli_bad_config_exits_2_before_any_work(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("tasks: {detect: {treshold: 0.5}}\n")
    out = tmp_path / "out"
    code = main(["annotate", "--input", str(tmp_path / "in"), "--output", str(out), "--config", str(path)])
    assert code == 2
    assert "unknown key tasks.detect.treshold; did you mean threshold?" in capsys.readouterr().err
    assert not out.exists()
    code = main(["annotate", "--input", str(tmp_path / "in"), "--output", str(out), "--tasks", "clasify"])
    assert code == 2 and not out.exists()
    code = main(["annotate", "--input", str(tmp_path / "in"), "--output", str(out / "{day}")])
    assert code == 2 and "the only placeholder is {date}" in capsys.readouterr().err
    dated = str(out / "{date}")
    code = main(["annotate", "--input", str(tmp_path / "in"), "--output", dated, "--date", "1/2/26"])
    assert code == 2 and "YYYY-MM-DD" in capsys.readouterr().err and not out.exists()


def test_cli_print_config_hides_secrets(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("storage: {options: {secret: hunter2, endpoint_url: 'http://x'}}\n")
    res = subprocess.run([sys.executable, "-m", "jobs.cli", "annotate", "--input", "a", "--output", "b",
                          "--config", str(path), "--print-config"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert "hunter2" not in res.stdout and "endpoint_url" in res.stdout


def test_generated_reference_file_is_current():
    """docs/config_reference.md is ``python -m jobs.config`` output; regenerate it when keys change."""
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "docs" / "config_reference.md"
    current, wanted = path.read_text(), cfgmod.render_reference()

    def sections(text: str) -> dict[str, str]:
        parts = text.split("\n### ")
        return {p.split("\n", 1)[0]: p for p in parts[1:]}

    stale = sorted(k for k in set(sections(current)) | set(sections(wanted))
                   if sections(current).get(k) != sections(wanted).get(k))
    assert current == wanted, (f"docs/config_reference.md is stale (sections {stale}): run "
                               "`python -m jobs.config > docs/config_reference.md`")


def test_finetune_export_sidecar_configures_the_task(tmp_path, capsys):
    """A fine-tuned model's weights URI alone sets builder, labels, classes, sizes and sha256
    (from its JSON sidecar); explicit settings win; the bundle then runs it."""
    import argparse

    import numpy as np
    import pyarrow as pa

    import mnv3
    from jobs import annotate
    from pipeline.bundle import InferenceBundle
    from pipeline.training.export import export_model

    labels = ["background", "circle", "square"]
    weights, _ = export_model(
        str(tmp_path / "export"), task="segment", builder="lraspp_mobilenet_v3_large",
        state_dict=mnv3.lraspp_mobilenet_v3_large(num_classes=3).state_dict(), labels=labels,
        categories=[{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}],
        params={"resize_size": 96}, metrics={}, lineage={})
    cfg = cfgmod.load(None, {"tasks.segment.weights": weights, "tasks.segment.min_area": 1})
    defaults, notes = annotate.finetune_defaults(cfg)
    assert notes and "lraspp_mobilenet_v3_large" in notes[0]
    cfg = cfgmod.load(None, {"tasks.segment.weights": weights, "tasks.segment.min_area": 1,
                             "tasks.segment.resize_size": 64}, defaults=defaults)
    seg = cfg.tasks.segment
    assert seg.enabled and seg.labels == labels and seg.num_classes == 3 and seg.sha256
    assert seg.resize_size == 64 and seg.min_area == 1  # explicit settings win over the sidecar
    ns = argparse.Namespace(input="in", output="out", manifest=None, overwrite=False, retry_failed=False,
                            date=None)
    job = annotate.make_job(ns, cfg)
    spec = next(s for s in job.tasks if s.task == "segment")
    assert spec.labels == tuple(labels) and spec.sha256 and spec.weights == weights

    bundle = InferenceBundle([spec])
    pixels = np.zeros((40, 50, 3), np.uint8)
    row = {"image_id": "s/a", "key": "a", "source_uri": "x", "shard": "s", "width": 50, "height": 40,
           "status": "ok", "error": None, "_pixels": pixels.tobytes(), "_pix_h": 40, "_pix_w": 50}
    out = bundle(pa.Table.from_pylist([row])).to_pylist()[0]
    assert out["status"] == "ok" and all(m["size"] == [40, 50] for m in out["seg_masks"])
    assert {m["label"] for m in out["seg_masks"]} <= set(labels)

    # The same file configured under the wrong task is named in the error.
    bad = cfgmod.load(None, {"tasks.classify.weights": weights})
    with pytest.raises(cfgmod.ConfigError, match="tasks.classify.weights .* fine-tuned segment model"):
        annotate.finetune_defaults(bad)
