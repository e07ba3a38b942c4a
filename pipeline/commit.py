"""Per-shard output commit and run state: the exactly-once half of the annotate job.

Layout under the output URL::

    part-<shard_id>.parquet      one file per shard, deterministic name, written atomically
    _manifest/<shard_id>.json    one small record per processed shard, written AFTER its file
    _runs/<run_id>.json          one report per run

A shard is done when its manifest record exists; the record is written only after the
Parquet file is complete, so a crash between the two re-processes that shard and
overwrites the same file name (no duplicates, no gaps). Records are independent objects
(no read-modify-write of a shared file), so concurrent writers and object stores without
appends are fine. Readers that open the output directory with pyarrow/pandas/DuckDB see
only ``part-*.parquet``: names starting with ``_`` or ``.`` are ignored by convention.
"""

from __future__ import annotations

import io
import json
import re
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow.parquet as pq

from pipeline import storage
from pipeline.schema import STATUS_OK, make_table

MANIFEST_DIR = "_manifest"
RUNS_DIR = "_runs"
PART_PREFIX = "part-"
COMMITTED = "committed"
FAILED = "failed"
TOP_ERRORS = 5


DATE_PLACEHOLDER = "{date}"
_DATE_RE = r"\d{4}-\d{2}-\d{2}"


def resolve_output(template: str, date: str) -> str:
    """An output URL with its ``{date}`` placeholder (if any) replaced by ``date`` (YYYY-MM-DD)."""
    if not re.fullmatch(_DATE_RE, date):
        raise ValueError(f"the date for {DATE_PLACEHOLDER} must be YYYY-MM-DD, got {date!r}")
    check_output_template(template)
    return template.replace(DATE_PLACEHOLDER, date)


def check_output_template(template: str) -> None:
    """Only ``{date}``, at most once, may appear in braces (nothing else is substituted)."""
    rest = template.replace(DATE_PLACEHOLDER, "", 1)
    if template.count(DATE_PLACEHOLDER) > 1 or "{" in rest or "}" in rest:
        raise ValueError(f"output URL {template!r}: the only placeholder is {DATE_PLACEHOLDER}, once "
                         "(e.g. s3://bucket/annotations/dt={date})")


