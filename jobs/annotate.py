"""``mnv3-pipeline annotate``: images in object storage -> one Parquet row per image, exactly once.

Thin entry point: parse flags, load and validate the config (before any work), connect to
Ray, hand an ``AnnotateJob`` to ``pipeline.run``.

Exit codes (what a scheduler should do):

* 0 - every pending shard committed with every image ok (nothing to do).
* 1 - the run finished but some images or whole shards failed (see the run report's
  ``top_errors``), or shards that earlier runs recorded as failed are still missing from the
  output; re-running does not help unless the data is fixed, ``--retry-failed`` redoes them.
* 2 - bad config, flags or input (nothing was processed); fix the command, do not retry.
* 3 - the run stopped before finishing (stall, lost cluster, storage error); retry: the
  re-run resumes and skips committed shards.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from typing import Any

from jobs import config as cfgmod

EXIT_OK, EXIT_FAILURES, EXIT_USAGE, EXIT_ABORTED = 0, 1, 2, 3


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "annotate", help="annotate images (classify / detect / segment) into Parquet, resumable",
        description="Read images (tar shards, image prefixes, Parquet, URI manifests) from any fsspec URL, "
                    "run the configured MobileNetV3 models on Ray, write one Parquet file per shard.")
    p.add_argument("--input", required=True,
                   help="input URL: prefix, file or glob (local, s3://, gs://, ...)")
    p.add_argument("--output", required=True, help="output URL (a directory/prefix of its own)")
    p.add_argument("--config", help="config file (YAML or TOML); see the configuration reference")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set tasks.detect.threshold=0.5 (repeatable)")
    p.add_argument("--tasks",
                   help="comma-separated tasks to run: classify,detect,segment (overrides the config)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="skip committed shards (the default)")
    mode.add_argument("--overwrite", action="store_true",
                      help="forget committed shards of this output and start over")
    p.add_argument("--retry-failed", action="store_true",
                   help="also redo shards that failed or have failed images")
    p.add_argument("--max-images", type=int, help="stop once this many images are committed")
    p.add_argument("--images-per-shard", type=int, help="shard size for inputs without natural shards")
    p.add_argument("--preview", type=int, metavar="K", help="render K overlay images + index.html in "
                                                             "<output>/_preview")
    p.add_argument("--date", help="the date (YYYY-MM-DD) that {date} in --output stands for (default: today, "
                                  "UTC); shards committed under earlier dates are skipped")
    p.add_argument("--manifest", help="URI list (text or Parquet) to use instead of listing the input")
    p.add_argument("--ray-address", help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
    p.add_argument("--num-cpus", type=int,
                   help="CPUs of the local Ray cluster started when no address is given")
    p.add_argument("--print-config", action="store_true", help="print the effective config (secrets hidden) "
                                                                "and exit")
    p.set_defaults(func=run)


def build_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Flags -> dotted config overrides (``--set`` first, then the dedicated flags win)."""
    overrides: dict[str, Any] = {}
    for item in args.set:
        key, value = cfgmod.parse_assignment(item)
        overrides[key] = value
    if args.tasks:
        wanted = [t.strip() for t in args.tasks.split(",") if t.strip()]
        unknown = [t for t in wanted if t not in cfgmod.TASK_NAMES]
        if unknown or not wanted:
            raise cfgmod.ConfigError("--tasks", f"--tasks: unknown task(s) {unknown or args.tasks!r}; "
                                                f"choose from {', '.join(cfgmod.TASK_NAMES)}")
        for name in cfgmod.TASK_NAMES:
            overrides[f"tasks.{name}.enabled"] = name in wanted
    if args.max_images is not None:
        overrides["run.max_images"] = args.max_images
    if args.images_per_shard is not None:
        overrides["run.images_per_shard"] = args.images_per_shard
    return overrides


def task_specs(cfg: cfgmod.Config) -> list:
    """Enabled tasks of the config -> ``pipeline.bundle.TaskSpec`` (plain values for the actors)."""
    from mnv3.categories import get_categories
    from pipeline.bundle import TaskSpec

    specs = []
    for name in cfg.tasks.enabled():
        t = getattr(cfg.tasks, name)
        labels = tuple(get_categories(t.labels)) if isinstance(t.labels, str) else tuple(t.labels)
        if name == "classify":
            params = {"resize_size": t.resize_size, "crop_size": t.crop_size, "top_k": t.top_k}
        elif name == "detect":
            params = {"min_size": t.min_size, "max_size": t.max_size, "threshold": t.threshold,
                      "top_k": t.top_k}
        else:
            params = {"resize_size": t.resize_size, "min_area": t.min_area,
                      "include_background": t.include_background}
        specs.append(TaskSpec(task=name, builder=t.builder, weights=t.weights or None, sha256=t.sha256,
                              precision=t.precision, labels=labels, num_classes=t.num_classes, params=params,
                              quant_engine=cfg.actors.quant_engine if t.precision == "int8" else None))
    return specs


