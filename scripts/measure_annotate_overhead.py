"""Measure the annotate job's overhead: end-to-end images/s (storage -> committed Parquet)
against model-only images/s of the same bundle on the same cores, in one run.

    RAY_AUTH_MODE=disabled python scripts/measure_annotate_overhead.py [--images 96] [--storage local,s3]
        [--num-cpus 2] [--json out.json]

The measuring code is ``pipeline.overhead.measure_end_to_end`` (the benchmark command can call
it too); this script starts a local Ray cluster with ``--num-cpus`` CPUs, prints a table and
one JSON line per (bundle, storage).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=96, help="synthetic images per storage (default 96)")
    ap.add_argument("--shards", type=int, default=8, help="tar shards they are written in (default 8)")
    ap.add_argument("--storage", default="local,s3", help="comma-separated: local, s3 (a moto server)")
    ap.add_argument("--bundles", help="comma-separated bundle names (default: all of default_bundles())")
    ap.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray cluster (default 2)")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    args = ap.parse_args()

    import ray

    from pipeline.overhead import default_bundles, format_rows, measure_end_to_end

    bundles = default_bundles()
    if args.bundles:
        wanted = [b.strip() for b in args.bundles.split(",") if b.strip()]
        unknown = [b for b in wanted if b not in bundles]
        if unknown:
            print(f"unknown bundle(s) {unknown}; choose from {sorted(bundles)}", file=sys.stderr)
            return 2
        bundles = {b: bundles[b] for b in wanted}
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        rows = measure_end_to_end(bundles, storages=[s.strip() for s in args.storage.split(",") if s.strip()],
                                  images=args.images, shards=args.shards,
                                  log=lambda m: print(m, file=sys.stderr, flush=True))
    finally:
        ray.shutdown()
    print(format_rows(rows))
    for row in rows:
        print(json.dumps(row))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
