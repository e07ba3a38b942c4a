"""The annotate job's overhead: end-to-end images/s against model-only images/s, in one run.

End-to-end = a real ``run_annotate`` from object storage (local disk or an S3 server) to
committed Parquet, timed from the first model call to the last shard commit (listing, actor
start-up and model build excluded; reading, decoding, moving rows, post-processing and
writing included) and over the whole run. Model-only, two ways:

* in run: images / the actors' summed model-call seconds x actors, measured inside that same
  run on the same cores at the same moment. This is the headline ratio, because on a shared
  machine the load changes between two measurements but not within one window;
* separate: the same ``InferenceBundle`` called in this process on already-decoded images
  with one actor's torch threads, times the actors (a cross-check, noisy under load).

Overhead = 1 - end-to-end / model-only. Absolute numbers depend on the machine and its load.
``measure_end_to_end`` returns one row per (bundle, storage); the benchmark command and
``scripts/measure_annotate_overhead.py`` print them.
"""

from __future__ import annotations

import os
import tarfile
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pipeline.bundle import InferenceBundle, TaskSpec, draft_size_for


def default_bundles() -> dict[str, list[TaskSpec]]:
    """The bundles issue 6 asks about: the int8 classifier and the low-res (320) detector."""
    from mnv3.categories import get_categories

    imagenet, coco = tuple(get_categories("imagenet1k")), tuple(get_categories("coco91"))
    return {
        "classify_large_int8": [TaskSpec(task="classify", builder="mobilenet_v3_large", precision="int8",
                                         labels=imagenet,
                                         params={"resize_size": 256, "crop_size": 224, "top_k": 5})],
        "detect_320_fp32": [TaskSpec(task="detect", builder="fasterrcnn_mobilenet_v3_large_320_fpn",
                                     labels=coco, params={"min_size": 320, "max_size": 640,
                                                          "threshold": 0.05, "top_k": 100})],
    }


def model_only_rate(tasks: Sequence[TaskSpec], images: Sequence[bytes], *, threads: int = 1,
                    batch_images: int = 16, max_decoded_bytes: int = 64 << 20) -> float:
    """Images/s of ``InferenceBundle`` alone on decoded ``images`` (after one warm-up batch)."""
    import pyarrow as pa
    import torch

    from pipeline.decode import decode_image

    before = torch.get_num_threads()
    try:
        bundle = InferenceBundle(tasks, num_threads=threads, max_images=batch_images,
                                 max_decoded_bytes=max_decoded_bytes)
        rows = []
        for i, data in enumerate(images):
            d = decode_image(data, draft_size=draft_size_for(tasks))
            arr = d.array
            rows.append({"image_id": f"s/{i}", "key": str(i), "source_uri": "x", "shard": "s",
                         "width": d.width, "height": d.height, "status": "ok", "error": None,
                         "_pixels": arr.tobytes(), "_pix_h": arr.shape[0], "_pix_w": arr.shape[1]})
        batches = [pa.Table.from_pylist(rows[i:i + batch_images]) for i in range(0, len(rows), batch_images)]
        bundle(batches[0])  # warm-up (and int8 calibration, as each actor does on its first batch)
        start = time.perf_counter()
        for batch in batches:
            bundle(batch)
        return len(rows) / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)


