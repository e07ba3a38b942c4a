"""Make an int8 model artifact: calibrate on the user's images, gate against fp32, save.

Reads images from any URL the annotate job reads (tar shards such as the synthetic
dataset, image prefixes, Parquet, manifests), splits them into a calibration sample and a
disjoint held-out sample, quantizes a copy of the fp32 model (post-training static
quantization), measures the accuracy gate on the held-out images, and only if it passes
writes the artifact atomically. The artifact metadata records what was done.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mnv3 import transforms
from mnv3.quantization.artifact import save_int8_artifact
from mnv3.quantization.engine import choose_engine
from mnv3.quantization.ptq import calibrate, convert, prepare_ptq
from mnv3.quantization.registry import build_quantizable, task_of
from pipeline.decode import DecodeError, decode_image
from pipeline.quality_gate import enforce, evaluate_gate
from pipeline.sources import list_shards, read_shard
from pipeline.storage import open_fs, write_bytes_atomic

TASK_ALIASES = {"classify": "classification", "detect": "detection", "segment": "segmentation"}


@dataclass
class QuantizeRequest:
    """Everything ``quantize_to_artifact`` needs, in plain values (built by the CLI)."""

    builder: str
    calibration_url: str
    output_url: str
    task: str | None = None
    weights: str | None = None
    builder_kwargs: dict[str, Any] = field(default_factory=dict)
    backend: str | None = None
    engine: str | None = None
    calib_images: int = 32
    holdout_images: int = 32
    max_drop: float | None = None
    resize_size: int | None = None  # classification resize / segmentation shorter side
    crop_size: int | None = None  # classification centre crop
    storage_options: Mapping[str, Any] | None = None
    # Gate against ground truth: calibration_url is a COCO dataset in the finetune layout
    # (annotations.json + images/ or tar shards) and weights a finetune export (its sidecar
    # names the labels), so the held-out images are scored against their annotations.
    labelled: bool = False


def load_images(url: str, limit: int, storage_options: Mapping[str, Any] | None = None,
                draft_size: int | None = None) -> list[np.ndarray]:
    """Up to ``limit`` decoded RGB uint8 images from ``url``, in listing order; bad images skipped."""
    out: list[np.ndarray] = []
    for spec in list_shards(url, storage_options=dict(storage_options or {})):
        for member in read_shard(spec, storage_options=dict(storage_options or {})):
            if member.data is None:
                continue
            try:
                out.append(decode_image(member.data, draft_size=draft_size).array)
            except DecodeError:
                continue
            if len(out) >= limit:
                return out
    return out


def _preprocess(task: str, arrays: list[np.ndarray], weights: str | None,
                resize_size: int | None, crop_size: int | None = None) -> list[Any]:
    """One model input per image: NCHW (1 image) for classification/segmentation, CHW for detection."""
    tensors = [transforms.to_tensor(a) for a in arrays]
    if task == "detection":
        return tensors
    if task == "segmentation":
        preset = transforms.SegmentationPreset(resize_size=resize_size or 520)
        return [preset(t).unsqueeze(0) for t in tensors]
    preset = transforms.ClassificationPreset()
    if weights is not None:
        from mnv3.weights import find_weights

        entry = find_weights(weights)
        if entry is not None and entry.preprocessing.preset == "classification":
            preset = entry.preprocessing.make()
    if resize_size or crop_size:
        preset = transforms.ClassificationPreset(crop_size=crop_size or preset.crop_size,
                                                 resize_size=resize_size or preset.resize_size)
    return [preset(t).unsqueeze(0) for t in tensors]


def finetune_sidecar(req: QuantizeRequest) -> dict[str, Any] | None:
    """The finetune export sidecar of ``req.weights``, or None (registry names, plain files)."""
    from pipeline.training.export import read_sidecar

    if not req.weights or not req.weights.endswith((".pth", ".pt")):
        return None
    try:
        return read_sidecar(req.weights, req.storage_options)
    except (FileNotFoundError, ValueError):
        return None


def with_sidecar_settings(req: QuantizeRequest, side: Mapping[str, Any]) -> QuantizeRequest:
    """``req`` with what the export's sidecar says (classes, detector sizes, resize and crop) where
    ``req`` leaves it unset: the model is calibrated and gated at the sizes it was trained for."""
    from pipeline.training.export import builder_kwargs

    if side.get("builder") != req.builder:
        raise ValueError(f"--weights {req.weights} is a fine-tuned {side.get('builder')}, not {req.builder}; "
                         "set --builder to match")
    params = side.get("params", {})
    return dataclasses.replace(
        req, builder_kwargs={**builder_kwargs(side), **req.builder_kwargs},
        resize_size=req.resize_size or params.get("resize_size"),
        crop_size=req.crop_size or params.get("crop_size"))


def load_labelled(req: QuantizeRequest, task: str, limit: int,
                  side: Mapping[str, Any] | None) -> tuple[list[np.ndarray], list[Any]]:
    """Up to ``limit`` images of the COCO dataset at ``req.calibration_url`` and their ground truth
    in the model's label ids: detection targets, HxW label maps, or class labels.

    The dataset's categories must be the model's labels (the finetune sidecar's list, in order);
    otherwise a score against them would measure a label mix-up, not int8.
    """
    from pipeline.training import data

    if not req.weights:
        raise ValueError("a labelled gate needs --weights: a finetune export whose sidecar names its labels")
    if side is None:
        raise ValueError(f"a labelled gate needs weights exported by mnv3-pipeline finetune (their JSON "
                         f"sidecar names the labels); {req.weights!r} has no finetune sidecar")
    try:
        source = data.load_source(req.calibration_url, req.storage_options)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"a labelled gate needs a COCO dataset at --calibration (annotations.json + images "
                         f"or tar shards); {req.calibration_url!r}: {e}") from None
    cats = data.CategoryMap.from_categories(source.categories, background=task != "classification")
    if list(side.get("labels") or []) != cats.labels:
        raise ValueError(f"the categories of {req.calibration_url} ({', '.join(cats.labels)}) are not the "
                         f"labels of {req.weights} ({', '.join(side.get('labels') or [])}); gate against a "
                         "dataset with the model's categories, or without labels")
    picked: list[tuple[int, Any]] = []
    for i, record in enumerate(source.images):
        if len(picked) >= limit:
            break
        if task == "detection":
            picked.append((i, data.detection_target(record, cats)))
        elif task == "segmentation":
            picked.append((i, data.semantic_mask(record, cats)))
        else:
            try:
                picked.append((i, data.classification_label(record, cats, source)))
            except ValueError:  # an image without a class (no annotation, folder, ...) is skipped
                continue
    raw = data.read_image_bytes(source, [i for i, _ in picked])
    arrays = [data.decode_rgb(raw[int(source.images[i]["id"])]) for i, _ in picked]
    return arrays, [t for _, t in picked]


def _with_truth(task: str, x: Any, truth: list[Any]) -> tuple[Any, Any]:
    """A gate batch (input, ground truth): label maps resized (nearest) to the model input's size."""
    if task == "detection":
        return x, truth
    if task == "classification":
        return x, torch.tensor(truth, dtype=torch.int64)
    maps = [torch.from_numpy(np.ascontiguousarray(m))[None, None].float() for m in truth]
    resized = [torch.nn.functional.interpolate(m, size=x.shape[-2:], mode="nearest") for m in maps]
    return x, torch.cat(resized)[:, 0].long()


def _batches(task: str, inputs: list[Any], size: int, truth: list[Any] | None = None) -> Iterator[Any]:
    for i in range(0, len(inputs), size):
        chunk = inputs[i:i + size]
        x = chunk if task == "detection" else torch.cat(chunk)
        yield x if truth is None else _with_truth(task, x, truth[i:i + size])


def quantize_to_artifact(req: QuantizeRequest, log=print) -> dict[str, Any]:
    """Calibrate, gate and save; returns the artifact metadata. Raises ``QualityGateError`` on refusal."""
    task = TASK_ALIASES.get(req.task or "", req.task) or task_of(req.builder)
    if task != task_of(req.builder):
        raise ValueError(f"builder {req.builder!r} is a {task_of(req.builder)} model, not {task}")
    if req.calib_images < 1 or req.holdout_images < 1:
        raise ValueError("--calib-images and --holdout-images must both be >= 1")
    backend = req.backend or choose_engine(req.engine)
    engine = choose_engine(req.engine)
    t0 = time.perf_counter()
    side = finetune_sidecar(req)
    if side is not None:
        req = with_sidecar_settings(req, side)
    truth: list[Any] | None = None
    if req.labelled:
        arrays, truth = load_labelled(req, task, req.calib_images + req.holdout_images, side)
    else:
        arrays = load_images(req.calibration_url, req.calib_images + req.holdout_images, req.storage_options)
    if len(arrays) < 2:
        raise ValueError(f"found {len(arrays)} readable images in {req.calibration_url}; need at least 2 "
                         "(calibration + held-out)")
    n_cal = min(req.calib_images, max(1, len(arrays) // 2)) if len(arrays) < req.calib_images + \
        req.holdout_images else req.calib_images
    inputs = _preprocess(task, arrays, req.weights, req.resize_size, req.crop_size)
    cal_inputs, held_inputs = inputs[:n_cal], inputs[n_cal:]
    log(f"quantize: {len(arrays)} images from {req.calibration_url} -> {len(cal_inputs)} calibration, "
        f"{len(held_inputs)} held-out")

    fp32 = build_quantizable(req.builder, weights=req.weights, **req.builder_kwargs).eval()
    int8 = prepare_ptq(copy.deepcopy(fp32), backend)
    batch = 2 if task == "detection" else (8 if task == "classification" else 1)
    seen = calibrate(int8, _batches(task, cal_inputs, batch))
    convert(int8, engine)
    held_truth = truth[n_cal:] if truth is not None else None
    gate = evaluate_gate(task, fp32, int8, _batches(task, held_inputs, batch, held_truth), req.max_drop)
    log(f"quantize: accuracy gate: {gate.summary()}")
    if gate.extra.get("pseudo_gt_boxes") == 0:
        log("quantize: warning: fp32 found no box at all on the held-out images, so the gate compared "
            "nothing; pass more or more typical images (or labelled ones) for a real check")
    elif gate.extra.get("pseudo_gt_score", 0.5) < 0.5:
        log(f"quantize: note: fp32 scored no box >= 0.5 on the held-out images; the gate's reference is "
            f"its boxes with score >= {gate.extra['pseudo_gt_score']:.3f} (half its best score)")
    metadata = {
        "task": task, "builder": req.builder, "builder_kwargs": dict(req.builder_kwargs),
        "backend": backend, "engine": engine, "mode": "ptq",
        "source_weights": req.weights,
        "preprocessing": {"resize_size": req.resize_size, "crop_size": req.crop_size},
        "calibration": {"url": req.calibration_url, "images": seen, "holdout_images": gate.images,
                        "labelled": req.labelled},
        "gate": gate.to_dict(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    enforce(gate, req.builder)
    buf = io.BytesIO()
    save_int8_artifact(buf, int8, metadata)
    fs, path = open_fs(req.output_url, req.storage_options)
    write_bytes_atomic(fs, path, buf.getvalue())
    log(f"quantize: wrote {req.output_url} ({len(buf.getvalue()) / 1e6:.1f} MB)")
    if side is not None and req.output_url.endswith((".pt", ".pth")):
        from pipeline.training.export import int8_sidecar, write_sidecar

        quantization = {k: metadata[k] for k in ("backend", "engine", "mode", "calibration", "gate")}
        uri = write_sidecar(req.output_url, int8_sidecar(side, req.output_url, buf.getvalue(), quantization),
                            req.storage_options)
        metadata["sidecar"] = uri
        log(f"quantize: wrote {uri}: annotate needs only tasks.{side['task']}.weights: {req.output_url}")
    return metadata
