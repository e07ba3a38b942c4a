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
    sel = select_shards([a, b, c, d], store, retry_failed=True)
    assert [s.shard_id for s in sel.pending] == ["b", "c", "d"] and sel.retried == 2
    grown = ShardSpec("a", "files", ("u/a.jpg", "u/a2.jpg"))  # same id, a file was added
    sel = select_shards([grown, b, c, d], store)
    assert [s.shard_id for s in sel.pending] == ["a", "d"] and sel.changed == 1

    sel = select_shards([a, b, c, d], store, overwrite=True)
    assert len(sel.pending) == 4 and sel.reset == {"records": 3, "parts": 2}
    assert not list(out.glob("part-*")) and not list((out / MANIFEST_DIR).glob("*.json"))
    assert (out / "notes.txt").read_text() == "not ours"
