"""The per-worker training loop run by Ray Train's TorchTrainer (gloo DDP on CPU workers).

``train_loop(config)`` receives plain values (see ``pipeline.training.trainer``). Every worker
reads the dataset itself and trains on its slice (``rank::world_size``); every rank runs the same
number of steps per epoch so that DDP's gradient all-reduce lines up. After each epoch rank 0
validates, and all ranks call ``ray.train.report`` (a barrier) with rank 0 attaching the
checkpoint: model, optimizer, schedule, EMA, best-checkpoint list, history and elapsed training
time. On (re)start the latest checkpoint is restored, so a worker failure or a re-run with the
same run name continues where the last epoch ended.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mnv3 import transforms
from pipeline.training import data, ema, models, optim, precise_bn, validation

STATE_FILE = "state.pt"


# --------------------------------------------------------------------------- batches


def _detection_sample(pixels: np.ndarray, record: dict, cats: data.CategoryMap, cfg: dict):
    img = transforms.to_tensor(pixels)
    target = data.detection_target(record, cats)
    return transforms.random_hflip_detection(img, target, cfg["hflip_prob"])


def _segmentation_sample(pixels: np.ndarray, record: dict, cats: data.CategoryMap, cfg: dict, preset):
    mask = torch.from_numpy(data.semantic_mask(record, cats)).long()
    return preset(transforms.to_tensor(pixels), mask)


def make_batch(
    task: str,
    items: list[tuple[np.ndarray, dict]],
    cats: data.CategoryMap,
    cfg: dict,
    source: data.CocoSource,
    preset: Any,
) -> tuple[Any, Any]:
    """Augmented inputs and targets for one step, in the form each model family takes."""
    if task == "detect":
        pairs = [_detection_sample(p, r, cats, cfg) for p, r in items]
        return [p[0] for p in pairs], [p[1] for p in pairs]
    if task == "segment":
        pairs = [_segmentation_sample(p, r, cats, cfg, preset) for p, r in items]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    x = torch.stack([preset(transforms.to_tensor(p)) for p, _ in items])
    y = torch.tensor([data.classification_label(r, cats, source) for _, r in items])
    return x, y


def compute_loss(
    task: str, model: nn.Module, inputs: Any, targets: Any, label_smoothing: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss and its named parts (detector losses, segmentation CE, classification CE)."""
    if task == "detect":
        losses = model(inputs, targets)
        total = sum(losses.values())
        return total, {k: float(v.detach()) for k, v in losses.items()}
    if task == "segment":
        from mnv3.segmentation import segmentation_loss

        loss = segmentation_loss(model(inputs), targets)
        return loss, {}
    loss = F.cross_entropy(model(inputs), targets, label_smoothing=label_smoothing)
    return loss, {}


# --------------------------------------------------------------------------- helpers


def _unwrap(model: nn.Module) -> nn.Module:
    return (
        model.module
        if hasattr(model, "module") and isinstance(model, nn.parallel.DistributedDataParallel)
        else model
    )


def _all_agree(flag: bool, world: int) -> bool:
    """True on every rank when any rank says ``flag`` (so all ranks stop at the same step)."""
    if world <= 1 or not dist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


_SNAPSHOT = "checkpoint_manager_snapshot.json"  # what Ray Train writes once it registers a checkpoint
_last_report_at = [0.0]  # wall time at which this process last called ray.train.report with a checkpoint


def _maybe_fail(cfg: dict, rank: int, step: int) -> None:
    """Test hook: rank 0 dies (hard exit) once at each step of ``_fail_at_steps``.

    A marker file per step makes each death happen once. Before dying it waits (up to 60 s)
    until Ray Train has registered the checkpoint of the last report (the controller polls
    workers every few seconds; a worker that dies right after ``report`` can lose it), so the
    test's expectations do not depend on machine load.
    """
    steps, marker = cfg.get("_fail_at_steps") or (), cfg.get("_fail_marker")
    if rank != 0 or step not in steps or not marker or os.path.exists(f"{marker}-{step}"):
        return
    if _last_report_at[0]:
        _wait_for_registration(_last_report_at[0], timeout=60.0)
    with open(f"{marker}-{step}", "w") as f:
        f.write(f"failed at step {step}\n")
    os._exit(1)