def finetune_defaults(cfg: cfgmod.Config) -> tuple[dict[str, Any], list[str]]:
    """Config keys from the JSON sidecar of fine-tuned weights (``pipeline.training.export``).

    A ``tasks.<task>.weights`` URI ending in ``.pth``/``.pt`` with a sidecar beside it brings its
    builder, labels, classes, sizes, precision and sha256; keys the user set explicitly win.
    Returns (dotted defaults, notes to print).
    """
    from mnv3.weights import find_weights

    try:
        from pipeline.training.export import config_overrides, read_sidecar
    except ImportError:
        return {}, []
    defaults: dict[str, Any] = {}
    notes = []
    for name in cfgmod.TASK_NAMES:
        uri = getattr(cfg.tasks, name).weights
        if not uri or find_weights(uri) is not None or not uri.endswith((".pth", ".pt")):
            continue
        try:
            side = read_sidecar(uri, cfg.storage.options)
        except FileNotFoundError:
            continue
        except Exception as e:  # noqa: BLE001 - a foreign .json beside the weights is not ours to use
            notes.append(f"tasks.{name}.weights: ignoring {uri[:-4]}.json ({type(e).__name__}: {e})")
            continue
        if side.get("task") != name:
            key = f"tasks.{name}.weights"
            task = side.get("task")
            raise cfgmod.ConfigError(key, f"{key} = {uri!r} is a fine-tuned {task} model (see its sidecar); "
                                          f"set it as tasks.{task}.weights instead")
        defaults.update(config_overrides(side, uri))
        notes.append(f"tasks.{name}: fine-tuned {side.get('builder')} with {side.get('num_classes')} classes "
                     f"from {uri} (settings from its sidecar unless set explicitly)")
    return defaults, notes


def output_url(args: argparse.Namespace) -> tuple[str, str | None, str | None]:
    """(resolved output URL, template or None, date or None) from ``--output`` and ``--date``."""
    from pipeline.commit import DATE_PLACEHOLDER, check_output_template, resolve_output

    try:
        check_output_template(args.output)
        if DATE_PLACEHOLDER not in args.output:
            if args.date:
                raise ValueError(f"--date {args.date} is given but --output has no {DATE_PLACEHOLDER}")
            return args.output, None, None
        date = args.date or dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
        return resolve_output(args.output, date), args.output, date
    except ValueError as e:
        raise cfgmod.ConfigError("--output", f"--output: {e}") from None


def make_job(args: argparse.Namespace, cfg: cfgmod.Config) -> Any:
    """Config + flags -> ``pipeline.run.AnnotateJob``; weights are checked and hashed here (before Ray)."""
    from dataclasses import replace

    from pipeline.bundle import weights_sha256
    from pipeline.run import AnnotateJob

    specs = []
    for spec in task_specs(cfg):
        if spec.weights:
            try:
                digest = weights_sha256(spec.weights, cfg.storage.options)
            except Exception as e:
                key = f"tasks.{spec.task}.weights"
                raise cfgmod.ConfigError(key, f"{key} = {spec.weights!r} cannot be read: {e}") from None
            if spec.sha256 and not digest.startswith(spec.sha256.lower()):
                key = f"tasks.{spec.task}.sha256"
                raise cfgmod.ConfigError(key, f"{key} = {spec.sha256} but {spec.weights} has sha256 {digest}")
            spec = replace(spec, sha256=digest)
        specs.append(spec)
    r, a, b = cfg.run, cfg.actors, cfg.batch
    output, template, date = output_url(args)
    return AnnotateJob(
        input=args.input, output=output, output_template=template, date=date, tasks=specs,
        input_options=cfg.storage.for_input(),
        output_options=cfg.storage.for_output(), weights_options=dict(cfg.storage.options),
        manifest=args.manifest, image_column=r.image_column, key_column=r.key_column,
        images_per_shard=r.images_per_shard, max_images=r.max_images,
        max_pixels=r.max_pixels, draft_decode=r.draft_decode, batch_max_images=b.max_images,
        batch_max_decoded_bytes=b.max_decoded_bytes, actor_num_cpus=a.num_cpus, max_actors=a.max_actors,
        read_num_cpus=a.read_num_cpus, max_read_tasks=a.max_read_tasks,
        no_progress_timeout_s=r.no_progress_timeout_s, progress_interval_s=r.progress_interval_s,
        ray_progress_bars=r.ray_progress_bars, seed=r.seed, overwrite=args.overwrite,
        retry_failed=args.retry_failed, config=cfg.to_dict(redact=True))


