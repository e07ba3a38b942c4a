"""Measure the annotate job's overhead: end-to-end images/s (storage -> committed Parquet)
against model-only images/s of the same bundle on the same cores, in one run.

    RAY_AUTH_MODE=disabled python scripts/measure_annotate_overhead.py [--images 192] [--s3]

Model-only = ``InferenceBundle.__call__`` on already-decoded images (preprocess + forward +
postprocess, 1 thread, after a warm-up call). End-to-end = a real ``run_annotate`` on a local
2-CPU Ray cluster (1 actor x 1 CPU + read tasks), timed from the first to the last shard commit
(steady state: actor start-up excluded) and over the whole run. Prints one JSON line per bundle.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

BUNDLES = {
    "classify_int8": {"tasks": {"classify": {"precision": "int8"}}},
    "detect_320_fp32": {"tasks": {"classify": {"enabled": False}, "detect": {"enabled": True}}},
}


def model_only(job, images) -> float:
    import pyarrow as pa

    from pipeline.bundle import InferenceBundle, draft_size_for
    from pipeline.decode import decode_image

    bundle = InferenceBundle(job.tasks, num_threads=1, max_images=job.batch_max_images,
                             max_decoded_bytes=job.batch_max_decoded_bytes)
    rows = []
    for i, data in enumerate(images):
        d = decode_image(data, draft_size=draft_size_for(job.tasks))
        rows.append({"image_id": f"s/{i}", "key": str(i), "source_uri": "x", "shard": "s", "width": d.width,
                     "height": d.height, "status": "ok", "error": None, "_pixels": d.array.tobytes(),
                     "_pix_h": d.array.shape[0], "_pix_w": d.array.shape[1]})
    n = job.batch_max_images
    batches = [pa.Table.from_pylist(rows[i:i + n]) for i in range(0, len(rows), n)]
    bundle(batches[0])  # warm-up (and int8 calibration)
    start = time.perf_counter()
    for b in batches:
        bundle(b)
    return len(rows) / (time.perf_counter() - start)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=192)
    ap.add_argument("--shards", type=int, default=12)
    ap.add_argument("--s3", action="store_true", help="read and write through a moto S3 server on 127.0.0.1")
    args = ap.parse_args()

    import argparse as _ap

    import fsspec
    import ray

    from jobs import config as cfgmod
    from jobs.annotate import make_job
    from pipeline.run import run_annotate
    from pipeline.synth import write_dataset

    tmp = tempfile.mkdtemp(prefix="mnv3-overhead-")
    opts: dict = {}
    base = tmp
    if args.s3:
        import s3fs
        from moto.server import ThreadedMotoServer

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        opts = {"endpoint_url": f"http://{host}:{port}", "key": "k", "secret": "s",
                "client_kwargs": {"region_name": "eu-west-1"}}
        s3fs.S3FileSystem(**opts).mkdir("bench")
        base = "s3://bench"
    src = f"{base}/in"
    write_dataset(src, images=args.images, shards=args.shards, storage_options=opts, min_size=320,
                  max_size=480)
    with fsspec.open(src.rstrip("/") + "/shard-00000.tar", "rb", **opts) as f:
        import tarfile

        with tarfile.open(fileobj=f) as tf:
            images = [tf.extractfile(m).read() for m in tf.getmembers() if m.name.endswith(".jpg")]
    images = (images * (args.images // max(1, len(images)) + 1))[:64]

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    for name, overrides in BUNDLES.items():
        data = json.loads(json.dumps(overrides))
        data["storage"] = {"options": opts}
        data.setdefault("run", {})["progress_interval_s"] = 30
        cfg = cfgmod.from_dict(data)
        out = f"{base}/out-{name}"
        ns = _ap.Namespace(input=src, output=out, manifest=None, overwrite=False, retry_failed=False)
        job = make_job(ns, cfg)
        mo = model_only(job, images)
        start = time.perf_counter()
        report = run_annotate(job, out=open(os.devnull, "w"))
        wall = time.perf_counter() - start
        im = report["images"]
        steady, in_run = im["steady_per_s"], im["model_only_per_s"]
        print(json.dumps({
            "bundle": name, "storage": "s3 (moto)" if args.s3 else "local disk", "images": im["total"],
            "model_only_img_s_separate": round(mo, 2), "model_only_img_s_in_run": in_run,
            "e2e_steady_img_s": steady, "e2e_whole_run_img_s": round(im["total"] / wall, 2),
            "wall_s": round(wall, 1), "decode_s": im["decode_s"], "model_s": im["model_s"],
            "overhead_steady_vs_in_run_pct": (round(100 * (1 - steady / in_run), 1)
                                              if steady and in_run else None),
            "overhead_steady_vs_separate_pct": round(100 * (1 - steady / mo), 1) if steady else None}))
        sys.stdout.flush()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