def _wait_for_registration(reported_at: float, timeout: float) -> None:
    """Wait until Ray Train's checkpoint snapshot (in the run's storage, any filesystem) is at
    least as new as ``reported_at``: the controller has then registered that checkpoint."""
    import posixpath

    import ray.train
    from pyarrow import fs as pafs

    storage = ray.train.get_context().get_storage()  # DeveloperAPI; only this test hook uses it
    path = posixpath.join(storage.experiment_fs_path, _SNAPSHOT)
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = storage.storage_filesystem.get_file_info(path)
        if info.type != pafs.FileType.NotFound and info.mtime.timestamp() >= reported_at - 1.0:
            return
        time.sleep(0.2)


def _decode_all(source: data.CocoSource, indices: list[int]) -> list[tuple[np.ndarray, dict]]:
    encoded = data.read_image_bytes(source, indices)
    out = []
    for i in indices:
        record = source.images[i]
        out.append((data.decode_rgb(encoded[int(record["id"])]), record))
    return out


def _validate(
    task: str,
    model: nn.Module,
    val_items: list[validation.ValImage],
    source: data.CocoSource,
    cats: data.CategoryMap,
    cfg: dict,
) -> dict[str, Any]:
    if task == "detect":
        return validation.evaluate_detection(model, val_items, source, cats)
    if task == "segment":
        return validation.evaluate_segmentation(model, val_items, cats, cfg["resize_size"])
    if cfg.get("qat"):
        from mnv3.quantization import convert_qat

        int8 = convert_qat(copy.deepcopy(model).eval())
        return validation.evaluate_classification(
            int8, val_items, source, cats, cfg["resize_size"], cfg["crop_size"]
        )
    return validation.evaluate_classification(
        model, val_items, source, cats, cfg["resize_size"], cfg["crop_size"]
    )


def _train_preset(task: str, cfg: dict):
    if task == "segment":
        return transforms.SegmentationTrainPreset(
            base_size=cfg["resize_size"], crop_size=cfg["crop_size"], hflip_prob=cfg["hflip_prob"]
        )
    if task == "classify":
        return transforms.ClassificationTrainPreset(
            crop_size=cfg["crop_size"],
            hflip_prob=cfg["hflip_prob"],
            auto_augment=cfg["auto_augment"],
            random_erase=cfg["random_erase"],
        )
    return None


def _recompute_bn(
    task: str,
    model: nn.Module,
    local: list[tuple[np.ndarray, dict]],
    cats: data.CategoryMap,
    cfg: dict,
    source: data.CocoSource,
    preset: Any,
) -> int:
    """Precise BN before validation/export: BatchNorm statistics from ``precise_bn_images``
    training images with the current weights (not in QAT, whose BN statistics freeze on schedule)."""
    n = min(cfg.get("precise_bn_images") or 0, len(local))
    if n < 2 or cfg.get("qat"):
        return 0
    size = max(cfg["batch_size"], 2)  # a one-image batch has no batch statistics at 1x1 maps
    starts = [i for i in range(0, n, size) if n - i >= 2]
    batches = (make_batch(task, local[i : i + size], cats, cfg, source, preset)[0] for i in starts)
    forward = precise_bn.detector_backbone_forward if task == "detect" else None
    return precise_bn.recompute_bn_stats(model, batches, forward)


def _detector_kwargs(cfg: dict) -> dict[str, Any]:
    keys = (
        "min_size",
        "max_size",
        "box_batch_size_per_image",
        "rpn_pre_nms_top_n_train",
        "rpn_post_nms_top_n_train",
        "box_detections_per_img",
        "box_score_thresh",
    )
    return {k: cfg[k] for k in keys if cfg.get(k) is not None}


# --------------------------------------------------------------------------- the loop