def _warn_random_weights(specs: list) -> None:
    random = [s.task for s in specs if not s.weights]
    if random:
        bar = "!" * 78
        print(f"{bar}\n!! WARNING: no weights configured for {', '.join(random)}: these models have RANDOM "
              f"weights.\n!! Their labels, boxes and masks are MEANINGLESS (useful only to test the "
              f"pipeline).\n"
              f"!! Set tasks.<task>.weights to a registry name or a weights file URI.\n{bar}",
              file=sys.stderr, flush=True)


def _connect_ray(address: str | None, num_cpus: int | None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        # address="local": a new cluster (a bare ray.init() would join any `ray start` cluster here)
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)


def run(args: argparse.Namespace) -> int:
    try:
        overrides = build_overrides(args)
        cfg = cfgmod.load(args.config, overrides)
        defaults, notes = finetune_defaults(cfg)
        if defaults:
            cfg = cfgmod.load(args.config, overrides, defaults=defaults)
        for note in notes:
            print(f"[annotate] {note}", file=sys.stderr)
        if args.print_config:
            import yaml

            print(yaml.safe_dump(cfg.to_dict(redact=True), sort_keys=False), end="")
            return EXIT_OK
        if args.preview is not None and args.preview < 1:
            raise cfgmod.ConfigError("--preview", f"--preview must be >= 1, got {args.preview}")
        job = make_job(args, cfg)
    except cfgmod.ConfigError as e:
        print(f"mnv3-pipeline annotate: config error: {e}", file=sys.stderr)
        return EXIT_USAGE

    from pipeline.run import Redactor, RunError, run_annotate
    from pipeline.sources import SourceError

    redact = Redactor([job.input_options, job.output_options, job.weights_options])
    _warn_random_weights(job.tasks)
    try:
        _connect_ray(args.ray_address, args.num_cpus)
        report = run_annotate(job)
    except SourceError as e:
        print(f"mnv3-pipeline annotate: input error: {redact.text(str(e))}", file=sys.stderr)
        return EXIT_USAGE
    except RunError as e:
        print(f"mnv3-pipeline annotate: run stopped: {redact.text(str(e))}", file=sys.stderr)
        return EXIT_ABORTED
    except Exception as e:  # noqa: BLE001 - storage or cluster failure: a scheduler should retry
        print(f"mnv3-pipeline annotate: run stopped: {type(e).__name__}: {redact.text(str(e))}; re-run to "
              "resume (committed shards are kept)", file=sys.stderr)
        return EXIT_ABORTED
    _warn_random_weights(job.tasks)
    if args.preview:
        try:
            from pipeline import storage
            from pipeline.preview import render_previews

            index = render_previews(job.output, storage.join(job.output, "_preview"), args.preview,
                                    storage_options=job.output_options)
            print(f"[annotate] previews: {index}", file=sys.stderr)
        except Exception as e:  # noqa: BLE001 - previews are a convenience, not the job's result
            print(f"[annotate] previews could not be rendered: {type(e).__name__}: {e}", file=sys.stderr)
    print(f"[annotate] run report: {report.get('report_url')}", file=sys.stderr)
    shards = report["shards"]
    earlier, earlier_images = shards["earlier_failed_ids"], shards["earlier_failed_images"]
    if earlier:
        print(f"[annotate] {len(earlier)} shard(s) failed in earlier runs and are still missing from the "
              f"output (first: {earlier[0]}); fix the data and re-run with --retry-failed",
              file=sys.stderr)
    if earlier_images:
        print(f"[annotate] note: {earlier_images} image(s) in already committed shards failed in earlier "
              "runs (rows with status != ok); --retry-failed redoes their shards", file=sys.stderr)
    failed = shards["failed"] or report["images"]["failed"] or earlier
    return EXIT_FAILURES if failed else EXIT_OK
