"""The annotate job's Ray Data plan, run on the driver: shards in, committed Parquet out.

Plan (one direction)::

    pending ShardSpecs (from_items, one block per shard)
      -> read_and_decode   Ray tasks, fractional CPUs: read the shard's members, decode each
                           image with its own try/except (status/error per row), emit rows in
                           blocks bounded by image count and decoded bytes, then one END
                           marker row carrying the shard's member count (or its read error)
      -> InferenceBundle   actor pool ActorPoolStrategy(min_size=1, max_size=k), k and the
                           actor CPUs computed from the cluster so a read task always fits
      -> iter_batches      on the driver: rows grouped per shard; a shard is committed
                           (pipeline.commit) the moment its END marker and all its rows are in

Only complete shards are committed, so a killed driver loses at most the shards in
flight. ``DataContext.execution_no_progress_timeout_s`` is set from the config so a stall
becomes an error naming the stuck operator (``MapBatches(read_and_decode)`` or
``MapBatches(InferenceBundle)``). Progress lines go to stderr; a run report JSON goes to
``<output>/_runs/<run_id>.json``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import re
import sys
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO

import pyarrow as pa

from pipeline.bundle import MODEL_S, MODEL_T1, THREADS, WARMUP, InferenceBundle, TaskSpec, draft_size_for
from pipeline.commit import (
    COMMITTED,
    DATE_PLACEHOLDER,
    OutputStore,
    ShardRecord,
    dated_outputs,
    select_shards,
    top_errors,
)
from pipeline.schema import SCHEMA_VERSION, STATUS_DECODE_ERROR, STATUS_OK, STATUS_READ_ERROR

END, TOTAL, SHARD_ERROR, DECODE_S = "_end", "_shard_total", "_shard_error", "_decode_s"

# Rows between the read stage and the bundle (schema-v1 identity columns + internal ones).
STREAM_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("key", pa.string()), ("source_uri", pa.string()), ("shard", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()), ("status", pa.string()), ("error", pa.string()),
    ("_pixels", pa.binary()), ("_pix_h", pa.int32()), ("_pix_w", pa.int32()),
    (DECODE_S, pa.float64()), (END, pa.bool_()), (TOTAL, pa.int64()), (SHARD_ERROR, pa.string()),
])


class RunError(RuntimeError):
    """The run stopped before finishing (stall, cluster problem); the message says where and why."""


# --------------------------------------------------------------------------- job + sizing


@dataclass
class AnnotateJob:
    """Everything one annotate run needs, as plain values (built by jobs.annotate from the config)."""

    input: str
    output: str
    tasks: list[TaskSpec]
    input_options: dict = field(default_factory=dict)
    output_options: dict = field(default_factory=dict)
    weights_options: dict = field(default_factory=dict)
    manifest: str | None = None
    image_column: str | None = None
    key_column: str | None = None
    images_per_shard: int = 256
    max_images: int | None = None
    max_pixels: int = 89_478_485
    draft_decode: bool = True
    batch_max_images: int = 16
    batch_max_decoded_bytes: int = 64 << 20
    actor_num_cpus: float | None = None
    max_actors: int | None = None
    read_num_cpus: float = 0.25
    max_read_tasks: int | None = None
    no_progress_timeout_s: float = 600.0
    progress_interval_s: float = 5.0
    ray_progress_bars: bool = False
    seed: int = 0
    overwrite: bool = False
    retry_failed: bool = False
    config: dict = field(default_factory=dict)  # redacted config, for the report
    run_id: str | None = None
    # The output URL as given, when it holds ``{date}`` (``output`` is then the resolved one):
    # shards committed under earlier dates are skipped, so nightly dated runs stay incremental.
    output_template: str | None = None
    date: str | None = None


@dataclass
class PoolPlan:
    """How the cluster's CPUs are split between the actor pool and read tasks."""

    cluster_cpus: float
    actor_cpus: float
    max_actors: int
    threads: int
    read_cpus: float
    max_read_tasks: int
    notes: list = field(default_factory=list)