def _sample_images(url: str, options: Mapping[str, Any], n: int) -> list[bytes]:
    import fsspec

    with fsspec.open(url.rstrip("/") + "/shard-00000.tar", "rb", **dict(options)) as f:
        with tarfile.open(fileobj=f) as tf:
            images = [tf.extractfile(m).read() for m in tf.getmembers() if m.name.endswith(".jpg")]
    return (images * (n // max(1, len(images)) + 1))[:n]


def measure_end_to_end(bundles: Mapping[str, Sequence[TaskSpec]] | None = None, *,
                       storages: Sequence[str] = ("local", "s3"), images: int = 96, shards: int = 8,
                       image_size: tuple[int, int] = (320, 640), model_only_images: int = 32,
                       s3_options: Mapping[str, Any] | None = None, workdir: str | None = None,
                       log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Measure end-to-end vs model-only images/s for each bundle and storage; one dict per pair.

    ``bundles``: name -> task specs (default ``default_bundles()``). ``storages``: "local" (a
    temp dir) and/or "s3" (``s3_options`` for s3fs, else a moto server started on 127.0.0.1).
    Synthetic JPEGs (``images`` in ``shards`` tar shards, sides in ``image_size``) are written
    to the storage, annotated by ``run_annotate`` on the connected Ray cluster (a local one is
    started, and stopped afterwards, when none is), and the output is written back to it.

    Row keys: bundle, storage, images, cluster_cpus, actors, threads_per_actor,
    model_only_in_run_img_s, e2e_steady_img_s, overhead_pct (e2e steady vs in-run model-only),
    model_only_separate_img_s, overhead_vs_separate_pct, e2e_whole_run_img_s (start-up
    included), steady_window_s, wall_s, decode_s, model_s.
    """
    import ray

    from pipeline.run import AnnotateJob, cluster_plan, run_annotate
    from pipeline.synth import write_dataset

    bundles = dict(bundles or default_bundles())
    say = log or (lambda _msg: None)
    started_ray = False
    if not ray.is_initialized():
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        started_ray = True
    server = None
    rows: list[dict[str, Any]] = []
    try:
        for storage_kind in storages:
            if storage_kind == "local":
                base, opts = tempfile.mkdtemp(prefix="mnv3-e2e-", dir=workdir), {}
            elif storage_kind == "s3":
                opts = dict(s3_options or {})
                if not opts:
                    server, opts = _moto(server)
                import s3fs

                bucket = f"mnv3-e2e-{os.getpid()}-{int(time.time())}"
                s3fs.S3FileSystem(**opts).mkdir(bucket)
                base = f"s3://{bucket}"
            else:
                raise ValueError(f"storage must be 'local' or 's3', got {storage_kind!r}")
            src = f"{base}/in"
            write_dataset(src, images=images, shards=shards, storage_options=opts, min_size=image_size[0],
                          max_size=image_size[1])
            sample = _sample_images(src, opts, model_only_images)
            for name, tasks in bundles.items():
                job = AnnotateJob(input=src, output=f"{base}/out-{name}", tasks=list(tasks),
                                  input_options=opts, output_options=opts, weights_options=opts,
                                  progress_interval_s=3600.0)
                plan = cluster_plan(job)
                say(f"[e2e] {name} on {storage_kind}: model-only ({plan.threads} thread(s))")
                per_actor = model_only_rate(tasks, sample, threads=plan.threads,
                                            batch_images=job.batch_max_images,
                                            max_decoded_bytes=job.batch_max_decoded_bytes)
                say(f"[e2e] {name} on {storage_kind}: end to end ({plan.max_actors} actor(s))")
                start = time.perf_counter()
                with open(os.devnull, "w") as quiet:
                    report = run_annotate(job, out=quiet)
                wall = time.perf_counter() - start
                im = report["images"]
                actors = max(1, min(plan.max_actors, shards))
                model_only = per_actor * actors
                steady = im["steady_per_s"]
                where = "s3 (moto, 127.0.0.1)" if storage_kind == "s3" and not s3_options else storage_kind
                rows.append({
                    "bundle": name, "storage": where, "images": im["total"],
                    "cluster_cpus": plan.cluster_cpus, "actors": actors, "threads_per_actor": plan.threads,
                    "model_only_in_run_img_s": im["model_only_per_s"],
                    "e2e_steady_img_s": steady, "overhead_pct": im["overhead_pct"],
                    "model_only_separate_img_s": round(model_only, 2),
                    "overhead_vs_separate_pct": round(100 * (1 - steady / model_only), 1) if steady else None,
                    "e2e_whole_run_img_s": round(im["total"] / wall, 2) if wall > 0 else None,
                    "steady_window_s": im["steady_window_s"],
                    "wall_s": round(wall, 1), "decode_s": im["decode_s"], "model_s": im["model_s"],
                })
                say(f"[e2e] {rows[-1]}")
    finally:
        if server is not None:
            server.stop()
        if started_ray:
            ray.shutdown()
    return rows


def _moto(server: Any) -> tuple[Any, dict[str, Any]]:
    from moto.server import ThreadedMotoServer

    if server is None:
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
    host, port = server.get_host_and_port()
    return server, {"endpoint_url": f"http://{host}:{port}", "key": "bench", "secret": "bench",
                    "client_kwargs": {"region_name": "eu-west-1"}}


def format_rows(rows: Sequence[Mapping[str, Any]]) -> str:
    """A fixed-width table of ``measure_end_to_end`` rows."""
    head = (f"{'bundle':<22} {'storage':<22} {'images':>6} {'actors':>6} {'model-only':>11} "
            f"{'e2e steady':>11} {'overhead':>9} {'separate':>9} {'e2e run':>8}")
    lines = [head]
    for r in rows:
        over = f"{r['overhead_pct']:.1f}%" if r["overhead_pct"] is not None else "-"
        lines.append(f"{r['bundle']:<22} {r['storage']:<22} {r['images']:>6} {r['actors']:>6} "
                     f"{r['model_only_in_run_img_s'] or 0:>11.2f} {r['e2e_steady_img_s'] or 0:>11.2f} "
                     f"{over:>9} {r['model_only_separate_img_s']:>9.2f} "
                     f"{r['e2e_whole_run_img_s'] or 0:>8.2f}")
    return "\n".join(lines)