def dated_outputs(template: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Existing outputs of a ``{date}`` template: {date: url}, found with one listing of the
    folder that holds the dated segment (so nightly runs can skip shards done on earlier nights)."""
    check_output_template(template)
    if DATE_PLACEHOLDER not in template:
        return {}
    head, tail = template.split(DATE_PLACEHOLDER, 1)
    base, _, prefix = head.rpartition("/")
    suffix, _, rest = tail.partition("/")
    pattern = re.compile(re.escape(prefix) + f"({_DATE_RE})" + re.escape(suffix))
    try:
        fs, root = storage.open_fs(base or ".", storage_options)
        fs.invalidate_cache()
        names = [n.rstrip("/").rsplit("/", 1)[-1] for n in fs.ls(root, detail=False)]
    except FileNotFoundError:
        return {}
    out = {}
    for name in names:
        m = pattern.fullmatch(name)
        if m:
            out[m.group(1)] = storage.join(f"{base}/{name}" if base else name, rest)
    return dict(sorted(out.items()))


def part_name(shard_id: str) -> str:
    """The output file name of a shard (deterministic: same shard, same name, every run)."""
    if not shard_id or "/" in shard_id or shard_id.startswith("."):
        raise ValueError(f"shard id {shard_id!r} cannot be used in a file name")
    return f"{PART_PREFIX}{shard_id}.parquet"


def top_errors(errors: Iterable[str | None], n: int = TOP_ERRORS) -> list[list[Any]]:
    """The ``n`` most frequent error messages as [message, count] (messages cut to 200 chars)."""
    counts = Counter(e[:200] for e in errors if e)
    return [[msg, count] for msg, count in counts.most_common(n)]


@dataclass
class ShardRecord:
    """The manifest record of one processed shard."""

    shard_id: str
    status: str  # COMMITTED | FAILED
    file: str | None = None  # part file name relative to the output, None for a failed shard
    rows: int = 0
    ok_rows: int = 0
    failed_rows: int = 0
    error: str | None = None  # why the whole shard failed (ShardReadError), else None
    top_errors: list = field(default_factory=list)
    stats: dict = field(default_factory=dict)  # images, decode_s, model_s, write_s, images_per_s, ...
    run_id: str | None = None
    committed_at: float | None = None
    config_fingerprint: str | None = None
    inputs: list = field(default_factory=list)
    spec_fingerprint: str | None = None  # the shard's content list when committed (ShardSpec.fingerprint)

    @property
    def needs_retry(self) -> bool:
        """True for a failed shard or a committed one with failed rows (``--retry-failed``)."""
        return self.status == FAILED or self.failed_rows > 0

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ShardRecord:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


class OutputStore:
    """The output location: committed shards, manifest records and run reports."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None):
        self.url = url
        try:
            self.fs, self.root = storage.open_fs(url, storage_options)
        except (OSError, ValueError, ImportError) as e:
            raise ValueError(f"output {url!r} cannot be opened: {type(e).__name__}: {e}") from e

    def path(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    # ---------------------------------------------------------------- reading state

    def _list(self, sub: str, suffix: str) -> list[str]:
        self.fs.invalidate_cache()
        directory = self.path(sub) if sub else self.root
        try:
            names = self.fs.ls(directory, detail=False)
        except FileNotFoundError:
            return []
        base = [n.rstrip("/").rsplit("/", 1)[-1] for n in names]
        return sorted(b for b in base if b.endswith(suffix) and not b.startswith("."))

    def committed_ids(self) -> set[str]:
        """Shard ids that have a manifest record (committed or failed): one listing, no reads."""
        return {name[: -len(".json")] for name in self._list(MANIFEST_DIR, ".json")}

    def records(self, shard_ids: Iterable[str] | None = None) -> dict[str, ShardRecord]:
        """Manifest records (all, or those of ``shard_ids``), fetched in one batched call."""
        ids = sorted(self.committed_ids() if shard_ids is None else set(shard_ids) & self.committed_ids())
        if not ids:
            return {}
        paths = {self.path(MANIFEST_DIR, f"{sid}.json"): sid for sid in ids}
        blobs = self.fs.cat(list(paths))
        if not isinstance(blobs, dict):  # a single path returns bytes
            blobs = {next(iter(paths)): blobs}
        out = {}
        for path, blob in blobs.items():
            sid = paths.get(path) or paths.get(self.fs._strip_protocol(path)) or path.rsplit("/", 1)[-1][:-5]
            out[sid] = ShardRecord.from_json(json.loads(blob))
        return out

    def part_files(self) -> list[str]:
        return [n for n in self._list("", ".parquet") if n.startswith(PART_PREFIX)]

    # ---------------------------------------------------------------- writing

    def commit_shard(self, shard_id: str, rows: Sequence[Mapping[str, Any]], lineage: Mapping[str, Any],
                     stats: Mapping[str, Any], *, run_id: str, fingerprint: str | None = None,
                     inputs: Sequence[str] = (), spec_fingerprint: str | None = None) -> ShardRecord:
        """Write the shard's Parquet atomically, then its manifest record. Returns the record."""
        start = time.perf_counter()
        rows = sorted(rows, key=lambda r: r["key"])
        table = make_table(rows, {**lineage, "shard": shard_id})
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        name = part_name(shard_id)
        storage.write_bytes_atomic(self.fs, self.path(name), buf.getvalue())
        write_s = time.perf_counter() - start
        failed = [r for r in rows if r["status"] != STATUS_OK]
        record = ShardRecord(
            shard_id=shard_id, status=COMMITTED, file=name, rows=len(rows), ok_rows=len(rows) - len(failed),
            failed_rows=len(failed),
            top_errors=top_errors(f"{r['status']}: {r.get('error')}" for r in failed),
            stats={**stats, "write_s": round(write_s, 4), "bytes": buf.tell()}, run_id=run_id,
            committed_at=time.time(), config_fingerprint=fingerprint, inputs=list(inputs),
            spec_fingerprint=spec_fingerprint)
        self._write_record(record)
        return record

    def record_failed(self, shard_id: str, error: str, stats: Mapping[str, Any], *, run_id: str,
                      fingerprint: str | None = None, inputs: Sequence[str] = (),
                      spec_fingerprint: str | None = None) -> ShardRecord:
        """Record a shard that could not be read at all (no Parquet file is written)."""
        record = ShardRecord(shard_id=shard_id, status=FAILED, error=error, stats=dict(stats), run_id=run_id,
                             committed_at=time.time(), config_fingerprint=fingerprint, inputs=list(inputs),
                             top_errors=top_errors([error]), spec_fingerprint=spec_fingerprint)
        self._write_record(record)
        return record

    def _write_record(self, record: ShardRecord) -> None:
        data = json.dumps(asdict(record), sort_keys=True, default=str).encode()
        storage.write_bytes_atomic(self.fs, self.path(MANIFEST_DIR, f"{record.shard_id}.json"), data)

    def reset(self) -> dict[str, int]:
        """``--overwrite``: forget every committed shard, records first, then part files.

        Only files this job owns are removed (``_manifest/*.json`` and ``part-*.parquet``);
        anything else under the output is left alone. Records go first so that a crash in the
        middle leaves "not committed" shards (re-done by the next run), never a record
        pointing at a removed file.
        """
        records = [self.path(MANIFEST_DIR, n) for n in self._list(MANIFEST_DIR, ".json")]
        parts = [self.path(n) for n in self.part_files()]
        for path in records + parts:
            self.fs.rm_file(path)
        self.fs.invalidate_cache()
        return {"records": len(records), "parts": len(parts)}

    def write_report(self, run_id: str, report: Mapping[str, Any]) -> str:
        """Write the run report JSON to ``_runs/<run_id>.json``; returns its URL."""
        data = json.dumps(report, indent=2, sort_keys=True, default=str).encode()
        storage.write_bytes_atomic(self.fs, self.path(RUNS_DIR, f"{run_id}.json"), data)
        return storage.join(self.url, RUNS_DIR, f"{run_id}.json")

    def interrupted_runs(self, limit: int = 20) -> list[dict]:
        """Reports of the latest runs that never finished their shards, newest first, up to the last
        run that did: still ``status: running`` (the driver was killed or its node lost) or ended
        with ``status: error`` (a stall, a crash in the driver)."""
        names = self._list(RUNS_DIR, ".json")[::-1][:limit]  # run ids start with a UTC timestamp
        out = []
        for name in names:
            try:
                report = json.loads(self.fs.cat(self.path(RUNS_DIR, name)))
            except (OSError, ValueError):
                continue
            if report.get("status") not in ("running", "error"):
                break
            out.append(report)
        return out


@dataclass
class Selection:
    """Which shards a run processes and why the others are skipped.

    ``targets`` maps a shard to the store it must be written to when that is not the run's
    own output: a shard committed on an earlier night (dated outputs) is re-done in place so
    each image stays in exactly one dated prefix.
    """

    pending: list  # ShardSpec-like objects (with .shard_id), in input order
    skipped_committed: int = 0
    retried: int = 0
    changed: int = 0
    reset: dict | None = None
    skipped_earlier: int = 0  # of skipped_committed: committed in an earlier dated output
    retried_ids: list = field(default_factory=list)
    changed_ids: list = field(default_factory=list)
    # skipped shards an earlier run recorded as failed (redone only with retry_failed), and the
    # failed images inside skipped committed shards: the output is still missing them
    earlier_failed_ids: list = field(default_factory=list)
    earlier_failed_rows: int = 0
    targets: dict = field(default_factory=dict)


def _fingerprint(spec: Any) -> str | None:
    fingerprint = getattr(spec, "fingerprint", None)
    return fingerprint() if callable(fingerprint) else None


def select_shards(specs: Sequence[Any], store: OutputStore, *, overwrite: bool = False,
                  retry_failed: bool = False, history: Sequence[OutputStore] = ()) -> Selection:
    """Resume logic. Default: shards without a manifest record, plus committed shards whose
    content list changed since (a grouped prefix that gained files: same id, new fingerprint).
    ``retry_failed``: also shards whose record is failed or has failed rows. ``overwrite``:
    reset, then all shards. ``history``: earlier dated outputs of the same template, oldest
    first; a shard recorded there counts as done (the newest record wins, the run's own last).
    """
    if overwrite:
        return Selection(pending=list(specs), reset=store.reset())
    wanted = {s.shard_id for s in specs}
    owner: dict[str, OutputStore] = {}
    records: dict[str, ShardRecord] = {}
    for st in [*history, store]:
        done = st.committed_ids() & wanted
        if done:
            for sid, rec in st.records(done).items():
                records[sid], owner[sid] = rec, st
    changed = {s.shard_id for s in specs if s.shard_id in records and records[s.shard_id].spec_fingerprint
               and _fingerprint(s) and records[s.shard_id].spec_fingerprint != _fingerprint(s)}
    retry = {sid for sid, rec in records.items() if rec.needs_retry} - changed if retry_failed else set()
    redo = changed | retry
    pending = [s for s in specs if s.shard_id not in records or s.shard_id in redo]
    skipped = set(records) - redo
    return Selection(pending=pending, skipped_committed=len(skipped), retried=len(retry),
                     changed=len(changed), skipped_earlier=sum(owner[sid] is not store for sid in skipped),
                     retried_ids=sorted(retry), changed_ids=sorted(changed),
                     earlier_failed_ids=sorted(sid for sid in skipped if records[sid].status == FAILED),
                     earlier_failed_rows=sum(records[sid].failed_rows for sid in skipped
                                             if records[sid].status != FAILED),
                     targets={sid: owner[sid] for sid in redo if owner[sid] is not store})