def plan_pool(cluster_cpus: float, *, actor_cpus: float | None = None, max_actors: int | None = None,
              read_cpus: float = 0.25, max_read_tasks: int | None = None,
              largest_node_cpus: float | None = None) -> PoolPlan:
    """Size the actor pool so that ``max_actors * actor_cpus + read_cpus <= cluster_cpus``.

    Ray Data starts actors before read tasks; a pool holding every CPU would leave the reads
    pending forever. Defaults: 1 CPU per actor (less on a 1-CPU cluster), as many actors as
    fit next to one read task. Torch threads per actor = floor(actor CPUs), at least 1.
    """
    notes = []
    if cluster_cpus <= read_cpus:
        raise RunError(f"the Ray cluster has {cluster_cpus} CPUs, not more than the {read_cpus} one read "
                       "task needs; start Ray with more CPUs or lower actors.read_num_cpus")
    room = cluster_cpus - read_cpus
    node_cap = largest_node_cpus if largest_node_cpus else cluster_cpus
    a = actor_cpus if actor_cpus else min(1.0, room, node_cap)
    if a > room or a > node_cap:
        fit = min(room, node_cap)
        notes.append(f"actors.num_cpus={a} does not fit (cluster {cluster_cpus} CPUs, largest node "
                     f"{node_cap}, {read_cpus} kept for reads); using {fit:g}")
        a = fit
    fit_count = max(1, math.floor(room / a + 1e-9))
    k = min(max_actors, fit_count) if max_actors else fit_count
    if max_actors and max_actors > fit_count:
        notes.append(f"actors.max_actors={max_actors} would starve the read tasks; using {fit_count}")
    reads = max_read_tasks or max(1, math.ceil(cluster_cpus))
    return PoolPlan(cluster_cpus=cluster_cpus, actor_cpus=round(a, 4), max_actors=k,
                    threads=max(1, math.floor(a + 1e-9)), read_cpus=read_cpus, max_read_tasks=reads,
                    notes=notes)


def cluster_plan(job: AnnotateJob) -> PoolPlan:
    """``plan_pool`` from the connected Ray cluster's resources."""
    import ray

    cpus = float(ray.cluster_resources().get("CPU", 0.0))
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    largest = max((float(n.get("Resources", {}).get("CPU", 0.0)) for n in nodes), default=cpus)
    return plan_pool(cpus, actor_cpus=job.actor_num_cpus, max_actors=job.max_actors,
                     read_cpus=job.read_num_cpus, max_read_tasks=job.max_read_tasks,
                     largest_node_cpus=largest or None)


# --------------------------------------------------------------------------- credentials

_SECRET_KEY = re.compile(r"key|secret|token|password|passwd|credential|session|auth|signature", re.I)
_NOT_SECRET_ENV = re.compile(r"(PATH|_MODE|_SOCK|_ID|_TYPE|_FILE|_DIR|_REGION|_URL|_ENDPOINT)$", re.I)
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/@\s:]+):(?P<pw>[^/@\s]+)@")
_QUERY_SECRET = re.compile(r"(?P<name>[?&][^=&#\s]*(?:signature|token|credential|secret|key)[^=&#\s]*=)"
                           r"(?P<value>[^&#\s]+)", re.I)


