"""Security: credentials never leak, weights are verified, tar member names never escape the output.

- An annotate run on the S3 server with a key and secret in the config (one given literally,
  one through a ``${ENV_VAR}`` reference) and AWS credentials in the environment: none of them
  appears in stdout/stderr, Python logs, the Ray session logs, the run report, the manifest
  records, nor anywhere in the Parquet files
  (bytes, schema metadata, every string value); the same for ``--print-config`` and for a run
  that fails on a bad input.
- Weights: a wrong or mismatching sha256 (given, in the file name, or after tampering) is
  refused before anything is loaded; a checkpoint holding Python objects is refused without
  running them; ``annotate`` refuses a config whose weights do not match (exit 2).
- Tar members named ``../x``, ``/x``, ``C:/x``, ``..\\x`` or that are links become error rows;
  a run with previews creates files only under the output, with the pipeline's own names.
"""

from __future__ import annotations

import io
import json
import logging
import pickle
import tarfile
import time
from pathlib import Path

import corpus
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from jobs.cli import main
from mnv3.weights import WeightsError, load_state_dict, load_weights

FAST = {"tasks": {"classify": {"builder": "mobilenet_v3_small", "resize_size": 72, "crop_size": 64,
                               "top_k": 3}},
        "batch": {"max_images": 8}, "run": {"progress_interval_s": 1.0, "no_progress_timeout_s": 120.0}}


def write_config(path: Path, **sections) -> Path:
    data = json.loads(json.dumps(FAST))
    data.update(sections)
    path.write_text(yaml.safe_dump(data))
    return path


# --------------------------------------------------------------------------- credentials


def _ray_log_text(since: float) -> str:
    """Text of the Ray session's log files written since ``since`` (workers, raylet, GCS)."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    if node is None:
        return ""
    logs = Path(node.get_session_dir_path()) / "logs"
    chunks = []
    for path in logs.rglob("*"):
        if path.is_file() and path.stat().st_mtime >= since:
            chunks.append(path.read_bytes().decode("utf-8", "replace"))
    return "\n".join(chunks)


def _parquet_strings(fs, path: str) -> str:
    """Schema metadata and every value of every column, as text."""
    with fs.open(path, "rb") as f:
        table = pq.read_table(f)
    meta = {k.decode(): v.decode("utf-8", "replace") for k, v in (table.schema.metadata or {}).items()}
    return json.dumps(meta) + json.dumps(table.to_pylist(), default=str)


def test_no_credential_in_logs_reports_or_parquet(ray_cluster, s3_bucket, tmp_path, capfd, caplog,
                                                  monkeypatch):
    import s3fs

    from pipeline.synth import write_dataset

    bucket, options = s3_bucket
    key, secret = "AKIDSECURITYTEST0001", "sEcReT-from-env-7c1f0e9b"
    monkeypatch.setenv("MNV3_TEST_S3_SECRET", secret)
    # Credentials that only live in the driver's environment (the job's pod / container env).
    env_secrets = {"AWS_SECRET_ACCESS_KEY": "envSecretAccessKey-93b1d2",
                   "AWS_SESSION_TOKEN": "envSessTok-5e0a77f1"}
    for name, value in env_secrets.items():
        monkeypatch.setenv(name, value)
    real = {**options, "key": key, "secret": secret}  # moto accepts any credentials
    write_dataset(f"{bucket}/in", images=6, shards=2, storage_options=real, min_size=64, max_size=96)
    in_config = {**options, "key": key, "secret": "${MNV3_TEST_S3_SECRET}"}
    cfg = write_config(tmp_path / "c.yaml", storage={"options": in_config})
    assert secret not in cfg.read_text()
    caplog.set_level(logging.DEBUG)
    started = time.time() - 1
    base = ["annotate", "--input", f"{bucket}/in", "--output", f"{bucket}/out", "--config", str(cfg)]

    assert main(base + ["--print-config"]) == 0
    assert main(base) == 0
    assert main(["annotate", "--input", f"{bucket}/missing", "--output", f"{bucket}/out2", "--config",
                 str(cfg)]) == 2  # a failing run: its error message must not carry the options either
    captured = capfd.readouterr()

    fs = s3fs.S3FileSystem(**real)
    root = f"{bucket[5:]}/out"
    written = fs.find(root)
    parts = [p for p in written if p.endswith(".parquet")]
    reports = [p for p in written if "/_runs/" in p]
    assert len(parts) == 2 and reports and any("/_manifest/" in p for p in written)
    # botocore's own DEBUG lines name the access key id (the SigV4 "Credential=" scope, not the
    # secret): the secret is checked in every log line, the key id in INFO and above.
    info_logs = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.INFO)
    places = {"stdout": captured.out, "stderr": captured.err, "python logs (INFO+)": info_logs,
              "ray session logs": _ray_log_text(started)}
    for path in written:
        places[path] = fs.cat(path).decode("utf-8", "replace")
    for path in parts:
        places[f"{path} (decoded)"] = _parquet_strings(fs, path)
    # The progress lines and Ray's worker logs were captured: the checks below are not vacuous.
    assert "[annotate]" in captured.err and places["ray session logs"]
    assert secret not in caplog.text, "the S3 secret leaked into the Python logs (DEBUG included)"
    for where, text in places.items():
        assert secret not in text, f"the S3 secret leaked into {where}"
        assert key not in text, f"the S3 access key leaked into {where}"
        for name, value in env_secrets.items():
            assert value not in text, f"${name} leaked into {where}"
    report = json.loads(fs.cat(reports[0]))
    assert report["config"]["storage"]["options"]["secret"] != secret


# --------------------------------------------------------------------------- weights


def _save(path: Path, obj) -> str:
    import hashlib

    torch.save(obj, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_weights_with_a_wrong_sha256_are_refused(tmp_path):
    model = torch.nn.Linear(4, 2)
    good = {k: torch.full_like(v, 0.5) for k, v in model.state_dict().items()}
    path = tmp_path / "w.pth"
    digest = _save(path, good)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    assert load_state_dict(str(path), sha256=digest[:12]).keys() == good.keys()  # the right hash loads
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        load_weights(model, str(path), sha256="0" * 64)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # model untouched

    # The hash in a torchvision-style file name is checked too.
    named = tmp_path / "w-deadbeef.pth"
    named.write_bytes(path.read_bytes())
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        load_state_dict(str(named))

    # One flipped byte: refused against the hash of the original.
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tampered = tmp_path / "tampered.pth"
    tampered.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        load_state_dict(str(tampered), sha256=digest)


class _Payload:
    """Unpickling this would create a marker file (what a malicious checkpoint would do)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_checkpoint_with_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"weight": torch.zeros(2), "x": _Payload(str(marker))}, f)
    with pytest.raises(WeightsError, match="weights_only|not a PyTorch checkpoint"):
        load_state_dict(str(path), sha256="")
    assert not marker.exists()


