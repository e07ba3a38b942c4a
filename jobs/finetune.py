"""``mnv3-pipeline finetune``: fine-tune a detector, segmenter or classifier on COCO-format data.

The ``finetune`` config section (registered here) holds every training setting; flags
override it. ``run_finetune(cfg)`` is the Python entry point (the demo calls it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from typing import Any

from jobs import config as config_mod
from jobs.config import opt, register_section

TASKS = ("detect", "segment", "classify")
SCHEDULES = ("step", "multistep", "cosine", "poly", "constant")

# The references' total batch (spec §6) that their ``lr`` belongs to: classification 8 GPUs x 128,
# detection 8 x 2, segmentation 8 x 4. An unset ``lr`` is the recipe's scaled linearly to the
# run's own total batch (``batch_size x workers``): the recipe's 0.064 at a batch of 32 makes
# RMSProp diverge from scratch (measured loss ~1000 after 20 steps) and would wreck
# pretrained weights.
RECIPE_TOTAL_BATCH = {"detect": 16, "segment": 32, "classify": 1024}

# Recipe values of torchvision's MobileNetV3 references (spec §6), used when a key is unset.
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "detect": {
        "builder": "fasterrcnn_mobilenet_v3_large_320_fpn",
        "optimizer": "sgd",
        "lr": 0.02,
        "weight_decay": 1e-4,
        "lr_schedule": "multistep",
        "warmup_epochs": 1.0,
        "batch_size": 2,
    },
    "segment": {
        "builder": "lraspp_mobilenet_v3_large",
        "optimizer": "sgd",
        "lr": 0.01,
        "weight_decay": 1e-6,
        "lr_schedule": "poly",
        "warmup_epochs": 0.0,
        "batch_size": 4,
        "resize_size": 320,
        "crop_size": 320,
    },
    "classify": {
        "builder": "mobilenet_v3_large",
        "optimizer": "rmsprop",
        "lr": 0.064,
        "weight_decay": 1e-5,
        "lr_schedule": "step",
        "warmup_epochs": 0.0,
        "batch_size": 32,
        "resize_size": 256,
        "crop_size": 224,
        "lr_step_size": 2,
        "lr_gamma": 0.973,
    },
}


@dataclass
class FinetuneConfig:
    """Fine-tuning (``mnv3-pipeline finetune``): data, model, optimisation, workers and output."""

    task: str = opt("detect", "What to train.", choices=TASKS)
    train: str | None = opt(None, "Training dataset URL: annotations.json beside images/ or tar shards.")
    val: str | None = opt(None, "Validation dataset URL (same layouts); empty = no per-epoch metrics.")
    output: str | None = opt(None, "Where runs go (local path or s3://...): checkpoints, history, export.")
    manifest: str | None = opt(None, "Classification only: JSON URL mapping file_name -> class name.")
    builder: str | None = opt(None, "Model builder; default per task (320 detector, LR-ASPP, Large).")
    init: str | None = opt(
        None,
        "Starting weights: registry name or URI of a torchvision-format checkpoint "
        "(full model or ImageNet backbone); empty = from scratch. Heads are "
        "re-initialised when the number of classes differs.",
    )
    trainable_backbone_layers: int | None = opt(
        None, "Detection with init weights: backbone stages trained (0-6, default 3).", minimum=0
    )
    aux_loss: bool = opt(False, "DeepLabV3: train with the auxiliary head (loss x0.5, its lr x10).")
    epochs: int = opt(10, "Epochs.", minimum=1)
    max_steps_per_epoch: int | None = opt(
        None,
        "Steps per epoch (default: one pass over the data); more than one pass cycles the shuffled data.",
        minimum=1,
    )
    max_minutes: float | None = opt(
        None,
        "Time budget: stop after this much training time (validation excluded, earlier time of a "
        "resumed run included); the epoch in progress is then validated and exported. Cosine and "
        "poly schedules decay over the budget.",
        minimum=0.0,
        exclusive_min=True,
    )
    batch_size: int | None = opt(
        None, "Images per step per worker (default: detect 2, segment 4, classify 32).", minimum=1
    )
    workers: int = opt(1, "Ray Train workers (gloo DDP).", minimum=1)
    cpus_per_worker: float = opt(
        1.0,
        "CPUs reserved per worker (fractional allowed; torch threads = ceil).",
        minimum=0.0,
        exclusive_min=True,
    )
    max_failures: int = opt(
        2, "Worker-group restarts from the last checkpoint before the run fails (-1 = unlimited).", minimum=-1
    )
    seed: int = opt(0, "Seed for weights init, shuffling and augmentation.", minimum=0)
    optimizer: str | None = opt(
        None, "sgd or rmsprop (default: rmsprop for classify, else sgd).", choices=("sgd", "rmsprop")
    )
    lr: float | None = opt(
        None,
        "Base learning rate. Default: the reference recipe's (detect 0.02 at a total batch of 16, segment "
        "0.01 at 32, classify 0.064 at 1024) scaled linearly to batch_size x workers, e.g. classify 0.002 "
        "at 32.",
        minimum=0.0,
        exclusive_min=True,
    )
    momentum: float = opt(0.9, "Momentum (SGD and RMSProp).", minimum=0.0)
    weight_decay: float | None = opt(
        None, "Weight decay (default: detect 1e-4, segment 1e-6, classify 1e-5).", minimum=0.0
    )
    norm_weight_decay: float | None = opt(
        None,
        "Weight decay of norm layers; 0 = none on norm layers; unset = same as weight_decay.",
        minimum=0.0,
    )
    rmsprop_eps: float | None = opt(
        None, "RMSProp epsilon (PyTorch convention unless rmsprop_eps_tf; default 0.0316).", minimum=0.0
    )
    rmsprop_eps_tf: bool = opt(
        False,
        "rmsprop_eps is in TensorFlow's convention (added inside the sqrt); it is converted as sqrt(eps).",
    )
    rmsprop_alpha: float = opt(0.9, "RMSProp smoothing constant.", minimum=0.0)
    lr_schedule: str | None = opt(
        None,
        "Per-iteration schedule after warm-up (default: detect multistep, segment poly, classify step).",
        choices=SCHEDULES,
    )
    warmup_epochs: float | None = opt(
        None, "Linear warm-up length in epochs (default: detect 1, else 0).", minimum=0.0
    )
    warmup_factor: float = opt(0.001, "Warm-up starts at this fraction of lr.", minimum=0.0)
    lr_step_size: int | None = opt(None, "step: epochs between decays (classify default 2).", minimum=1)
    lr_gamma: float | None = opt(
        None, "step/multistep decay factor (default 0.1; classify 0.973).", minimum=0.0
    )
    lr_milestones: list[int] | None = opt(
        None, "multistep: epochs where lr decays (default: 2/3 and 11/12 of the epochs, as 16 and 22 of 26)."
    )
    lr_power: float = opt(0.9, "poly: exponent of (1 - step/total).", minimum=0.0)
    clip_grad_norm: float | None = opt(
        None, "Clip the gradient norm to this value.", minimum=0.0, exclusive_min=True
    )
    label_smoothing: float = opt(0.0, "Classification loss label smoothing.", minimum=0.0)
    ema_decay: float | None = opt(
        None,
        "Keep an EMA of the weights with this decay per step (e.g. 0.999); it is validated and exported.",
        minimum=0.0,
    )
    precise_bn_images: int = opt(
        64,
        "Before each validation and export, recompute BatchNorm statistics with the current weights "
        "on this many training images (precise BN; short runs from scratch need it); 0 = off.",
        minimum=0,
    )
    average_last_k: int = opt(
        0,
        "Export the mean of the last K checkpoints that improved the main metric "
        "(mAP@0.5, mIoU, top-1); 0 = off.",
        minimum=0,
    )
    hflip_prob: float = opt(
        0.5, "Horizontal flip probability (boxes and masks move with the image).", minimum=0.0
    )
    auto_augment: bool = opt(True, "Classification: AutoAugment (ImageNet policy).")
    random_erase: float = opt(0.0, "Classification: RandomErasing probability (recipe 0.2).", minimum=0.0)
    resize_size: int | None = opt(
        None,
        "Segment: shorter side at eval and base of the random resize "
        "(default 320); classify: eval resize (default 256).",
        minimum=1,
    )
    crop_size: int | None = opt(
        None, "Segment: training crop (default 320); classify: crop (default 224).", minimum=1
    )
    min_size: int | None = opt(
        None, "Detection: input shorter side (default: the builder's, 320 or 800).", minimum=1
    )
    max_size: int | None = opt(None, "Detection: input longer-side cap (default: the builder's).", minimum=1)
    box_batch_size_per_image: int = opt(
        128,
        "Detection: RoIs sampled per image for the box head loss "
        "(torchvision 512; 128 is ~3x cheaper on CPU).",
        minimum=1,
    )
    rpn_pre_nms_top_n_train: int = opt(
        1000, "Detection: RPN proposals per level before NMS in training (torchvision 2000).", minimum=1
    )
    rpn_post_nms_top_n_train: int = opt(
        500, "Detection: RPN proposals kept in training (torchvision 2000).", minimum=1
    )
    max_val_images: int | None = opt(None, "Validate on the first N validation images only.", minimum=1)
    qat: bool = opt(
        False,
        "Classification: quantization-aware training; exports the int8 (QAT) checkpoint "
        "that the quantized builder loads.",
    )
    qat_backend: str | None = opt(None, "QAT qconfig backend (default: this CPU's engine).")
    qat_observer_epochs: int = opt(4, "QAT: observers are frozen from this epoch on.", minimum=0)
    qat_bn_freeze_epochs: int = opt(3, "QAT: BN statistics are frozen from this epoch on.", minimum=0)
    resume: str | None = opt(
        None,
        "Continue a run: its name, or 'auto' = the newest unfinished run of this task under output "
        "(else a new run). Empty = always a new run (named with the UTC date and time).",
    )
    log_every: int = opt(20, "Print the loss every N steps (0 = never).", minimum=0)
    ray_num_cpus: int | None = opt(None, "CPUs of the local Ray instance when none is running.", minimum=1)


register_section("finetune", FinetuneConfig)


def resolve_settings(ft: FinetuneConfig) -> dict[str, Any]:
    """The finetune section with task defaults filled in, as plain values for the training loop."""
    if ft.task not in TASK_DEFAULTS:
        raise config_mod.ConfigError("finetune.task", f"finetune.task must be one of {', '.join(TASKS)}")
    for key in ("train", "output"):
        if not getattr(ft, key):
            raise config_mod.ConfigError(
                f"finetune.{key}", f"finetune.{key} is not set; give it in the config or with --{key}"
            )
    settings = dataclasses.asdict(ft)
    lr_unset = settings.get("lr") is None
    for key, value in TASK_DEFAULTS[ft.task].items():
        if settings.get(key) is None:
            settings[key] = value
    if lr_unset:
        total = settings["batch_size"] * settings["workers"]
        settings["lr"] = TASK_DEFAULTS[ft.task]["lr"] * total / RECIPE_TOTAL_BATCH[ft.task]
    for key, value in {"lr_step_size": 1, "lr_gamma": 0.1, "resize_size": 256, "crop_size": 224}.items():
        if settings.get(key) is None:
            settings[key] = value
    if settings["lr_milestones"] is None:
        e = ft.epochs
        settings["lr_milestones"] = sorted({max(1, round(e * 16 / 26)), max(1, round(e * 22 / 26))})
    if ft.qat and ft.task != "classify":
        raise config_mod.ConfigError(
            "finetune.qat",
            "finetune.qat is for classification only (the int8 "
            "models are the quantized MobileNetV3 classifiers)",
        )
    return settings


def run_finetune(
    cfg: Any,
    *,
    resume: str | None = None,
    storage_options: dict[str, Any] | None = None,
    test_hooks: dict[str, Any] | None = None,
    **overrides: Any,
):
    """Fine-tune as configured and export; returns a ``FinetuneResult`` (weights URI, metrics, history).

    ``cfg``: a loaded ``jobs.config.Config`` (its ``finetune`` and ``storage`` sections are used),
    a ``FinetuneConfig``, or a mapping of finetune keys. ``overrides``: finetune keys to replace,
    e.g. ``run_finetune(cfg, task="segment", epochs=2)``. ``resume``: a run name to continue or
    "auto" (overrides ``finetune.resume``). ``storage_options``: fsspec options for data and
    output URLs (e.g. an S3 endpoint) when ``cfg`` is not a ``Config``. Time budget:
    ``max_minutes`` (training time, checked every step; the epoch in progress is then validated
    and exported) and/or ``max_steps_per_epoch`` x ``epochs``.
    """
    from pipeline.training.trainer import fit

    if isinstance(cfg, config_mod.Config):
        ft, in_opts, out_opts = cfg.section("finetune"), cfg.storage.for_input(), cfg.storage.for_output()
    elif isinstance(cfg, FinetuneConfig):
        ft, in_opts, out_opts = cfg, dict(storage_options or {}), dict(storage_options or {})
    else:
        ft = config_mod._build(FinetuneConfig, dict(cfg or {}), "finetune", None)
        in_opts, out_opts = dict(storage_options or {}), dict(storage_options or {})
    if overrides:
        ft = config_mod._build(FinetuneConfig, {**_explicit(ft), **overrides}, "finetune", None)
    return fit(
        resolve_settings(ft),
        resume=resume if resume is not None else ft.resume,
        storage_options=in_opts,
        output_storage_options=out_opts,
        test_hooks=test_hooks,
    )


def _explicit(ft: FinetuneConfig) -> dict[str, Any]:
    return {f.name: getattr(ft, f.name) for f in dataclasses.fields(ft)}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune a detector, segmenter or classifier on COCO-format data (Ray Train)",
        description="Ray Train TorchTrainer on CPU workers (gloo DDP). Checkpoints, history and the exported "
        "model (torchvision-format .pth + JSON sidecar that annotate reads) go under "
        "OUTPUT/<run name>/. Settings: the `finetune` section of --config; flags override it.",
    )
    p.add_argument("--config", help="YAML or TOML config file (any fsspec URL)")
    p.add_argument("--task", choices=TASKS)
    p.add_argument("--train", help="training dataset URL (annotations.json + images/ or tar shards)")
    p.add_argument("--val", help="validation dataset URL")
    p.add_argument("--output", help="output URL for runs (local path or s3://...)")
    p.add_argument("--init", metavar="WEIGHTS_URI", help="starting weights (registry name or URI)")
    p.add_argument("--workers", type=int, help="Ray Train workers")
    p.add_argument("--cpus-per-worker", type=float, help="CPUs per worker (fractional allowed)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--max-minutes", type=float, help="training time budget in minutes")
    p.add_argument(
        "--resume",
        metavar="NAME|auto",
        help="continue the interrupted run NAME (under --output); 'auto' = the newest unfinished run "
        "of the task, else a new run",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. finetune.lr=0.01 (repeatable)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {}
    for flag in (
        "task",
        "train",
        "val",
        "output",
        "init",
        "workers",
        "cpus_per_worker",
        "epochs",
        "max_minutes",
    ):
        value = getattr(args, flag)
        if value is not None:
            overrides[f"finetune.{flag}"] = value
    try:
        for item in args.set:
            key, value = config_mod.parse_assignment(item)
            overrides[key] = value
        # The finetune job does not run annotate tasks; keep the global validation satisfied.
        overrides.setdefault("tasks.classify.enabled", True)
        cfg = config_mod.load(args.config, overrides)
        result = run_finetune(cfg, resume=args.resume)
    except (config_mod.ConfigError, FileNotFoundError, ValueError) as e:
        print(f"mnv3-pipeline finetune: error: {e}", file=sys.stderr)
        return 2
    print(
        json.dumps(
            {
                "run": result.run_name,
                "weights": result.weights_uri,
                "sidecar": result.sidecar_uri,
                "metrics": result.metrics,
                "history": result.history_uri,
                "plot": result.plot_uri,
            },
            indent=2,
            default=str,
        )
    )
    return 0
