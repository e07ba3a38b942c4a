"""The inference actor of the annotate job: every configured model, built once per actor.

``InferenceBundle`` is the callable class given to Ray Data ``map_batches``. One decode
feeds every task: each decoded image is preprocessed per task through ``mnv3.transforms``
(classification preset, detector input, segmentation preset), images are grouped into
model calls bounded by count *and* decoded bytes, and outputs are post-processed into
schema-v1 row values: top-k labels with names; boxes in ORIGINAL image pixels even when
the decode used a draft downscale; segmentation as one COCO RLE per present class at
original size. A failing model call marks its rows ``inference_error`` instead of
failing the job.

Row contract (pyarrow tables in and out): the input has the schema-v1 identity columns
(image_id, key, source_uri, shard, width, height, status, error) plus ``_pixels``
(raw HWC uint8 RGB bytes, null when the row already failed), ``_pix_h``/``_pix_w`` (array
size, which differs from width/height after a draft downscale). Every other column whose
name starts with ``_`` is passed through unchanged (the run uses them for shard
bookkeeping and timings). The output has every schema-v1 column, the pass-through
columns, ``_model_s`` (this row's share of the bundle call: tensors, models,
post-processing), ``_threads`` (the actor's torch threads, so the run report can show that
threads match the actor CPUs), ``_model_t1`` (when the call's work ended) and ``_warmup``
(the actor's first call), so the run can time its steady state without actor start-up, int8
calibration and lazy initialisation.
"""

from __future__ import annotations

import importlib
import inspect
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F

from mnv3 import transforms
from pipeline.schema import OUTPUT_SCHEMA, STATUS_INFERENCE_ERROR, STATUS_OK

PIXELS, PIX_H, PIX_W, MODEL_S = "_pixels", "_pix_h", "_pix_w", "_model_s"
THREADS = "_threads"  # torch threads of the actor that annotated the row (checked against its CPUs)
MODEL_T1 = "_model_t1"  # wall-clock time its batch's model work ended (the run's end-to-end window)
WARMUP = "_warmup"  # True for rows of an actor's first call (int8 calibration, lazy init: not steady)
_INPUT_ONLY = (PIXELS, PIX_H, PIX_W)
_BUILDER_MODULES = ("mnv3", "mnv3.mobilenetv3", "mnv3.detection", "mnv3.segmentation")
# Above this many logit values, segmentation takes the argmax at model resolution and
# upsamples the label map (nearest) instead of upsampling the logits (bounded memory).
_MAX_UPSAMPLED_LOGITS = 64_000_000


@dataclass(frozen=True)
class TaskSpec:
    """One task of the bundle, in plain values (built from the job config).

    ``params`` holds the task's knobs: classify ``resize_size``, ``crop_size``, ``top_k``;
    detect ``min_size``, ``max_size``, ``threshold``, ``top_k``; segment ``resize_size``,
    ``min_area``, ``include_background``.
    """

    task: str  # "classify" | "detect" | "segment"
    builder: str
    weights: str | None = None
    sha256: str | None = None
    precision: str = "fp32"
    labels: tuple[str, ...] = ()
    num_classes: int | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    quant_engine: str | None = None  # int8 only; None = MNV3_QUANT_ENGINE, else the actor CPU's engine

    @property
    def classes(self) -> int:
        return int(self.num_classes or len(self.labels))

    def input_side(self) -> int:
        """Shorter side the model looks at (for draft decode): at least this many pixels are kept."""
        p = self.params
        if self.task == "detect":
            return int(p.get("min_size") or (320 if "320" in self.builder else 800))
        return int(p.get("resize_size") or 256)

    def lineage(self) -> dict[str, Any]:
        """What the Parquet metadata and run report record about this model."""
        return {"task": self.task, "builder": self.builder, "weights": self.weights,
                "weights_sha256": self.sha256, "precision": self.precision,
                "quantization": _quantization_note(self) if self.precision == "int8" else None,
                "num_classes": self.classes, "params": dict(self.params),
                "random_weights": self.weights is None}