def test_annotate_refuses_weights_that_do_not_match_their_sha256(tmp_path, capsys):
    from mnv3 import mobilenet_v3_small

    weights = tmp_path / "small.pth"
    _save(weights, mobilenet_v3_small(num_classes=1000).state_dict())
    cfg = write_config(tmp_path / "c.yaml", tasks={"classify": {
        **FAST["tasks"]["classify"], "weights": str(weights), "sha256": "ab" * 32}})
    corpus.write_tar(tmp_path / "in" / "a.tar", {"good.jpg": corpus.jpeg_with_orientation(1)})
    out = tmp_path / "out"
    code = main(["annotate", "--input", str(tmp_path / "in"), "--output", str(out), "--config", str(cfg)])
    assert code == 2  # a config error, before any work: retrying cannot help
    err = capsys.readouterr().err
    assert "tasks.classify.sha256" in err and "abab" in err
    assert not out.exists() or not list(out.rglob("*.parquet"))


# --------------------------------------------------------------------------- tar member names

UNSAFE = ("../evil.jpg", "/abs_evil.jpg", "ok/../../evil2.jpg", "../../../../../../tmp/evil3.jpg",
          "C:/evil4.jpg", "..\\evil5.jpg")


def _link_tar(path: Path) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        data = corpus.jpeg_with_orientation(1)
        info = tarfile.TarInfo("fine.jpg")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
        for name, kind, target in (("sym.jpg", tarfile.SYMTYPE, "../../outside.jpg"),
                                   ("hard.jpg", tarfile.LNKTYPE, "/etc/hostname")):
            link = tarfile.TarInfo(name)
            link.type, link.linkname = kind, target
            tf.addfile(link)


def _tree(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def test_tar_member_names_never_write_outside_the_output(ray_cluster, tmp_path, monkeypatch):
    work = tmp_path / "work"
    src, out = work / "in", work / "out"
    good = corpus.jpeg_with_orientation(1)
    corpus.write_tar(src / "escape.tar", {"good.jpg": good, **{name: good for name in UNSAFE}})
    _link_tar(src / "links.tar")
    cfg = write_config(tmp_path / "c.yaml")
    monkeypatch.chdir(work)  # a relative write would land here
    outside = [Path(p) for p in ("/abs_evil.jpg", "/tmp/evil3.jpg", "/evil4.jpg")]
    existed = {p for p in outside if p.exists()}
    before = _tree(tmp_path)

    code = main(["annotate", "--input", str(src), "--output", str(out), "--config", str(cfg),
                 "--preview", "10"])
    assert code == 1  # the refused members are failed rows; the shards themselves commit

    rows = pq.read_table(out).to_pylist()
    by_name = {r["source_uri"].rsplit("#", 1)[-1]: r for r in rows}
    assert set(by_name) == {"good.jpg", *UNSAFE, "fine.jpg", "sym.jpg", "hard.jpg"}
    for name in UNSAFE:
        assert by_name[name]["status"] != "ok" and "unsafe tar member name" in by_name[name]["error"], name
    for name in ("sym.jpg", "hard.jpg"):
        assert by_name[name]["status"] != "ok" and "link" in by_name[name]["error"], name
    assert by_name["good.jpg"]["status"] == by_name["fine.jpg"]["status"] == "ok"

    new = _tree(tmp_path) - before
    assert new and all(out in p.parents for p in new), sorted(map(str, new - _tree(out)))
    allowed = ("part-", "_manifest", "_runs", "_preview")
    for p in new:
        first = p.relative_to(out).parts[0]
        assert first.startswith(allowed), p
    previews = [p for p in new if "_preview" in p.parts]
    assert any(p.name == "index.html" for p in previews) and len(previews) >= 3
    for p in outside:
        assert p in existed or not p.exists(), p
