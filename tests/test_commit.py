"""Shard commit and resume selection (no Ray): atomic files, records after files, retry, overwrite."""

from __future__ import annotations

import json

import pyarrow.parquet as pq

from pipeline.commit import MANIFEST_DIR, OutputStore, part_name, select_shards
from pipeline.schema import read_metadata
from pipeline.sources import ShardSpec


def _rows(shard: str, n: int, failed: int = 0) -> list[dict]:
    return [{"image_id": f"{shard}/{i}", "key": f"{i:03d}", "source_uri": f"x#{i}", "shard": shard,
             "status": "decode_error" if i < failed else "ok", "error": "bad" if i < failed else None,
             "width": 4, "height": 3} for i in range(n)]


def test_commit_writes_file_then_record_with_stats(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    rec = store.commit_shard("s1", list(reversed(_rows("s1", 5, failed=2))), {"run_id": "r1"},
                             {"decode_s": 0.1, "model_s": 0.2}, run_id="r1", spec_fingerprint="f1")
    table = pq.read_table(tmp_path / "out" / part_name("s1"))
    assert table.column("key").to_pylist() == sorted(table.column("key").to_pylist())  # deterministic order
    assert read_metadata(table.schema)["run_id"] == "r1"
    on_disk = json.loads((tmp_path / "out" / MANIFEST_DIR / "s1.json").read_text())
    assert on_disk["rows"] == 5 and on_disk["failed_rows"] == 2 and rec.needs_retry
    assert on_disk["top_errors"] == [["decode_error: bad", 2]] and on_disk["stats"]["write_s"] >= 0
    assert not [p for p in (tmp_path / "out").rglob("*") if p.name.endswith(".tmp")]


def test_select_resume_retry_changed_and_overwrite(tmp_path):
    out = tmp_path / "out"
    store = OutputStore(str(out))
    a, b, c, d = (ShardSpec(s, "files", (f"u/{s}.jpg",)) for s in "abcd")
    store.commit_shard("a", _rows("a", 2), {}, {}, run_id="r", spec_fingerprint=a.fingerprint())
    store.commit_shard("b", _rows("b", 2, failed=1), {}, {}, run_id="r", spec_fingerprint=b.fingerprint())
    store.record_failed("c", "corrupt tar", {}, run_id="r", spec_fingerprint=c.fingerprint())
    (out / "notes.txt").write_text("not ours")

    sel = select_shards([a, b, c, d], store)
    assert [s.shard_id for s in sel.pending] == ["d"] and sel.skipped_committed == 3
    assert sel.earlier_failed_ids == ["c"] and sel.earlier_failed_rows == 1  # still missing from the output
    sel = select_shards([a, b, c, d], store, retry_failed=True)
    assert [s.shard_id for s in sel.pending] == ["b", "c", "d"] and sel.retried == 2
    assert sel.earlier_failed_ids == [] and sel.earlier_failed_rows == 0
    assert select_shards([a, b, d], store).earlier_failed_ids == []  # c no longer listed: not counted
    grown = ShardSpec("a", "files", ("u/a.jpg", "u/a2.jpg"))  # same id, a file was added
    sel = select_shards([grown, b, c, d], store)
    assert [s.shard_id for s in sel.pending] == ["a", "d"] and sel.changed == 1

    sel = select_shards([a, b, c, d], store, overwrite=True)
    assert len(sel.pending) == 4 and sel.reset == {"records": 3, "parts": 2}
    assert not list(out.glob("part-*")) and not list((out / MANIFEST_DIR).glob("*.json"))
    assert (out / "notes.txt").read_text() == "not ours"


def test_dated_outputs_and_selection_across_earlier_dates(tmp_path):
    from pipeline.commit import dated_outputs, resolve_output

    template = str(tmp_path / "out" / "dt={date}" / "ann")
    day1 = OutputStore(resolve_output(template, "2026-01-01"))
    a, b, c = (ShardSpec(s, "files", (f"u/{s}.jpg",)) for s in "abc")
    day1.commit_shard("a", _rows("a", 2), {}, {}, run_id="r1", spec_fingerprint=a.fingerprint())
    day1.commit_shard("b", _rows("b", 2, failed=1), {}, {}, run_id="r1", spec_fingerprint=b.fingerprint())
    (tmp_path / "out" / "dt=junk").mkdir()
    (tmp_path / "out" / "notes").mkdir()
    found = dated_outputs(template)
    assert list(found) == ["2026-01-01"] and found["2026-01-01"].endswith("dt=2026-01-01/ann")

    day2 = OutputStore(resolve_output(template, "2026-01-02"))
    sel = select_shards([a, b, c], day2, history=[day1])
    assert [s.shard_id for s in sel.pending] == ["c"] and sel.skipped_earlier == 2 and not sel.targets
    # --retry-failed re-does shard b where it was committed: one place per image across dates
    sel = select_shards([a, b, c], day2, retry_failed=True, history=[day1])
    assert [s.shard_id for s in sel.pending] == ["b", "c"] and sel.retried_ids == ["b"]
    assert sel.targets["b"] is day1


def test_output_template_is_checked():
    import pytest

    from pipeline.commit import check_output_template, resolve_output

    assert resolve_output("s3://b/x/{date}/y", "2026-03-04") == "s3://b/x/2026-03-04/y"
    assert resolve_output("s3://b/x", "2026-03-04") == "s3://b/x"
    for bad in ("s3://b/{day}", "s3://b/{date}/{date}"):
        with pytest.raises(ValueError, match="only placeholder"):
            check_output_template(bad)
    with pytest.raises(ValueError, match="YYYY-MM-DD"):
        resolve_output("s3://b/{date}", "04/03/2026")


def test_redactor_scrubs_options_env_userinfo_and_signed_urls():
    from pipeline.run import Redactor

    redact = Redactor([{"key": "AKIDEXAMPLE1", "secret": "hunter2-secret", "endpoint_url": "http://127.0.0.1:9",
                        "client_kwargs": {"aws_session_token": "nested-token-1"}}],
                      environ={"AWS_SECRET_ACCESS_KEY": "env-secret-99", "HOME": "/home/someone",
                               "RAY_AUTH_TOKEN": "ray-token-123", "RAY_AUTH_MODE": "disabled",
                               "SSH_AUTH_SOCK": "/tmp/agent.sock"})
    text = ("cannot read s3://b/x with key AKIDEXAMPLE1 / hunter2-secret / nested-token-1 / env-secret-99 / "
            "ray-token-123; https://bob:pa55word@host/a.jpg?X-Amz-Signature=abc123&size=2")
    out = redact.text(text)
    for secret in ("AKIDEXAMPLE1", "hunter2-secret", "nested-token-1", "env-secret-99", "ray-token-123",
                   "pa55word", "abc123"):
        assert secret not in out, secret
    assert "http" in out and "size=2" in out and "bob:***@host" in out
    assert redact({"a": [text], "endpoint": "http://127.0.0.1:9"})["endpoint"] == "http://127.0.0.1:9"
    # only credential-like variables count, not settings or paths that merely share a word
    assert not {"/home/someone", "disabled", "/tmp/agent.sock"} & set(redact.secrets)


def test_interrupted_runs_are_running_or_errored_runs_after_the_last_finished(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    for run_id, status in (("20261201T000000Z-a", "running"), ("20261202T000000Z-b", "ok"),
                           ("20261203T000000Z-c", "error"), ("20261204T000000Z-d", "running")):
        store.write_report(run_id, {"run_id": run_id, "status": status})
    # newest first, stopping at the last run that finished (b); the errored run c counts
    assert [r["run_id"] for r in store.interrupted_runs()] == ["20261204T000000Z-d", "20261203T000000Z-c"]
    store.write_report("20261205T000000Z-e", {"run_id": "20261205T000000Z-e", "status": "some_shards_failed"})
    assert store.interrupted_runs() == []


def test_run_ids_sort_in_start_order_within_a_second():
    import re
    import time

    from pipeline.run import new_run_id

    ids = []
    for _ in range(5):
        ids.append(new_run_id())
        time.sleep(0.002)
    assert ids == sorted(ids) and len(set(ids)) == 5
    assert re.fullmatch(r"\d{8}T\d{6}\.\d{3}Z-[0-9a-f]{6}", ids[0])
