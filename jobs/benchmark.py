"""``mnv3-pipeline benchmark``: model-only images/s per core for each model and mode, in one run."""

from __future__ import annotations

import argparse
import json
import sys


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def register(sub: argparse._SubParsersAction) -> None:
    from pipeline.benchmark import DEFAULT_MODES

    p = sub.add_parser(
        "benchmark", help="measure images/s per core of each model in fp32 / channels_last / bf16 / int8",
        description="Measures, on the same cores in one run, model-only images/s per core for each model and "
                    "mode (warm-up, then the median of several repeats), peak RSS, and each mode's ratio to "
                    "fp32 eager. Writes JSON, prints a table, optionally draws a PNG bar chart.")
    p.add_argument("--models", type=_csv, help="comma-separated case names or builder names "
                   "(default: all; see --list)")
    p.add_argument("--modes", type=_csv, default=list(DEFAULT_MODES), help="fp32,channels_last,bf16,int8")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: per-core numbers)")
    p.add_argument("--batch-sizes", type=lambda s: [int(x) for x in _csv(s)], default=[1, 16],
                   help="batch sizes where the model takes batches (default 1,16)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats; the median is reported")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up calls")
    p.add_argument("--output", help="write the JSON report here (local path or fsspec URL)")
    p.add_argument("--plot", help="write a PNG bar chart here")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall: images / wall seconds / threads (quiet machine); cpu: images / CPU seconds of "
                        "this process, robust when other jobs share the cores (default wall)")
    p.add_argument("--extra", type=_csv, default=[],
                   help="extra row sources registered with pipeline.benchmark.register_rows "
                        "(e.g. end-to-end)")
    p.add_argument("--quick", action="store_true", help="tiny inputs and repeats (smoke test)")
    p.add_argument("--list", action="store_true", help="list the benchmark cases and exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.benchmark import CASES, BenchmarkConfig, format_table, plot_png, run_benchmark, select_cases
    from pipeline.storage import open_fs, write_bytes_atomic

    if args.list:
        for case in CASES.values():
            print(f"{case.name:40s} {case.task:15s} {case.describe()}")
        return 0
    try:
        cases = select_cases(args.models)
        cfg = BenchmarkConfig(modes=args.modes, threads=args.threads, batch_sizes=args.batch_sizes,
                              repeats=args.repeats, warmup=args.warmup, quick=args.quick, clock=args.clock)
        report = run_benchmark(cases, cfg, log=lambda m: print(m, file=sys.stderr), extra=args.extra)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(report))
    if args.output:
        fs, path = open_fs(args.output)
        write_bytes_atomic(fs, path, json.dumps(report, indent=1).encode())
        print(f"report: {args.output}", file=sys.stderr)
    if args.plot:
        fs, path = open_fs(args.plot)
        write_bytes_atomic(fs, path, plot_png(report))
        print(f"chart: {args.plot}", file=sys.stderr)
    return 0
