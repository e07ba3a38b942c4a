"""``mnv3-pipeline demo``: the whole loop on synthetic data, on this machine, with no network.

Stages: start a local Ray cluster -> write a synthetic COCO dataset (train and validation tar
shards) into a local work directory used as the object store -> fine-tune the 320 detector,
LR-ASPP and a small classifier within a training time budget -> quantize each to int8 where
the accuracy gate accepts it (fp32 low-res otherwise) -> annotate the validation shards with
that bundle -> evaluate against the ground truth -> render preview overlays -> summary.

Every setting has an embedded default (the ``demo`` config section registered here); a
``--config`` file and ``--set demo.KEY=VALUE`` override them, and the file's ``batch``,
``actors`` and ``run`` sections apply to the annotate stage. Exit codes: 0 done, 1 a stage
failed (the message names it), 2 bad config or work directory.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any, TextIO

from jobs import config as cfgmod
from jobs.config import opt, register_section

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
TASK_ORDER = ("detect", "segment", "classify")
MARKER = ".mnv3-demo"  # marks a work directory the demo made (so it may clear it)
SUBDIRS = ("data", "runs", "models", "annotations", "previews")


@dataclass
class DemoConfig:
    """The demo (``mnv3-pipeline demo``): synthetic data, training budget, quantization and outputs."""

    workdir: str = opt("demo-output", "Local directory used as the object store (data, runs, models, "
                                      "Parquet, previews). Cleared at the start of each demo run.")
    train_images: int = opt(384, "Synthetic training images.", minimum=1)
    val_images: int = opt(64, "Synthetic validation images (annotated and scored).", minimum=1)
    train_shards: int = opt(4, "Tar shards of the training split.", minimum=1)
    val_shards: int = opt(2, "Tar shards of the validation split (one Parquet file each).", minimum=1)
    image_min_size: int = opt(128, "Smallest side of a synthetic image in pixels.", minimum=32)
    image_max_size: int = opt(192, "Largest side of a synthetic image in pixels.", minimum=32)
    seed: int = opt(0, "Seed of the data (validation uses seed + 1) and of training.", minimum=0)
    train_minutes: float = opt(6.0, "Training time budget of all models together, in minutes (the rest of "
                                    "the demo takes about 2 minutes on 2 cores).",
                               minimum=0.0, exclusive_min=True)
    detect_share: float = opt(0.7, "Share of the budget for the 320 detector.", minimum=0.0)
    segment_share: float = opt(0.2, "Share of the budget for LR-ASPP.", minimum=0.0)
    classify_share: float = opt(0.1, "Share of the budget for the classifier; 0 = no classification.",
                                minimum=0.0)
    detect_min_size: int = opt(160, "Detector input shorter side (the 320 builder's default is 320).",
                               minimum=32)
    detect_max_size: int = opt(240, "Detector input longer-side cap.", minimum=32)
    detect_batch_size: int = opt(4, "Detector training batch.", minimum=1)
    detect_lr: float = opt(0.02, "Detector base learning rate (SGD, cosine decay to the budget's end).",
                           minimum=0.0, exclusive_min=True)
    segment_size: int = opt(160, "LR-ASPP input shorter side (training crop and inference resize).",
                            minimum=32)
    segment_batch_size: int = opt(8, "LR-ASPP training batch.", minimum=1)
    segment_lr: float = opt(0.02, "LR-ASPP base learning rate (SGD, poly decay).", minimum=0.0,
                            exclusive_min=True)
    classify_builder: str = opt("mobilenet_v3_small", "Classifier builder.", choices=cfgmod.CLASSIFY_BUILDERS)
    backbone_weights: str | None = opt(
        None, "ImageNet MobileNetV3-Large weights (registry name or file URI) that start the detector's and "
              "LR-ASPP's backbone; empty = from scratch. The demo downloads nothing: a registry name needs "
              "its file in MNV3_WEIGHTS_DIR or TORCH_HOME.")
    classify_size: int = opt(128, "Classifier input (resize and centre crop).", minimum=32)
    classify_batch_size: int = opt(32, "Classifier training batch.", minimum=1)
    classify_lr: float = opt(0.05, "Classifier base learning rate (SGD, cosine).", minimum=0.0,
                             exclusive_min=True)
    int8: bool = opt(True, "Quantize to int8 where the accuracy gate accepts; false = fp32 low-res.")
    calib_images: int = opt(16, "Calibration images per int8 model (from the training split).", minimum=1)
    holdout_images: int = opt(16, "Held-out images of the int8 accuracy gate.", minimum=1)
    previews: int = opt(12, "Overlay images in the preview page.", minimum=1)
    num_cpus: int | None = opt(None, "CPUs of the local Ray cluster (default: all of this machine's).",
                               minimum=1)
    no_progress_timeout_s: float = opt(300.0, "Ray Data no-progress timeout of the annotate stage: a stall "
                                              "fails with an error naming the stuck operator.",
                                       minimum=0.0, exclusive_min=True)
    target_map50: float = opt(0.5, "Box mAP@0.5 the summary checks against (a note when below).",
                              minimum=0.0)


register_section("demo", DemoConfig)


# --------------------------------------------------------------------------- CLI


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="run the end-to-end demo on synthetic data (local Ray, no network)",
        description="Start a local Ray cluster, write a synthetic dataset into a local work directory, "
                    "fine-tune the 320 detector, LR-ASPP and a small classifier within a time budget, "
                    "quantize them (int8 where the accuracy gate accepts), annotate the validation "
                    "shards, evaluate (box mAP, mIoU), render previews and print a summary. Settings: the "
                    "`demo` config section (embedded defaults); flags override it.")
    p.add_argument("--config", help="optional YAML/TOML config (its demo, batch, actors, run sections)")
    p.add_argument("--workdir", help="local work directory (default demo-output); cleared at the start")
    p.add_argument("--train-minutes", type=float, help="training time budget of all models, minutes")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray cluster (default: all)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. demo.train_images=100 (repeatable)")
    p.set_defaults(func=run)


def load_config(args: argparse.Namespace) -> cfgmod.Config:
    """``--config`` + ``--set`` + the dedicated flags (which win) -> the validated Config."""
    overrides: dict[str, Any] = {}
    for item in args.set:
        key, value = cfgmod.parse_assignment(item)
        overrides[key] = value
    for flag, key in (("workdir", "demo.workdir"), ("train_minutes", "demo.train_minutes"),
                      ("num_cpus", "demo.num_cpus")):
        if getattr(args, flag, None) is not None:
            overrides[key] = getattr(args, flag)
    cfg = cfgmod.load(args.config, overrides)
    check_settings(cfg.section("demo"))
    return cfg


def check_settings(d: DemoConfig) -> None:
    """Checks across demo keys (raises ConfigError naming the key)."""
    if d.image_max_size < d.image_min_size:
        raise cfgmod.ConfigError("demo.image_max_size", f"demo.image_max_size ({d.image_max_size}) is "
                                 f"smaller than demo.image_min_size ({d.image_min_size})")
    if d.detect_max_size < d.detect_min_size:
        raise cfgmod.ConfigError("demo.detect_max_size", f"demo.detect_max_size ({d.detect_max_size}) is "
                                 f"smaller than demo.detect_min_size ({d.detect_min_size})")
    for split in ("train", "val"):
        images, shards = getattr(d, f"{split}_images"), getattr(d, f"{split}_shards")
        if shards > images:
            raise cfgmod.ConfigError(f"demo.{split}_shards", f"demo.{split}_shards ({shards}) exceeds "
                                     f"demo.{split}_images ({images}): every shard needs an image")
    if d.detect_share <= 0 or d.segment_share <= 0:
        raise cfgmod.ConfigError("demo.detect_share", "demo.detect_share and demo.segment_share must be > 0 "
                                 "(the demo always trains the detector and LR-ASPP)")


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args)
    except cfgmod.ConfigError as e:
        print(f"mnv3-pipeline demo: config error: {e}", file=sys.stderr)
        return EXIT_USAGE
    from pipeline.demo_report import StageError

    try:
        run_demo(cfg)
    except WorkdirError as e:
        print(f"mnv3-pipeline demo: {e}", file=sys.stderr)
        return EXIT_USAGE
    except StageError as e:
        print(f"mnv3-pipeline demo: FAILED in stage '{e.stage}': {e}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


# --------------------------------------------------------------------------- the loop


class WorkdirError(ValueError):
    """The work directory cannot be used (not ours, not writable)."""


def prepare_workdir(path: str) -> str:
    """Make ``path`` an empty demo work directory; returns its absolute path.

    A directory holding files the demo did not make (no marker file) is refused rather than
    cleared, so a mistyped ``--workdir`` never deletes someone's data.
    """
    if "://" in path and not path.startswith("file://"):
        raise WorkdirError(f"--workdir {path!r} must be a local directory (the demo uses local disk as its "
                           "object store; annotate and finetune take s3:// URLs themselves)")
    root = os.path.abspath(path.removeprefix("file://"))
    if os.path.exists(root):
        if not os.path.isdir(root):
            raise WorkdirError(f"--workdir {root} is a file; give a directory")
        entries = [e for e in os.listdir(root) if e != MARKER]
        if entries and not os.path.exists(os.path.join(root, MARKER)):
            raise WorkdirError(f"--workdir {root} is not empty and was not made by the demo (no {MARKER} "
                               "file); choose a new or empty directory")
        for name in entries:
            target = os.path.join(root, name)
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target)
            else:
                os.unlink(target)
    try:
        os.makedirs(root, exist_ok=True)
        with open(os.path.join(root, MARKER), "w") as f:
            f.write("work directory of `mnv3-pipeline demo`; cleared by every demo run\n")
    except OSError as e:
        raise WorkdirError(f"--workdir {root} is not writable: {e}") from None
    return root


def start_ray(num_cpus: int | None, no_progress_timeout_s: float) -> tuple[bool, int]:
    """Start a local Ray cluster (token auth off unless RAY_AUTH_MODE is set); returns (started, CPUs).

    A cluster already connected in this process is reused (tests share one).
    """
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S", str(int(no_progress_timeout_s)))
    import ray

    started = False
    if not ray.is_initialized():
        from pipeline.ray_quiet import LOCAL_RUNTIME_ENV

        ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False,
                 configure_logging=True, logging_level="WARNING", runtime_env=LOCAL_RUNTIME_ENV)
        started = True
    ctx = ray.data.DataContext.get_current()
    ctx.execution_no_progress_timeout_s = float(no_progress_timeout_s)
    ctx.enable_progress_bars = False
    return started, int(ray.cluster_resources().get("CPU", 1))


def split_budget(d: DemoConfig) -> dict[str, float]:
    """Training seconds per task from ``train_minutes`` and the shares (classify 0 = not trained)."""
    shares = {"detect": d.detect_share, "segment": d.segment_share, "classify": d.classify_share}
    total = sum(shares.values())
    return {task: d.train_minutes * 60.0 * s / total for task, s in shares.items() if s > 0}


def finetune_settings(task: str, d: DemoConfig, data_dir: str, runs_dir: str, cpus: int) -> dict[str, Any]:
    """The finetune keys of one demo model (no validation split: the demo scores through annotate)."""
    common = {"task": task, "train": os.path.join(data_dir, "train"), "output": runs_dir, "workers": 1,
              "cpus_per_worker": float(cpus), "seed": d.seed, "max_failures": 0, "log_every": 25,
              "warmup_factor": 0.01}
    if d.backbone_weights and task in ("detect", "segment"):
        common["init"] = d.backbone_weights
    if task == "detect":
        return {**common, "batch_size": d.detect_batch_size, "lr": d.detect_lr, "lr_schedule": "cosine",
                "min_size": d.detect_min_size, "max_size": d.detect_max_size,
                "box_batch_size_per_image": 16, "rpn_pre_nms_top_n_train": 600,
                "rpn_post_nms_top_n_train": 300}
    if task == "segment":
        return {**common, "batch_size": d.segment_batch_size, "lr": d.segment_lr, "lr_schedule": "poly",
                "resize_size": d.segment_size, "crop_size": d.segment_size}
    return {**common, "builder": d.classify_builder, "batch_size": d.classify_batch_size,
            "optimizer": "sgd", "lr": d.classify_lr, "lr_schedule": "cosine", "weight_decay": 1e-5,
            "resize_size": d.classify_size, "crop_size": d.classify_size, "auto_augment": False}


def probe_step_seconds(settings: dict[str, Any], steps: int = 3) -> float:
    """Seconds per training step of ``settings``' model here: the fastest of ``steps`` after a warm-up.

    The training budget is time; the learning-rate schedule is in steps. Timing a few steps
    first lets the schedule decay to its end inside the budget. The fastest step is taken so
    that a moment of contention does not shrink the plan (the budget stays the hard stop).
    """
    import torch

    from jobs.finetune import resolve_settings
    from pipeline.training import data, loop, models

    cfg = resolve_settings(_finetune_config(settings))
    source = data.load_source(cfg["train"])
    cats = data.CategoryMap.from_categories(source.categories, background=cfg["task"] != "classify")
    n = min(cfg["batch_size"], len(source.images))
    raw = data.read_image_bytes(source, list(range(n)))
    items = [(data.decode_rgb(raw[int(r["id"])]), r) for r in source.images[:n]]
    model, _ = models.build_model(cfg["task"], cfg["builder"], cats.num_classes, cfg.get("init"),
                                  detector_kwargs=loop._detector_kwargs(cfg))
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    preset = loop._train_preset(cfg["task"], cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, math.ceil(cfg["cpus_per_worker"])))
    try:
        times = []
        for _ in range(steps + 1):
            start = time.perf_counter()
            inputs, targets = loop.make_batch(cfg["task"], items, cats, cfg, source, preset)
            loss, _ = loop.compute_loss(cfg["task"], model, inputs, targets, 0.0)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return min(times[1:])


def _finetune_config(settings: dict[str, Any]) -> Any:
    from jobs.finetune import FinetuneConfig

    return cfgmod._build(FinetuneConfig, settings, "finetune", None)


STEP_HEADROOM = 1.5  # steps planned per step the probe predicts; the time budget ends the run


def plan_schedule(settings: dict[str, Any], train_images: int, budget_s: float,
                  step_s: float) -> dict[str, Any]:
    """Epochs and steps per epoch for a run that ``max_minutes`` (``budget_s``) ends.

    The probe times the first steps of a model from random weights, and those are slower than
    later ones (the detector's by 20-35% here), so a plan of exactly budget / probe steps ended
    runs a quarter early. The plan holds ``STEP_HEADROOM`` times more steps; the learning-rate
    schedule follows the larger of step progress and time progress, so it still decays to its
    end at the budget, where the run stops. An epoch is at most one pass over the data (one
    checkpoint each).
    """
    steps = max(1, int(budget_s * STEP_HEADROOM / max(step_s, 1e-3)))
    per_epoch_data = max(train_images // settings["batch_size"], 1)
    epochs = max(1, math.ceil(steps / per_epoch_data))
    per_epoch = max(1, min(per_epoch_data, steps // epochs))
    warmup = min(0.5, 30 / max(per_epoch, 1)) if settings["task"] == "detect" else 0.0
    return {**settings, "epochs": epochs, "max_steps_per_epoch": per_epoch, "warmup_epochs": warmup,
            "max_minutes": budget_s / 60.0}


def run_demo(cfg: cfgmod.Config, out: TextIO | None = None) -> dict[str, Any]:
    """Run every stage; returns the summary (also written to ``<workdir>/summary.json``).

    Raises ``WorkdirError`` before any work when the work directory cannot be used, and
    ``pipeline.demo_report.StageError`` (naming the stage) when a stage fails.
    """
    import json

    from pipeline.demo_report import StageClock, StageError, format_summary

    out = out if out is not None else sys.stdout
    d: DemoConfig = cfg.section("demo")
    check_settings(d)
    workdir = prepare_workdir(d.workdir)
    budgets = split_budget(d)
    stages = 6 + len(budgets)
    clock = StageClock(total=stages, out=out)
    paths = {name: os.path.join(workdir, name) for name in SUBDIRS}
    started_ray = False
    notes: list[str] = []
    try:
        with clock.stage("ray", "start a local Ray cluster"):
            started_ray, cpus = start_ray(d.num_cpus, d.no_progress_timeout_s)
            clock.say(f"{cpus} CPUs, work directory {workdir}")

        with clock.stage("synth", f"write {d.train_images} train + {d.val_images} validation images"):
            from pipeline.synth import write_dataset

            for split, images, shards, seed in (("train", d.train_images, d.train_shards, d.seed),
                                                ("val", d.val_images, d.val_shards, d.seed + 1)):
                info = write_dataset(os.path.join(paths["data"], split), images=images, shards=shards,
                                     seed=seed, min_size=d.image_min_size, max_size=d.image_max_size)
                clock.say(f"{split}: {info['images']} images, {info['instances']} shapes, "
                          f"{len(info['shards'])} shards -> {info['output']}")

        trained: dict[str, Any] = {}
        for task in TASK_ORDER:
            if task not in budgets:
                continue
            budget = budgets[task]
            with clock.stage(f"finetune {task}", f"train within {budget:.0f}s"):
                trained[task] = _finetune(task, d, paths, cpus, budget, clock)

        with clock.stage("quantize", "int8 with the accuracy gate" if d.int8 else "skipped (demo.int8 off)"):
            bundle = _quantize(trained, d, paths, clock, notes)

        with clock.stage("annotate", f"annotate the {d.val_shards} validation shards"):
            report = _annotate(cfg, bundle, d, paths, out)

        with clock.stage("evaluate", "score against the validation ground truth"):
            metrics = _evaluate(paths, clock)

        with clock.stage("preview", f"render {d.previews} overlays + index.html"):
            from pipeline.preview import render_previews

            index = render_previews(paths["annotations"], paths["previews"], d.previews)
            clock.say(f"open {index}")

        summary = _summary(d, workdir, paths, trained, bundle, report, metrics, index, clock, cpus, notes)
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2, default=str)
        print(format_summary(summary), file=out, flush=True)
        return summary
    except StageError:
        raise
    except Exception as e:  # noqa: BLE001 - anything outside a stage still gets a clear message
        raise StageError("demo", f"{type(e).__name__}: {e}") from e
    finally:
        if started_ray:
            import ray

            ray.shutdown()


def _finetune(task: str, d: DemoConfig, paths: dict[str, str], cpus: int, budget: float,
              clock: Any) -> dict[str, Any]:
    from jobs.finetune import run_finetune

    settings = finetune_settings(task, d, paths["data"], paths["runs"], cpus)
    start = time.perf_counter()
    step_s = probe_step_seconds(settings)
    probe = time.perf_counter() - start
    settings = plan_schedule(settings, d.train_images, max(budget - probe, 1.0), step_s)
    clock.say(f"{step_s:.2f}s per step measured -> {settings['epochs']} epoch(s) x "
              f"{settings['max_steps_per_epoch']} steps of {settings['batch_size']} images "
              f"(hard stop {settings['max_minutes'] * 60:.0f}s)")
    result = run_finetune(settings)
    from pipeline.training import export

    side = export.read_sidecar(result.weights_uri)
    clock.say(f"{result.steps} steps in {result.train_seconds:.0f}s -> {result.weights_uri}")
    return {"result": result, "sidecar": side, "settings": settings}


def _quantize(trained: dict[str, Any], d: DemoConfig, paths: dict[str, str], clock: Any,
              notes: list[str]) -> dict[str, dict[str, Any]]:
    """Per task: the annotate config keys (int8 artifact or fp32 export) and what was chosen."""
    from pipeline.int8_export import QuantizeRequest, quantize_to_artifact
    from pipeline.quality_gate import QualityGateError
    from pipeline.training import export

    bundle: dict[str, dict[str, Any]] = {}
    for task, info in trained.items():
        side, uri = info["sidecar"], info["result"].weights_uri
        keys = export.config_overrides(side, uri)
        choice = {"keys": keys, "precision": "fp32", "builder": side["builder"],
                  "note": "fp32 low-res (int8 off)", "gate": None}
        if d.int8:
            # classes, sizes and labels come from the export's sidecar; the artifact gets its own
            target = os.path.join(paths["models"], f"{side['builder']}-int8.pt")
            req = QuantizeRequest(builder=side["builder"],
                                  calibration_url=os.path.join(paths["data"], "train"), output_url=target,
                                  weights=uri, calib_images=d.calib_images, holdout_images=d.holdout_images,
                                  labelled=True)
            try:
                meta = quantize_to_artifact(req, log=lambda m: clock.say(m))
            except QualityGateError as e:
                message = f"{task}: int8 refused by the accuracy gate, using fp32 low-res instead ({e})"
                clock.say(message)
                notes.append(message.split(" (")[0])
                choice["note"] = "fp32 low-res (int8 gate refused)"
            else:
                gate = meta["gate"]
                keys = export.config_overrides(export.read_sidecar(target), target)
                choice.update(keys=keys, precision="int8", gate=gate,
                              note=f"int8 (gate: {gate['metric']} drop {gate['drop']:.2f} <= "
                                   f"{gate['max_drop']:.2f})")
        bundle[task] = choice
    return bundle


def _annotate(cfg: cfgmod.Config, bundle: dict[str, dict[str, Any]], d: DemoConfig,
              paths: dict[str, str], out: TextIO) -> dict[str, Any]:
    from jobs.annotate import make_job
    from pipeline.run import run_annotate

    overrides: dict[str, Any] = {f"tasks.{t}.enabled": t in bundle for t in cfgmod.TASK_NAMES}
    for choice in bundle.values():
        overrides.update(choice["keys"])
    overrides["run.no_progress_timeout_s"] = d.no_progress_timeout_s
    data = cfg.to_dict(redact=False)
    for key, value in overrides.items():
        cfgmod.set_dotted(data, key, value)
    annotate_cfg = cfgmod.from_dict(data)
    # The annotate parser fills every flag's default, so make_job sees what the CLI would give it.
    from jobs.cli import build_parser

    args = build_parser().parse_args(["annotate", "--input", os.path.join(paths["data"], "val"),
                                      "--output", paths["annotations"], "--overwrite"])
    job = make_job(args, annotate_cfg)
    report = run_annotate(job, out=out)
    if report["status"] != "ok":
        raise RuntimeError(f"annotate finished with status {report['status']} "
                           f"(see {report.get('report_url')}); top errors: {report.get('top_errors')}")
    return report


def _evaluate(paths: dict[str, str], clock: Any) -> dict[str, Any]:
    from pipeline import coco
    from pipeline.demo_report import classification_top1

    gt = os.path.join(paths["data"], "val", "annotations.json")
    metrics = coco.evaluate(paths["annotations"], gt)
    for line in coco.format_metrics(metrics).splitlines():
        clock.say(line)
    top1 = classification_top1(paths["annotations"], gt)
    if top1 is not None:
        clock.say(f"classification top-1 {top1['top1']:.3f} on {top1['images']} images")
    metrics["classification"] = top1
    return metrics


def _summary(d: DemoConfig, workdir: str, paths: dict[str, str], trained: dict[str, Any],
             bundle: dict[str, dict[str, Any]], report: dict[str, Any], metrics: dict[str, Any],
             index: str, clock: Any, cpus: int, notes: list[str]) -> dict[str, Any]:
    bbox, segm, sem = metrics.get("bbox") or {}, metrics.get("segm") or {}, metrics.get("semantic") or {}
    cls = metrics.get("classification") or {}
    images = report["images"]
    summary = {
        "data": {"url": paths["data"], "train_images": d.train_images, "val_images": d.val_images},
        "models": {task: {"builder": bundle[task]["builder"], "precision": bundle[task]["precision"],
                          "note": bundle[task]["note"], "gate": bundle[task]["gate"],
                          "weights": bundle[task]["keys"][f"tasks.{task}.weights"],
                          "train_seconds": info["result"].train_seconds, "steps": info["result"].steps}
                   for task, info in trained.items()},
        "annotate": {"images": images["total"], "failed": images["failed"], "wall_s": report["wall_s"],
                     "images_per_s": images["per_s"], "steady_per_s": images.get("steady_per_s"),
                     "model_only_per_s": images.get("model_only_per_s"), "cpus": cpus,
                     "actors": report.get("pool", {}).get("max_actors"), "report": report.get("report_url")},
        "metrics": {"box_map": bbox.get("AP"), "box_map50": bbox.get("AP50"), "segm_map": segm.get("AP"),
                    "miou": sem.get("mIoU"), "pixel_accuracy": sem.get("pixel_accuracy"),
                    "cls_top1": cls.get("top1")},
        "outputs": {"workdir": workdir, "parquet": paths["annotations"], "previews": index,
                    "summary": os.path.join(workdir, "summary.json")},
        "stage_seconds": {k: round(v, 1) for k, v in clock.seconds.items()},
        "wall_s": round(clock.elapsed, 1),
        "notes": notes,
    }
    map50 = summary["metrics"]["box_map50"]
    if map50 is not None and map50 < d.target_map50:
        hint = ("start the backbone from ImageNet weights (--set demo.backbone_weights=FILE); from random "
                "weights the 320 detector learns slowly (measured learning curves: docs/finetune.md, "
                "'Results on synthetic data')") if not d.backbone_weights else "raise --train-minutes"
        notes.append(f"box mAP@0.5 {map50:.3f} is below the {d.target_map50} target: {hint}")
    return summary