def train_loop(cfg: dict) -> None:
    """Ray Train worker entry point (``train_loop_per_worker``)."""
    import ray.train
    from ray.train import Checkpoint
    from ray.train.torch import prepare_model

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(math.ceil(cfg["cpus_per_worker"] - 1e-6))))
    task = cfg["task"]
    options = cfg.get("storage_options") or {}

    train_src = data.load_source(cfg["train"], options, cfg.get("manifest"))
    cats = data.CategoryMap.from_categories(train_src.categories, background=task != "classify")
    local = _decode_all(train_src, data.split_indices(len(train_src.images), rank, world))
    per_rank = len(train_src.images) // world
    if per_rank == 0:
        raise ValueError(
            f"training data {cfg['train']!r} has {len(train_src.images)} images, fewer than the "
            f"{world} workers; use fewer finetune.workers"
        )
    # An epoch is one pass over the data unless max_steps_per_epoch sets its length (shorter, or
    # longer: the shuffled slice is then cycled), so small datasets still get few, long epochs.
    steps_per_epoch = cfg.get("max_steps_per_epoch") or max(per_rank // cfg["batch_size"], 1)
    total_steps = steps_per_epoch * cfg["epochs"]

    val_src = val_items = None
    if rank == 0 and cfg.get("val"):
        val_src = data.load_source(cfg["val"], options, cfg.get("manifest"))
        indices = list(range(len(val_src.images)))[: cfg.get("max_val_images") or None]
        val_src.images = [val_src.images[i] for i in indices]
        val_items = [validation.ValImage(r, p) for p, r in _decode_all(val_src, list(range(len(indices))))]

    torch.manual_seed(cfg["seed"])  # same initial weights on every rank
    model, init = models.build_model(
        task,
        cfg["builder"],
        cats.num_classes,
        cfg.get("init"),
        storage_options=options,
        trainable_backbone_layers=cfg.get("trainable_backbone_layers"),
        detector_kwargs=_detector_kwargs(cfg),
        aux_loss=cfg.get("aux_loss", False),
        qat=cfg.get("qat", False),
        qat_backend=cfg.get("qat_backend"),
    )
    groups = optim.param_groups(
        model,
        cfg["weight_decay"],
        cfg.get("norm_weight_decay"),
        {"aux_classifier": 10.0} if task == "segment" and cfg.get("aux_loss") else None,
    )
    optimizer = optim.build_optimizer(
        cfg["optimizer"],
        groups,
        cfg["lr"],
        cfg["momentum"],
        cfg["weight_decay"],
        cfg.get("rmsprop_eps"),
        cfg.get("rmsprop_eps_tf", False),
        cfg.get("rmsprop_alpha", 0.9),
    )
    budget = cfg["max_minutes"] * 60.0 if cfg.get("max_minutes") else None
    clock = {"before": 0.0, "t0": time.perf_counter()}

    def spent() -> float:
        return clock["before"] + time.perf_counter() - clock["t0"]

    scheduler = optim.build_scheduler(
        optimizer,
        progress_fn=(lambda: spent() / budget) if budget else None,
        schedule=cfg["lr_schedule"],
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        warmup_steps=int(round(cfg["warmup_epochs"] * steps_per_epoch)),
        warmup_factor=cfg["warmup_factor"],
        step_size=cfg["lr_step_size"],
        gamma=cfg["lr_gamma"],
        milestones=cfg["lr_milestones"],
        power=cfg["lr_power"],
    )
    averager = ema.ModelEma(model, cfg["ema_decay"]) if cfg.get("ema_decay") else None
    best = ema.BestCheckpoints(cfg.get("average_last_k") or 0)

    start_epoch, step, history, elapsed_before, resumes = 0, 0, [], 0.0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        # A private copy per rank: Checkpoint.as_directory shares one temp directory between the
        # workers of a node, and a rank that arrives after another's download has finished downloads
        # again over the file that rank is still reading (seen as "PytorchStreamReader failed").
        with tempfile.TemporaryDirectory(prefix=f"mnv3-resume-rank{rank}-") as d:
            checkpoint.to_directory(d)
            state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if averager is not None and state.get("ema") is not None:
            averager.load_state_dict(state["ema"])
        best.load_state_dict(state["best"])
        start_epoch, step, history = state["epoch"] + 1, state["step"], state["history"]
        elapsed_before = state["train_seconds"]
        resumes = [*state.get("resumes", []), state["epoch"]]
        if state.get("finished") and cfg["epochs"] <= state.get("epochs", cfg["epochs"]):
            start_epoch = cfg["epochs"]  # a finished run has nothing left to do; its export stands
        if rank == 0:
            print(f"[finetune] resumed from {checkpoint.path} after epoch {state['epoch']} (step {step})")

    model = prepare_model(model) if world > 1 else model
    preset = _train_preset(task, cfg)
    clock.update(before=elapsed_before, t0=time.perf_counter())
    primary = validation.PRIMARY_METRIC[task]

    for epoch in range(start_epoch, cfg["epochs"]):
        unwrapped = _unwrap(model)
        if cfg.get("qat"):
            from mnv3.quantization import freeze_bn_stats, freeze_observers

            if epoch >= cfg["qat_observer_epochs"]:
                freeze_observers(unwrapped)
            if epoch >= cfg["qat_bn_freeze_epochs"]:
                freeze_bn_stats(unwrapped)
        model.train()
        gen = torch.Generator().manual_seed(cfg["seed"] * 1000 + epoch * 17 + rank)
        torch.manual_seed(cfg["seed"] * 7919 + epoch * 31 + rank)
        order = torch.randperm(len(local), generator=gen).tolist()
        losses, parts_sum, out_of_time = [], {}, False
        epoch_start = time.perf_counter()
        for i in range(steps_per_epoch):
            picks = [order[(i * cfg["batch_size"] + j) % len(order)] for j in range(cfg["batch_size"])]
            inputs, targets = make_batch(task, [local[k] for k in picks], cats, cfg, train_src, preset)
            loss, parts = compute_loss(task, model, inputs, targets, cfg["label_smoothing"])
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"loss is {float(loss)} at epoch {epoch} step {step}; lower finetune.lr "
                    "or raise finetune.warmup_epochs"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.get("clip_grad_norm"):
                nn.utils.clip_grad_norm_(model.parameters(), cfg["clip_grad_norm"])
            optimizer.step()
            scheduler.step()
            step += 1
            if averager is not None:
                averager.update(_unwrap(model))
            loss_value = float(loss.detach())
            losses.append(loss_value)
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v
            if cfg.get("log_every") and rank == 0 and step % cfg["log_every"] == 0:
                print(
                    f"[finetune] epoch {epoch} step {step} loss {loss_value:.4f} "
                    f"lr {optimizer.param_groups[0]['lr']:.5f}",
                    flush=True,
                )
            _maybe_fail(cfg, rank, step)
            if budget is not None:  # the same on every rank, so the collective lines up
                out_of_time = _all_agree(spent() >= budget, world)
                if out_of_time:
                    break
        last = out_of_time or epoch == cfg["epochs"] - 1
        train_seconds = spent()
        entry: dict[str, Any] = {
            "epoch": epoch,
            "step": step,
            "train_loss": float(np.mean(losses)) if losses else None,
            "lr": optimizer.param_groups[0]["lr"],
            "epoch_seconds": time.perf_counter() - epoch_start,
            "train_seconds": train_seconds,
            **{k: v / max(len(losses), 1) for k, v in parts_sum.items()},
        }
        metrics: dict[str, Any] = {}
        export_sd = export_kind = None
        if rank == 0:
            eval_model = averager.module if averager is not None else _unwrap(model)
            if val_items or last:  # only validation and the export read the statistics
                _recompute_bn(task, eval_model, local, cats, cfg, train_src, preset)
            if val_items:
                metrics = _validate(task, eval_model, val_items, val_src, cats, cfg)
            best.offer(epoch, metrics.get(primary), eval_model.state_dict())
            export_sd, export_kind = eval_model.state_dict(), "ema" if averager is not None else "last"
            if last and best.k > 0 and len(best.items) > 1:
                averaged = best.averaged()
                copy_model = copy.deepcopy(eval_model)
                copy_model.load_state_dict(averaged)
                _recompute_bn(task, copy_model, local, cats, cfg, train_src, preset)
                averaged = copy_model.state_dict()
                if val_items:
                    metrics = {
                        **_validate(task, copy_model, val_items, val_src, cats, cfg),
                        "averaged": len(best.items),
                    }
                export_sd, export_kind = averaged, f"average_of_{len(best.items)}_best"
            entry.update({f"val_{k}": v for k, v in metrics.items()})
            history.append(entry)
            print(
                f"[finetune] epoch {epoch} done: "
                + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items()),
                flush=True,
            )
        report = {
            "epoch": epoch,
            "step": step,
            "train_loss": entry["train_loss"],
            **{f"val_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))},
        }
        if rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                torch.save(
                    {
                        "model": _unwrap(model).state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "ema": averager.state_dict() if averager is not None else None,
                        "best": best.state_dict(),
                        "epoch": epoch,
                        "step": step,
                        "history": history,
                        "train_seconds": train_seconds,
                        "categories": cats.to_json(),
                        "labels": cats.labels,
                        "init": {
                            "uri": init.uri,
                            "kind": init.kind,
                            "loaded": init.loaded,
                            "fresh": init.fresh,
                        },
                        "export": {
                            "state_dict": export_sd if last else None,
                            "kind": export_kind,
                            "metrics": metrics,
                        },
                        "finished": last,
                        "epochs": cfg["epochs"],
                        "resumes": resumes,
                    },
                    os.path.join(tmp, STATE_FILE),
                )
                _last_report_at[0] = time.time()
                ray.train.report(report, checkpoint=Checkpoint.from_directory(tmp))
        else:
            ray.train.report(report)
        clock.update(before=train_seconds, t0=time.perf_counter())  # validation is not training time
        if out_of_time:
            break