class Redactor:
    """Removes credentials from everything the run writes or prints (logs, reports, Parquet).

    Secrets are the values of credential-like storage options (``key``, ``secret``, ``token``, ...
    at any depth) and of credential-like environment variables (AWS_SECRET_ACCESS_KEY,
    AWS_SESSION_TOKEN, RAY_AUTH_TOKEN, ...), plus passwords in ``scheme://user:pass@host`` URLs
    and signature/token query parameters (presigned URLs).
    """

    MIN_LEN = 6  # shorter values would blank out ordinary words

    def __init__(self, options: Iterable[Mapping[str, Any] | None] = (),
                 environ: Mapping[str, str] | None = None):
        secrets: set[str] = set()
        for opts in options:
            _collect_secrets(opts or {}, secrets)
        env = os.environ if environ is None else environ
        for name, value in env.items():
            if (_SECRET_KEY.search(name) and not _NOT_SECRET_ENV.search(name)
                    and not (value.isalpha() and value.islower())):  # settings such as "disabled"
                secrets.add(value)
        self.secrets = sorted((v for v in secrets if isinstance(v, str) and len(v) >= self.MIN_LEN),
                              key=len, reverse=True)

    def text(self, value: str) -> str:
        value = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", value)
        value = _QUERY_SECRET.sub(lambda m: f"{m['name']}***", value)
        for secret in self.secrets:
            if secret in value:
                value = value.replace(secret, "***")
        return value

    def __call__(self, obj: Any) -> Any:
        """``obj`` with every string (and mapping key) redacted, recursively."""
        if isinstance(obj, str):
            return self.text(obj)
        if isinstance(obj, Mapping):
            return {self(k) if isinstance(k, str) else k: self(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [self(v) for v in obj]
        return obj


def _collect_secrets(options: Mapping[str, Any], out: set[str]) -> None:
    for k, v in options.items():
        if isinstance(v, Mapping):
            _collect_secrets(v, out)
        elif _SECRET_KEY.search(str(k)) and isinstance(v, str):
            out.add(v)


class _RedactingWriter:
    """A text stream that redacts what is written to it (the run's progress and log lines)."""

    def __init__(self, out: TextIO, redact: Redactor):
        self.out, self.redact = out, redact

    def write(self, text: str) -> int:
        return self.out.write(self.redact.text(text))

    def flush(self) -> None:
        self.out.flush()


# --------------------------------------------------------------------------- read + decode stage


def _table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=STREAM_SCHEMA)


def read_and_decode(batch: pa.Table, *, storage_options: Mapping[str, Any] | None, max_pixels: int,
                    draft_size: int | None, chunk_images: int, chunk_bytes: int) -> Iterator[pa.Table]:
    """Ray Data task: each input row is a pickled ShardSpec; yields decoded rows, then an END marker.

    Nothing here raises for bad data: unreadable members become ``read_error`` rows, bad
    images ``decode_error`` rows, and a shard that cannot be read at all ends with a marker
    carrying its error (the driver records it as a failed shard).
    """
    from pipeline.decode import DecodeError, decode_image
    from pipeline.sources import ShardReadError, read_shard

    for blob in batch.column("spec").to_pylist():
        spec = pickle.loads(blob)
        rows: list[dict] = []
        size = 0
        count = 0
        shard_error = None
        try:
            for member in read_shard(spec, storage_options=storage_options):
                count += 1
                row = {"image_id": f"{spec.shard_id}/{member.key}", "key": member.key,
                       "source_uri": member.source_uri, "shard": spec.shard_id, END: False}
                start = time.perf_counter()
                if member.error is not None or member.data is None:
                    row.update(status=STATUS_READ_ERROR, error=member.error or "member could not be read")
                else:
                    try:
                        decoded = decode_image(member.data, max_pixels=max_pixels, draft_size=draft_size)
                        arr = decoded.array
                        row.update(status=STATUS_OK, width=decoded.width, height=decoded.height,
                                   _pixels=arr.tobytes(), _pix_h=arr.shape[0], _pix_w=arr.shape[1])
                        size += arr.nbytes
                    except DecodeError as e:
                        row.update(status=STATUS_DECODE_ERROR, error=str(e))
                    except Exception as e:  # noqa: BLE001 - a decoder bug must not fail the shard
                        row.update(status=STATUS_DECODE_ERROR, error=f"{type(e).__name__}: {e}")
                row[DECODE_S] = time.perf_counter() - start
                rows.append(row)
                if len(rows) >= chunk_images or size >= chunk_bytes:
                    yield _table(rows)
                    rows, size = [], 0
        except ShardReadError as e:
            shard_error = str(e)
        except Exception as e:  # noqa: BLE001 - an unexpected reader failure fails this shard only
            shard_error = f"{type(e).__name__}: {e}"
        rows.append({"image_id": f"{spec.shard_id}/", "key": "", "source_uri": "", "shard": spec.shard_id,
                     "status": STATUS_OK, END: True, TOTAL: count, SHARD_ERROR: shard_error})
        yield _table(rows)


# --------------------------------------------------------------------------- driver-side bookkeeping


@dataclass
class _ShardState:
    rows: list = field(default_factory=list)
    seen: set = field(default_factory=set)  # image ids, so a retried read task cannot duplicate rows
    expected: int | None = None
    error: str | None = None
    ended: bool = False
    decode_s: float = 0.0
    model_s: float = 0.0
    redone: int = 0  # rows that arrived twice (a read task or actor call retried by Ray), dropped
    first_seen: float = field(default_factory=time.monotonic)

    def complete(self) -> bool:
        return self.ended and (self.error is not None or len(self.rows) >= (self.expected or 0))


class Progress:
    """Counts and live progress lines for one run."""

    def __init__(self, total_shards: int, interval_s: float, out: TextIO | None = None):
        self.total_shards = total_shards
        self.interval_s = interval_s
        self.out = out if out is not None else sys.stderr
        self.start = time.monotonic()
        self.last = 0.0
        self.shards_done = self.shards_failed = 0
        self.images = self.image_failures = 0

    def add(self, record: ShardRecord) -> None:
        self.shards_done += 1
        if record.status != COMMITTED:
            self.shards_failed += 1
        self.images += record.rows
        self.image_failures += record.failed_rows

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def line(self) -> str:
        rate = self.images / self.elapsed if self.elapsed > 0 else 0.0
        return (f"[annotate] shards {self.shards_done}/{self.total_shards} "
                f"({self.shards_failed} failed) | images {self.images} ({self.image_failures} failed) | "
                f"{rate:.1f} img/s | {self.elapsed:.0f}s")

    def tick(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last >= self.interval_s:
            self.last = now
            print(self.line(), file=self.out, flush=True)


def code_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("mnv3-pipeline")
    except metadata.PackageNotFoundError:
        return "unknown"


def new_run_id() -> str:
    """UTC start time to the millisecond, then a random suffix: run ids sort in start order (the
    next run finds the latest reports by name), also for runs that start in the same second."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%f")[:-3] + "Z-" + uuid.uuid4().hex[:6]


def lineage(job: AnnotateJob, run_id: str, draft_size: int | None) -> dict[str, Any]:
    """What every output file records about how it was made (invariant 6). No storage options."""
    models = [spec.lineage() for spec in job.tasks]
    decode = {"max_pixels": job.max_pixels, "draft_decode": job.draft_decode, "draft_size": draft_size}
    fingerprint = hashlib.sha256(json.dumps({"models": models, "decode": decode}, sort_keys=True,
                                            default=str).encode()).hexdigest()[:16]
    return {"run_id": run_id, "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "code_version": code_version(), "schema_version": SCHEMA_VERSION, "input": job.input,
            "models": models, "decode": decode, "config_fingerprint": fingerprint}


# --------------------------------------------------------------------------- the run


def run_annotate(job: AnnotateJob, *, out: TextIO | None = None) -> dict[str, Any]:
    """Run the job on the connected Ray cluster; returns the run report (also written to storage).

    Raises RunError when the run cannot finish (stall past the no-progress timeout, ...);
    the report is written in that case too, with ``status`` = "error". A report with
    ``status`` = "running" is written first, so the next run can tell which shards an
    interrupted run (killed driver, lost head node) left unfinished.
    """
    import ray
    from ray.data import ActorPoolStrategy, DataContext, TaskPoolStrategy
    from ray.data.exceptions import ExecutionTimeoutError

    from pipeline.sources import list_shards

    redact = Redactor([job.input_options, job.output_options, job.weights_options])
    out = _RedactingWriter(out if out is not None else sys.stderr, redact)
    run_id = job.run_id or new_run_id()
    started = time.time()
    store = OutputStore(job.output, job.output_options)
    history = _history(job)
    exclude = [job.output]
    if job.output_template:
        exclude.append(job.output_template.split(DATE_PLACEHOLDER, 1)[0])
    specs = list_shards(job.input, storage_options=job.input_options, manifest=job.manifest,
                        images_per_shard=job.images_per_shard, image_column=job.image_column,
                        key_column=job.key_column, exclude=exclude)
    selection = select_shards(specs, store, overwrite=job.overwrite, retry_failed=job.retry_failed,
                              history=history)
    pending = selection.pending
    if job.max_images:
        pending = _take_until(pending, job.max_images)
    interrupted = _interrupted(store, {s.shard_id for s in pending})
    draft_size = draft_size_for(job.tasks) if job.draft_decode else None
    meta = redact(lineage(job, run_id, draft_size))
    plan = cluster_plan(job)
    for note in plan.notes:
        print(f"[annotate] note: {note}", file=out)
    print(f"[annotate] run {run_id}: {len(specs)} shards listed, {selection.skipped_committed} already "
          f"committed" + (f" ({selection.skipped_earlier} under earlier dates)" if history else "")
          + f", {len(pending)} to process ({selection.retried} retried, {selection.changed} changed "
          "since committed"
          + (f", {len(interrupted['shards'])} left unfinished by interrupted run(s) "
             f"{', '.join(interrupted['runs'])}" if interrupted["shards"] else "") + ")"
          + (f"; overwrite removed {selection.reset}" if selection.reset else ""), file=out)
    print(f"[annotate] pool: up to {plan.max_actors} actor(s) x {plan.actor_cpus:g} CPU ({plan.threads} "
          f"torch thread(s)), read tasks {plan.read_cpus:g} CPU x {plan.max_read_tasks}, cluster "
          f"{plan.cluster_cpus:g} CPUs", file=out)

    progress = Progress(len(pending), job.progress_interval_s, out)
    run = _RunState(records=[], states={}, done=set(), threads=set(), interrupted=interrupted)
    status, error = "ok", None
    inputs = {s.shard_id: list(s.uris) for s in pending}
    spec_prints = {s.shard_id: _spec_fingerprint(s) for s in pending}
    targets = {s.shard_id: selection.targets.get(s.shard_id, store) for s in pending}

    def report_now(state: str, err: str | None) -> dict[str, Any]:
        return redact(_report(job, run_id, started, plan, selection, specs, pending, run, state, err, meta,
                              progress))

    try:
        store.write_report(run_id, report_now("running", None))
    except Exception as e:  # noqa: BLE001 - an unwritable output fails the run below, with its own error
        print(f"[annotate] could not write the run report: {type(e).__name__}: {e}", file=out)
    try:
        if pending:
            ctx = DataContext.get_current()
            ctx.execution_no_progress_timeout_s = float(job.no_progress_timeout_s)
            ctx.enable_progress_bars = bool(job.ray_progress_bars)
            ds = ray.data.from_items([{"shard_id": s.shard_id, "spec": pickle.dumps(s)} for s in pending],
                                     override_num_blocks=len(pending))
            ds = ds.map_batches(
                read_and_decode, batch_size=1, batch_format="pyarrow", num_cpus=plan.read_cpus,
                compute=TaskPoolStrategy(size=plan.max_read_tasks),
                fn_kwargs={"storage_options": job.input_options, "max_pixels": job.max_pixels,
                           "draft_size": draft_size, "chunk_images": job.batch_max_images,
                           "chunk_bytes": job.batch_max_decoded_bytes})
            ds = ds.map_batches(
                InferenceBundle, batch_size=job.batch_max_images, batch_format="pyarrow",
                num_cpus=plan.actor_cpus,
                compute=ActorPoolStrategy(min_size=1, max_size=plan.max_actors),
                fn_constructor_kwargs={"tasks": job.tasks, "num_threads": plan.threads,
                                       "max_images": job.batch_max_images,
                                       "max_decoded_bytes": job.batch_max_decoded_bytes,
                                       "storage_options": job.weights_options, "seed": job.seed})
            progress.tick(force=True)
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                for shard_id in _absorb(batch, run):
                    if job.max_images and progress.images >= job.max_images:
                        break  # the limit was reached by an earlier shard of this block
                    record = _commit(targets[shard_id], shard_id, run.states.pop(shard_id), meta, run_id,
                                     inputs[shard_id], spec_prints[shard_id], redact)
                    run.records.append(record)
                    run.done.add(shard_id)
                    progress.add(record)
                    progress.tick(force=True)
                if job.max_images and progress.images >= job.max_images:
                    print(f"[annotate] --max-images {job.max_images} reached; stopping (in-flight shards are "
                          "not committed and will be processed by the next run)", file=out)
                    break
                progress.tick()
            leftover = [sid for sid, st in run.states.items() if st.rows or st.ended]
            if leftover and not (job.max_images and progress.images >= job.max_images):
                raise RunError(f"the stream ended with incomplete shards {leftover[:5]}: rows were lost "
                               "between stages; re-run to process them")
    except ExecutionTimeoutError as e:
        status, error = "error", (f"stalled: no data moved for {job.no_progress_timeout_s:g}s "
                                  f"(run.no_progress_timeout_s). Ray Data says:\n{e}")
        raise RunError(redact.text(error)) from None
    except BaseException as e:
        status, error = "error", f"{type(e).__name__}: {e}"
        raise
    finally:
        report = report_now(status, error)
        try:
            report["report_url"] = store.write_report(run_id, report)
        except Exception as e:  # noqa: BLE001 - the report must not hide the run's own error
            print(f"[annotate] could not write the run report: {e}", file=out)
        if status == "ok":
            progress.tick(force=True)
            print(summary_table(report), file=out)
    return report


def _history(job: AnnotateJob) -> list[OutputStore]:
    """Earlier dated outputs of the job's ``{date}`` template (oldest first), not the run's own."""
    if not job.output_template:
        return []
    found = dated_outputs(job.output_template, job.output_options)
    return [OutputStore(url, job.output_options) for date, url in found.items()
            if date != job.date and (job.date is None or date < job.date)]


def _take_until(specs: Sequence[Any], max_images: int) -> list[Any]:
    """``--max-images``: pending shards in order until their image count reaches ``max_images``.

    Whole shards only (a shard is the unit of commit). Shards whose size is unknown before
    reading (tar files) count as one image, so enough are scheduled; the run stops reading once
    ``max_images`` rows are committed.
    """
    taken, total = [], 0
    for spec in specs:
        if total >= max_images:
            break
        taken.append(spec)
        total += _known_size(spec)
    return taken


def _known_size(spec: Any) -> int:
    if getattr(spec, "kind", None) in ("files", "uris"):
        return max(1, len(spec.uris))
    return 1


def _interrupted(store: OutputStore, pending: set[str]) -> dict[str, Any]:
    """Shards this run re-does because an earlier run of the same output stopped before them."""
    runs, shards = [], set()
    for report in store.interrupted_runs():
        left = set(report.get("shards", {}).get("pending_ids", [])) & pending
        if left:
            runs.append(report.get("run_id"))
            shards |= left
    return {"runs": runs, "shards": sorted(shards)}


@dataclass
class _RunState:
    records: list
    states: dict
    done: set  # shards committed in this run: late duplicates of their rows are dropped
    threads: set  # torch threads seen in the actors
    interrupted: dict
    redone: dict = field(default_factory=dict)  # shard -> rows that arrived twice
    warm_t: float | None = None  # wall clock when the first actor finished its warm-up call
    steady_rows: int = 0  # rows annotated after an actor's warm-up call, and their model seconds
    steady_model_s: float = 0.0


def _absorb(batch: pa.Table, run: _RunState) -> list[str]:
    """Add one output block to the per-shard state; returns shards that just became complete.

    Rows can arrive twice when Ray retries a read task or an actor call (a lost node, a
    crashed worker): duplicates are dropped by image id (also after the shard's commit) and
    counted as redone.
    """
    touched = set()
    states = run.states
    for row in batch.to_pylist():
        shard_id = row["shard"]
        if row.get(THREADS) is not None:
            run.threads.add(int(row[THREADS]))
        if row.get(WARMUP) and row.get(MODEL_T1) is not None:
            run.warm_t = min(run.warm_t or math.inf, float(row[MODEL_T1]))
        if shard_id in run.done:
            if not row.get(END):
                run.redone[shard_id] = run.redone.get(shard_id, 0) + 1
            continue
        st = states.setdefault(shard_id, _ShardState())
        touched.add(shard_id)
        if row.get(END):
            st.ended, st.expected, st.error = True, int(row.get(TOTAL) or 0), row.get(SHARD_ERROR)
            continue
        if row["image_id"] in st.seen:
            st.redone += 1
            run.redone[shard_id] = run.redone.get(shard_id, 0) + 1
            continue
        st.seen.add(row["image_id"])
        st.decode_s += float(row.pop(DECODE_S, 0.0) or 0.0)
        seconds = float(row.pop(MODEL_S, 0.0) or 0.0)
        st.model_s += seconds
        if row.get(WARMUP) is False:
            run.steady_rows += 1
            run.steady_model_s += seconds
        st.rows.append({k: v for k, v in row.items() if not k.startswith("_")})
    return sorted(sid for sid in touched if states[sid].complete())


def _spec_fingerprint(spec: Any) -> str | None:
    fingerprint = getattr(spec, "fingerprint", None)
    return fingerprint() if callable(fingerprint) else None


def _commit(store: OutputStore, shard_id: str, st: _ShardState, meta: Mapping[str, Any], run_id: str,
            inputs: Sequence[str], spec_print: str | None, redact: Redactor) -> ShardRecord:
    stats = {"images": len(st.rows), "decode_s": round(st.decode_s, 4), "model_s": round(st.model_s, 4),
             "wall_s": round(time.monotonic() - st.first_seen, 4), "rows_redone": st.redone}
    inputs = redact(list(inputs))
    if st.error is not None:
        return store.record_failed(shard_id, redact.text(st.error), stats, run_id=run_id,
                                   fingerprint=meta["config_fingerprint"], inputs=inputs,
                                   spec_fingerprint=spec_print)
    for row in st.rows:
        for col in ("error", "source_uri"):
            if row.get(col):
                row[col] = redact.text(row[col])
    record = store.commit_shard(shard_id, st.rows, meta, stats, run_id=run_id,
                                fingerprint=meta["config_fingerprint"], inputs=inputs,
                                spec_fingerprint=spec_print)
    busy = record.stats["decode_s"] + record.stats["model_s"] + record.stats["write_s"]
    record.stats["images_per_s"] = round(record.rows / busy, 2) if busy > 0 else None
    return record


def _report(job: AnnotateJob, run_id: str, started: float, plan: PoolPlan, selection: Any,
            specs: Sequence[Any], pending: Sequence[Any], run: _RunState, status: str, error: str | None,
            meta: Mapping[str, Any], progress: Progress) -> dict[str, Any]:
    records = run.records
    wall = time.time() - started
    failed_shards = [r for r in records if r.status != COMMITTED]
    if status == "ok" and failed_shards:
        status = "some_shards_failed"
    images = sum(r.rows for r in records)
    model_s = sum(r.stats.get("model_s", 0.0) for r in records)
    decode_s = sum(r.stats.get("decode_s", 0.0) for r in records)
    commits = sorted(r.committed_at for r in records if r.committed_at)
    steady = window = model_only = overhead = None
    actors = max(1, min(plan.max_actors, len(pending)))
    if commits and run.warm_t is not None and commits[-1] > run.warm_t and run.steady_model_s > 0:
        window = commits[-1] - run.warm_t
        steady = round(run.steady_rows / window, 3)
        model_only = run.steady_rows / run.steady_model_s * actors
        overhead = round(100 * (1 - steady / model_only), 1)
    return {
        "run_id": run_id, "status": status, "error": error,
        "started_at": datetime.fromtimestamp(started, UTC).isoformat(timespec="seconds"),
        "wall_s": round(wall, 3), "input": job.input, "output": job.output,
        "output_template": job.output_template, "date": job.date,
        "shards": {"listed": len(specs), "skipped_committed": selection.skipped_committed,
                   "skipped_earlier_dates": selection.skipped_earlier,
                   "pending": len(pending), "retried": selection.retried,
                   "changed": selection.changed,
                   "committed": len(records) - len(failed_shards), "failed": len(failed_shards),
                   "pending_ids": [s.shard_id for s in pending],
                   "failed_ids": [r.shard_id for r in failed_shards],
                   # skipped because earlier runs recorded them as failed: still missing from the output
                   "earlier_failed_ids": list(selection.earlier_failed_ids),
                   "earlier_failed_images": selection.earlier_failed_rows},
        # What was done again, and why: a scheduler or a node-loss test reads this.
        "retries": {"retry_failed_shards": list(selection.retried_ids),
                    "changed_shards": list(selection.changed_ids),
                    "interrupted_runs": list(run.interrupted["runs"]),
                    "shards_redone_after_interrupt": list(run.interrupted["shards"]),
                    "rows_redone": sum(run.redone.values()),
                    "shards_with_redone_rows": sorted(run.redone)},
        "images": {"total": images, "failed": sum(r.failed_rows for r in records),
                   "per_s": round(images / progress.elapsed, 3) if progress.elapsed > 0 and images else 0.0,
                   # Steady state: from the end of the first actor's warm-up call (model build,
                   # int8 calibration) to the last commit, rows after warm-up calls only: reading,
                   # decoding, moving rows, post-processing and writing included.
                   "steady_per_s": steady, "steady_window_s": round(window, 3) if window else None,
                   # what the pool's model calls alone sustain in the same window on the same
                   # cores (rows / their model seconds x actors; exact for a pool of one actor)
                   "model_only_per_s": round(model_only, 3) if model_only else None,
                   "overhead_pct": overhead,
                   "model_s": round(model_s, 3), "decode_s": round(decode_s, 3)},
        "top_errors": top_errors(e for r in records for msg, n in r.top_errors for e in [msg] * n),
        "pool": {**asdict(plan), "actor_torch_threads": sorted(run.threads)},
        "lineage": dict(meta), "config": job.config,
        "per_shard": [asdict(r) for r in records],
    }


def summary_table(report: Mapping[str, Any]) -> str:
    """A fixed-width summary of a run report (printed at the end of a run)."""
    lines = [f"run {report['run_id']}: {report['status']}",
             f"{'shard':<28} {'status':<10} {'images':>7} {'failed':>7} {'decode_s':>9} {'model_s':>8} "
             f"{'write_s':>8} {'img/s':>8}"]
    for r in report["per_shard"]:
        s = r["stats"]
        ips = s.get("images_per_s")
        lines.append(f"{r['shard_id'][:28]:<28} {r['status']:<10} {r['rows']:>7} {r['failed_rows']:>7} "
                     f"{s.get('decode_s', 0):>9.2f} {s.get('model_s', 0):>8.2f} {s.get('write_s', 0):>8.2f} "
                     f"{(f'{ips:.1f}' if ips else '-'):>8}")
    sh, im = report["shards"], report["images"]
    lines.append(f"shards: {sh['committed']} committed, {sh['failed']} failed, {sh['skipped_committed']} "
                 f"skipped (already committed) | images: {im['total']} ({im['failed']} failed) | "
                 f"{im['per_s']} img/s end to end | {report['wall_s']:.1f}s")
    for msg, n in report.get("top_errors", []):
        lines.append(f"  error x{n}: {msg}")
    return "\n".join(lines)