def _quantization_note(spec: TaskSpec) -> str:
    try:
        from mnv3.quantization import choose_engine

        engine = choose_engine(spec.quant_engine)
    except Exception:  # noqa: BLE001 - lineage must not fail on an engine probe
        engine = "unknown"
    how = ("an int8 artifact (mnv3-pipeline quantize) or a QAT checkpoint when the weights are one, else "
           "post-training static quantization calibrated per actor on its first batch")
    return f"int8 ({engine} engine; {how})"


def draft_size_for(specs: Sequence[TaskSpec]) -> int:
    """The shorter side a draft decode must keep so that every task still gets full detail."""
    return max(spec.input_side() for spec in specs)


# --------------------------------------------------------------------------- building models


def find_builder(name: str) -> Callable[..., torch.nn.Module]:
    """The mnv3 builder function called ``name`` (classification, detection or segmentation)."""
    for module in _BUILDER_MODULES:
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        fn = getattr(mod, name, None)
        if callable(fn):
            return fn
    raise ValueError(f"model builder {name!r} is not available in this installation (looked in "
                     f"{', '.join(_BUILDER_MODULES)}); check the tasks.*.builder setting")


def _accepted(fn: Callable[..., Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The subset of ``kwargs`` that ``fn`` accepts (all of them if it takes ``**kwargs``)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return {k: v for k, v in kwargs.items() if v is not None}
    return {k: v for k, v in kwargs.items() if k in params and v is not None}


def localize_weights(uri: str, sha256: str | None, storage_options: Mapping[str, Any] | None,
                     cache_dir: str) -> str:
    """Copy a remote weights file into ``cache_dir`` (keeping its name) and check its sha256.

    Builders then load it from local disk with their own layout rules (e.g. FrozenBN for
    detection weights). Registry names and local paths are returned unchanged.
    """
    from mnv3.weights import WeightsError, find_weights, read_bytes

    if find_weights(uri) is not None or "://" not in uri or uri.startswith("file://"):
        return uri
    data, digest = read_bytes(uri, storage_options)
    if sha256 and not digest.startswith(sha256.lower()):
        raise WeightsError(f"sha256 mismatch for {uri}: expected {sha256}, got {digest}; the file changed "
                           "since the run started or is not the configured one")
    local = os.path.join(cache_dir, os.path.basename(uri.rstrip("/")) or "weights.pth")
    with open(local, "wb") as f:
        f.write(data)
    return local


def weights_sha256(uri: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """sha256 of a weights file, for lineage (and to check the file exists before any work).

    A registry name whose file is not cached locally is not downloaded here: its published
    sha256 prefix is returned (the loader checks it on every actor).
    """
    from mnv3.weights import find_weights, read_bytes, resolve

    entry = find_weights(uri)
    resolved, _ = resolve(uri)
    if entry is not None and resolved.startswith(("http://", "https://")):
        return entry.sha256_prefix
    return read_bytes(resolved, storage_options if "://" in resolved else None)[1]


def build_model(spec: TaskSpec, storage_options: Mapping[str, Any] | None = None,
                cache_dir: str | None = None, seed: int = 0) -> torch.nn.Module:
    """Build one task's model in eval mode, with its weights (or seeded random weights)."""
    fn = find_builder(spec.builder)
    kwargs: dict[str, Any] = {"num_classes": spec.classes}
    p = spec.params
    if spec.task == "detect":
        kwargs.update(min_size=p.get("min_size"), max_size=p.get("max_size"),
                      box_score_thresh=p.get("threshold"), box_detections_per_img=p.get("top_k"))
    if spec.weights:
        local = localize_weights(spec.weights, spec.sha256, storage_options,
                                 cache_dir or tempfile.mkdtemp(prefix="mnv3-weights-"))
        kwargs["weights"] = local
    else:
        torch.manual_seed(seed)  # every actor builds the same random model
    if spec.precision == "int8":
        return build_int8(spec, kwargs)
    model = drop_aux_head(fn(**_accepted(fn, kwargs)))
    model.eval()
    return model


def drop_aux_head(model: torch.nn.Module) -> torch.nn.Module:
    """Remove DeepLabV3's aux head (float, or inside the int8 wrapper); returns ``model``.

    The official DeepLabV3 checkpoint carries a training-only aux head; annotate never reads
    its output, so it does not pay for it (about 6% of DeepLabV3 at 520) or calibrate it.
    """
    inner = model._modules.get("model", model) if hasattr(model, "_inner") else model
    if getattr(inner, "aux_classifier", None) is not None:
        inner.aux_classifier = None
    return model


def _local_path(uri: str) -> str:
    return uri[len("file://"):] if uri.startswith("file://") else uri


def checkpoint_kind(weights: str) -> str:
    """``"int8_artifact"`` (made by ``mnv3-pipeline quantize``), ``"qat"`` (a quantization-aware
    checkpoint such as the official quantized Large) or ``"float"``: decides how int8 is built."""
    from mnv3.weights import read_state_dict, resolve

    uri, _ = resolve(weights)
    if "://" not in uri or uri.startswith("file://"):
        with open(_local_path(uri), "rb") as f:
            obj = torch.load(f, map_location="cpu", weights_only=True)
        if isinstance(obj, Mapping) and obj.get("format") == "mnv3-int8":
            return "int8_artifact"
        sd = obj
    else:
        sd, _ = read_state_dict(uri, sha256="")
    if isinstance(sd, Mapping) and any(".activation_post_process." in k or ".weight_fake_quant." in k
                                       for k in sd):
        return "qat"
    return "float"


def build_int8(spec: TaskSpec, kwargs: Mapping[str, Any]) -> torch.nn.Module:
    """The int8 model of a task, from ``mnv3.quantization``, for every task.

    * weights that are an int8 artifact (``mnv3-pipeline quantize``): loaded as saved, which is
      the reproducible choice (same quantization ranges on every actor);
    * a QAT checkpoint (classification, e.g. the official quantized Large): converted on load;
    * float weights (or none): post-training static quantization. The model is returned
      prepared (observers attached, ``needs_calibration = True``) and the bundle calibrates it
      on the first batch of images the actor sees, then converts it.
    """
    quant = importlib.import_module("mnv3.quantization")
    from mnv3.quantization.registry import build_quantizable

    weights = kwargs.get("weights")
    kind = checkpoint_kind(weights) if weights else "float"
    if kind == "int8_artifact":
        from mnv3.quantization.artifact import load_int8_artifact

        with open(_local_path(weights), "rb") as f:
            model, meta = load_int8_artifact(f)
        if meta.get("builder") != spec.builder:
            raise ValueError(f"tasks.{spec.task}.weights {spec.weights!r} is an int8 artifact of "
                             f"{meta.get('builder')!r}, not of tasks.{spec.task}.builder {spec.builder!r}; "
                             "set the builder to match")
        if spec.task == "detect":
            _apply_detector_params(model, spec)
        return drop_aux_head(model).eval()
    if kind == "qat":
        if spec.task != "classify":
            raise ValueError(f"tasks.{spec.task}.weights {spec.weights!r} is a QAT checkpoint; only "
                             "classification loads those (use an int8 artifact from mnv3-pipeline quantize)")
        builder = getattr(quant, spec.builder)
        model = builder(**_accepted(builder, {**kwargs, "quantize": True}))
        return model.eval()
    model = drop_aux_head(build_quantizable(spec.builder, **_accepted(find_builder(spec.builder), kwargs)))
    model.eval()
    quant.prepare_ptq(model)
    model.needs_calibration = True
    return model


def _use_quant_engine(specs: Sequence[TaskSpec]) -> None:
    """Make the configured quantized engine (``actors.quant_engine``) this actor process's engine.

    It is set as ``MNV3_QUANT_ENGINE`` too, so every int8 path (artifact, QAT checkpoint,
    post-training calibration) picks it up; a config key travels with the job to every node,
    where an environment variable of the driver would not.
    """
    engine = next((s.quant_engine for s in specs if s.quant_engine), None)  # one actors.* key for all
    if engine is None:
        return
    from mnv3.quantization.engine import ENGINE_ENV, set_engine

    try:
        set_engine(engine)
    except ValueError as e:
        raise ValueError(f"actors.quant_engine {engine!r} cannot be used on this node: {e}") from None
    os.environ[ENGINE_ENV] = engine


def _apply_detector_params(model: torch.nn.Module, spec: TaskSpec) -> None:
    """Thresholds and sizes of the config on a detector rebuilt from an int8 artifact."""
    det = getattr(model, "detector", model)
    p = spec.params
    if p.get("min_size"):
        det.transform.min_size = (int(p["min_size"]),)
    if p.get("max_size"):
        det.transform.max_size = int(p["max_size"])
    if p.get("threshold") is not None:
        det.roi_heads.score_thresh = float(p["threshold"])
    if p.get("top_k"):
        det.roi_heads.detections_per_img = int(p["top_k"])


# --------------------------------------------------------------------------- per-task runners


class _TaskRunner:
    """Preprocess, run and post-process one task on a group of decoded images."""

    def __init__(self, spec: TaskSpec, model: torch.nn.Module):
        self.spec = spec
        self.model = model
        self.bf16 = spec.precision == "bf16"
        if self.bf16 and spec.task == "classify":
            self.model = self.model.to(memory_format=torch.channels_last)

    def _forward(self, x: Any) -> Any:
        if getattr(self.model, "needs_calibration", False):
            quant = importlib.import_module("mnv3.quantization")
            quant.calibrate(self.model, [x])  # int8 PTQ: ranges from this actor's first batch
            quant.convert(self.model)
            self.model.needs_calibration = False
        with torch.inference_mode():
            if self.bf16:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return self.model(x)
            return self.model(x)


class _Classify(_TaskRunner):
    def run(self, images: list[torch.Tensor], sizes: list[tuple[int, int, int, int]]) -> list[dict]:
        p = self.spec.params
        preset = transforms.ClassificationPreset(crop_size=int(p.get("crop_size", 224)),
                                                 resize_size=int(p.get("resize_size", 256)))
        x = torch.stack([preset(img) for img in images])
        if self.bf16:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = self._forward(x).float()
        probs = logits.softmax(dim=1)
        k = min(int(p.get("top_k", 5)), probs.shape[1])
        scores, ids = probs.topk(k, dim=1)
        labels = self.spec.labels
        out = []
        for s, i in zip(scores.tolist(), ids.tolist()):
            out.append({"cls_label_ids": i, "cls_scores": s,
                        "cls_labels": [labels[j] if j < len(labels) else str(j) for j in i]})
        return out


class _Detect(_TaskRunner):
    def run(self, images: list[torch.Tensor], sizes: list[tuple[int, int, int, int]]) -> list[dict]:
        p = self.spec.params
        threshold = float(p.get("threshold", 0.0))
        top_k = int(p.get("top_k", 100))
        results = self._forward(images)
        labels = self.spec.labels
        out = []
        for res, (width, height, ah, aw) in zip(results, sizes):
            boxes = res["boxes"].float()
            scores = res["scores"].float()
            ids = res["labels"]
            keep = scores >= threshold
            boxes, scores, ids = boxes[keep], scores[keep], ids[keep]
            order = scores.argsort(descending=True)[:top_k]
            boxes, scores, ids = boxes[order], scores[order], ids[order]
            # array pixels -> original pixels (exact per axis, since draft rounds sides up)
            scale = torch.tensor([width / aw, height / ah, width / aw, height / ah], dtype=torch.float32)
            boxes = boxes * scale
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
            id_list = ids.tolist()
            out.append({"det_boxes": boxes.tolist(), "det_scores": scores.tolist(), "det_label_ids": id_list,
                        "det_labels": [labels[j] if j < len(labels) else str(j) for j in id_list]})
        return out


class _Segment(_TaskRunner):
    def run(self, images: list[torch.Tensor], sizes: list[tuple[int, int, int, int]]) -> list[dict]:
        p = self.spec.params
        preset = transforms.SegmentationPreset(resize_size=int(p.get("resize_size", 520)))
        prepared = [preset(img) for img in images]
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, t in enumerate(prepared):
            by_shape.setdefault(tuple(t.shape), []).append(i)
        out: list[dict] = [{} for _ in images]
        for indices in by_shape.values():
            logits = self._forward(torch.stack([prepared[i] for i in indices]))["out"].float()
            for row, i in enumerate(indices):
                width, height = sizes[i][0], sizes[i][1]
                label_map = _label_map(logits[row], height, width)
                out[i] = {"seg_masks": masks_from_label_map(
                    label_map, self.spec.labels, min_area=int(p.get("min_area", 0)),
                    include_background=bool(p.get("include_background", False)))}
        return out


def _label_map(logits: torch.Tensor, height: int, width: int) -> np.ndarray:
    """(C, h, w) logits -> (height, width) int label map at original size, memory-bounded."""
    if logits.shape[0] * height * width <= _MAX_UPSAMPLED_LOGITS:
        up = F.interpolate(logits[None], size=(height, width), mode="bilinear", align_corners=False)[0]
        return up.argmax(0).to(torch.int32).numpy()
    small = logits.argmax(0).to(torch.float32)[None, None]
    return F.interpolate(small, size=(height, width), mode="nearest")[0, 0].to(torch.int32).numpy()


def masks_from_label_map(label_map: np.ndarray, labels: Sequence[str], *, min_area: int = 0,
                         include_background: bool = False) -> list[dict]:
    """Per-class COCO RLE masks (schema v1 ``seg_masks`` entries) of a label map.

    Uses ``pipeline.masks`` when it provides ``label_map_to_rles``; otherwise encodes with
    pycocotools directly (same output format).
    """
    try:
        from pipeline import masks as _masks

        encode = _masks.label_map_to_rles
    except (ImportError, AttributeError):
        encode = None
    if encode is not None:
        return encode(label_map, labels, min_area=min_area, include_background=include_background)
    from pycocotools import mask as mask_utils

    out = []
    ids, counts = np.unique(label_map, return_counts=True)
    for label_id, area in zip(ids.tolist(), counts.tolist()):
        if (label_id == 0 and not include_background) or area < max(min_area, 1):
            continue
        rle = mask_utils.encode(np.asfortranarray(label_map == label_id, dtype=np.uint8))
        out.append({"label_id": int(label_id),
                    "label": labels[label_id] if label_id < len(labels) else str(label_id),
                    "size": [int(rle["size"][0]), int(rle["size"][1])],
                    "counts": rle["counts"].decode("ascii"), "area": int(area)})
    return out


_RUNNERS = {"classify": _Classify, "detect": _Detect, "segment": _Segment}
_TASK_COLUMNS = {
    "classify": ("cls_label_ids", "cls_labels", "cls_scores"),
    "detect": ("det_boxes", "det_label_ids", "det_labels", "det_scores"),
    "segment": ("seg_masks",),
}


# --------------------------------------------------------------------------- the actor


def output_schema(input_schema: pa.Schema) -> pa.Schema:
    """Schema-v1 columns (nullable, the run drops its marker rows later) + pass-through + ``_model_s``."""
    fields = [f.with_nullable(True) for f in OUTPUT_SCHEMA]
    names = set(OUTPUT_SCHEMA.names)
    for f in input_schema:
        if (f.name.startswith("_") and f.name not in _INPUT_ONLY and f.name not in (MODEL_S, THREADS)
                and f.name not in (MODEL_T1, WARMUP) and f.name not in names):
            fields.append(f)
    fields.append(pa.field(MODEL_S, pa.float64()))
    fields.append(pa.field(THREADS, pa.int32()))
    fields.append(pa.field(MODEL_T1, pa.float64()))
    fields.append(pa.field(WARMUP, pa.bool_()))
    return pa.schema(fields)


class InferenceBundle:
    """Ray Data actor: builds the models once, then annotates batches of decoded images."""

    def __init__(self, tasks: Sequence[TaskSpec], *, num_threads: int = 1, max_images: int = 16,
                 max_decoded_bytes: int = 64 << 20, storage_options: Mapping[str, Any] | None = None,
                 seed: int = 0):
        if not tasks:
            raise ValueError("the inference bundle needs at least one task")
        torch.set_num_threads(max(1, int(num_threads)))
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # already set in this worker process
            pass
        self.max_images = max(1, int(max_images))
        self.max_decoded_bytes = max(1, int(max_decoded_bytes))
        self.specs = list(tasks)
        _use_quant_engine(self.specs)
        self.calls = 0
        cache_dir = tempfile.mkdtemp(prefix="mnv3-weights-")
        self.runners = [_RUNNERS[s.task](s, build_model(s, storage_options, cache_dir, seed))
                        for s in self.specs]

    def groups(self, indices: Sequence[int], nbytes: Sequence[int]) -> list[list[int]]:
        """Split row indices into model calls of at most ``max_images`` rows and ``max_decoded_bytes``."""
        out: list[list[int]] = []
        current: list[int] = []
        size = 0
        for i in indices:
            if current and (len(current) >= self.max_images or size + nbytes[i] > self.max_decoded_bytes):
                out.append(current)
                current, size = [], 0
            current.append(i)
            size += nbytes[i]
        if current:
            out.append(current)
        return out

    def __call__(self, batch: pa.Table) -> pa.Table:
        call_start = time.perf_counter()
        n = batch.num_rows
        cols = {name: batch.column(name).to_pylist() for name in batch.column_names if name != PIXELS}
        pixels = (batch.column(PIXELS).combine_chunks() if PIXELS in batch.column_names
                  else pa.nulls(n, pa.binary()))
        nbytes = [length or 0 for length in pc.binary_length(pixels).to_pylist()]
        status, error = cols["status"], cols["error"]
        results: dict[str, list[Any]] = {c: [None] * n for cs in _TASK_COLUMNS.values() for c in cs}
        todo = [i for i in range(n) if status[i] == STATUS_OK and pixels[i].is_valid]
        for group in self.groups(todo, nbytes):
            images, sizes = [], []
            for i in group:
                h, w = int(cols[PIX_H][i]), int(cols[PIX_W][i])
                # one copy out of the Arrow buffer (zero-copy view first): the tensor must own its memory
                arr = np.frombuffer(pixels[i].as_buffer(), dtype=np.uint8).reshape(h, w, 3).copy()
                images.append(transforms.to_tensor(arr))
                sizes.append((int(cols["width"][i]), int(cols["height"][i]), h, w))
            for runner in self.runners:
                try:
                    values = runner.run(images, sizes)
                except Exception as exc:  # noqa: BLE001 - one failed model call must not fail the job
                    spec = runner.spec
                    message = f"{spec.task} ({spec.builder}) failed: {type(exc).__name__}: {exc}"
                    for i in group:
                        status[i] = STATUS_INFERENCE_ERROR
                        error[i] = message if error[i] is None else f"{error[i]}; {message}"
                    continue
                for i, value in zip(group, values):
                    for col, v in value.items():
                        results[col][i] = v
        # The whole call is the bundle's own work (tensors in, models, post-processing), shared by
        # its rows: what "model-only" means when the run compares it with end to end.
        model_s = [(time.perf_counter() - call_start) / max(1, n)] * n
        cols.update(results)
        cols[MODEL_S] = model_s
        cols[THREADS] = [torch.get_num_threads()] * n
        cols[MODEL_T1] = [time.time()] * n
        cols[WARMUP] = [self.calls == 0] * n
        self.calls += 1
        for name in _INPUT_ONLY:
            cols.pop(name, None)
        schema = output_schema(batch.schema)
        return pa.table({f.name: cols.get(f.name, [None] * n) for f in schema}, schema=schema)
