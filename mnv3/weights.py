"""Official MobileNetV3 weight files (registry) and a checked loader for any fsspec URI.

The registry records, for each checkpoint torchvision publishes for the MobileNetV3
family, which builder it belongs to, its file name and URL, the sha256 prefix in its
name, parameter count, categories, metrics, preprocessing and the builder arguments the
checkpoint needs. It names builders as strings and imports none of them.

The loader reads a file from a local path, ``s3://``, ``gs://``, ``https://`` or any other
fsspec URI, checks its sha256 when the expected value is known, loads it with
``torch.load(weights_only=True)`` and compares keys and shapes with the model before
touching it, so a wrong file fails with a message that says what is wrong and what to do.
Nothing here downloads at import time.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import torch
from torch import Tensor, nn

from mnv3.categories import get_categories

URL_BASE = "https://download.pytorch.org/models/"
WEIGHTS_DIR_ENV = "MNV3_WEIGHTS_DIR"
OFFLINE_ENV = "MNV3_OFFLINE"
_CHUNK = 1 << 20
_SHOW = 8  # how many keys of each kind an error message lists


class WeightsError(ValueError):
    """A weights file could not be found, verified, read or loaded into the model."""


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Preprocessing:
    """Eval preprocessing the weights were measured with.

    ``preset`` is "classification" (resize shorter side to ``resize_size``, centre crop
    ``crop_size``, normalize), "detection" (float conversion only; the detector resizes
    internally) or "segmentation" (resize shorter side to ``resize_size``, normalize).
    """

    preset: str
    resize_size: int | None = None
    crop_size: int | None = None

    def make(self) -> Any:
        """The matching preset from ``mnv3.transforms`` (classification / segmentation)."""
        from mnv3 import transforms

        if self.preset == "classification":
            return transforms.ClassificationPreset(crop_size=self.crop_size, resize_size=self.resize_size)
        if self.preset == "segmentation":
            return transforms.SegmentationPreset(resize_size=self.resize_size)
        raise ValueError(f"no image preset for {self.preset!r} weights: the detector resizes its input")


@dataclass(frozen=True)
class WeightsEntry:
    """One published checkpoint and everything needed to use it."""

    name: str  # "MobileNet_V3_Large_Weights.IMAGENET1K_V2"
    builder: str  # builder that takes these weights, e.g. "mobilenet_v3_large"
    file: str  # path under URL_BASE, e.g. "quantized/mobilenet_v3_large_qnnpack-5bcacf28.pth"
    sha256_prefix: str
    num_params: int
    category_set: str  # "imagenet1k" | "coco91" | "voc21" (see mnv3.categories)
    metrics: dict[str, dict[str, float]]
    preprocessing: Preprocessing
    gflops: float
    file_size_mb: float
    builder_kwargs: dict[str, Any] = field(default_factory=dict)
    backend: str | None = None  # quantized engine the checkpoint was made for
    unquantized: str | None = None  # float weights the quantized ones derive from
    min_size: tuple[int, int] = (1, 1)
    recipe: str = ""

    def __hash__(self) -> int:  # the dict fields would make the generated hash fail
        return hash(self.name)

    @property
    def url(self) -> str:
        return URL_BASE + self.file

    @property
    def filename(self) -> str:
        return self.file.rsplit("/", 1)[-1]

    @property
    def categories(self) -> tuple[str, ...]:
        return get_categories(self.category_set)


_REF = "https://github.com/pytorch/vision/tree/main/references/"


def _imagenet(acc1: float, acc5: float) -> dict[str, dict[str, float]]:
    return {"ImageNet-1K": {"acc@1": acc1, "acc@5": acc5}}


_ENTRIES = [
    WeightsEntry(
        "MobileNet_V3_Large_Weights.IMAGENET1K_V1", "mobilenet_v3_large", "mobilenet_v3_large-8738ca79.pth",
        "8738ca79", 5_483_032, "imagenet1k", _imagenet(74.042, 91.340),
        Preprocessing("classification", resize_size=256, crop_size=224), 0.217, 21.114,
        recipe=_REF + "classification#mobilenetv3-large--small"),
    WeightsEntry(
        "MobileNet_V3_Large_Weights.IMAGENET1K_V2", "mobilenet_v3_large", "mobilenet_v3_large-5c1a4163.pth",
        "5c1a4163", 5_483_032, "imagenet1k", _imagenet(75.274, 92.566),
        Preprocessing("classification", resize_size=232, crop_size=224), 0.217, 21.107,
        recipe="https://github.com/pytorch/vision/issues/3995#new-recipe-with-reg-tuning"),
    WeightsEntry(
        "MobileNet_V3_Small_Weights.IMAGENET1K_V1", "mobilenet_v3_small", "mobilenet_v3_small-047dcff4.pth",
        "047dcff4", 2_542_856, "imagenet1k", _imagenet(67.668, 87.402),
        Preprocessing("classification", resize_size=256, crop_size=224), 0.057, 9.829,
        recipe=_REF + "classification#mobilenetv3-large--small"),
    WeightsEntry(
        "MobileNet_V3_Large_QuantizedWeights.IMAGENET1K_QNNPACK_V1", "mnv3.quantization.mobilenet_v3_large",
        "quantized/mobilenet_v3_large_qnnpack-5bcacf28.pth", "5bcacf28", 5_483_032, "imagenet1k",
        _imagenet(73.004, 90.858), Preprocessing("classification", resize_size=256, crop_size=224),
        0.217, 21.554,
        builder_kwargs={"quantize": True}, backend="qnnpack",
        unquantized="MobileNet_V3_Large_Weights.IMAGENET1K_V1",
        recipe=_REF + "classification#qat-mobilenetv3"),
    WeightsEntry(
        "FasterRCNN_MobileNet_V3_Large_FPN_Weights.COCO_V1", "fasterrcnn_mobilenet_v3_large_fpn",
        "fasterrcnn_mobilenet_v3_large_fpn-fb6a3cc7.pth", "fb6a3cc7", 19_386_354, "coco91",
        {"COCO-val2017": {"box_map": 32.8}}, Preprocessing("detection"), 4.494, 74.239,
        builder_kwargs={"num_classes": 91, "weights_backbone": None},
        recipe=_REF + "detection#faster-r-cnn-mobilenetv3-large-fpn"),
    WeightsEntry(
        "FasterRCNN_MobileNet_V3_Large_320_FPN_Weights.COCO_V1", "fasterrcnn_mobilenet_v3_large_320_fpn",
        "fasterrcnn_mobilenet_v3_large_320_fpn-907ea3f9.pth", "907ea3f9", 19_386_354, "coco91",
        {"COCO-val2017": {"box_map": 22.8}}, Preprocessing("detection"), 0.719, 74.239,
        builder_kwargs={"num_classes": 91, "weights_backbone": None},
        recipe=_REF + "detection#faster-r-cnn-mobilenetv3-large-320-fpn"),
    WeightsEntry(
        "DeepLabV3_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1", "deeplabv3_mobilenet_v3_large",
        "deeplabv3_mobilenet_v3_large-fc3c493d.pth", "fc3c493d", 11_029_328, "voc21",
        {"COCO-val2017-VOC-labels": {"miou": 60.3, "pixel_acc": 91.2}},
        Preprocessing("segmentation", resize_size=520), 10.452, 42.301,
        builder_kwargs={"num_classes": 21, "aux_loss": True, "weights_backbone": None},
        recipe=_REF + "segmentation#deeplabv3_mobilenet_v3_large"),
    WeightsEntry(
        "LRASPP_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1", "lraspp_mobilenet_v3_large",
        "lraspp_mobilenet_v3_large-d234d4ea.pth", "d234d4ea", 3_221_538, "voc21",
        {"COCO-val2017-VOC-labels": {"miou": 57.9, "pixel_acc": 91.2}},
        Preprocessing("segmentation", resize_size=520), 2.086, 12.49,
        builder_kwargs={"num_classes": 21, "weights_backbone": None},
        recipe=_REF + "segmentation#lraspp_mobilenet_v3_large"),
    WeightsEntry(
        "SSDLite320_MobileNet_V3_Large_Weights.COCO_V1", "ssdlite320_mobilenet_v3_large",
        "ssdlite320_mobilenet_v3_large_coco-a79551df.pth", "a79551df", 3_440_060, "coco91",
        {"COCO-val2017": {"box_map": 21.3}}, Preprocessing("detection"), 0.583, 13.418,
        builder_kwargs={"num_classes": 91, "weights_backbone": None},
        recipe=_REF + "detection#ssdlite320-mobilenetv3-large"),
]

WEIGHTS: dict[str, WeightsEntry] = {e.name: e for e in _ENTRIES}

# DEFAULT per weights enum, as torchvision (Large -> V2).
DEFAULTS: dict[str, str] = {
    "MobileNet_V3_Large_Weights": "MobileNet_V3_Large_Weights.IMAGENET1K_V2",
    "MobileNet_V3_Small_Weights": "MobileNet_V3_Small_Weights.IMAGENET1K_V1",
    "MobileNet_V3_Large_QuantizedWeights": "MobileNet_V3_Large_QuantizedWeights.IMAGENET1K_QNNPACK_V1",
    "FasterRCNN_MobileNet_V3_Large_FPN_Weights": "FasterRCNN_MobileNet_V3_Large_FPN_Weights.COCO_V1",
    "FasterRCNN_MobileNet_V3_Large_320_FPN_Weights": "FasterRCNN_MobileNet_V3_Large_320_FPN_Weights.COCO_V1",
    "DeepLabV3_MobileNet_V3_Large_Weights": "DeepLabV3_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1",
    "LRASPP_MobileNet_V3_Large_Weights": "LRASPP_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1",
    "SSDLite320_MobileNet_V3_Large_Weights": "SSDLite320_MobileNet_V3_Large_Weights.COCO_V1",
}


def _short_builder(builder: str) -> str:
    return "quantized_" + builder.rsplit(".", 1)[-1] if builder.startswith("mnv3.quantization.") else builder


def _build_aliases() -> dict[str, str]:
    """Lower-case lookup: full names, "<Enum>.DEFAULT", "<builder>.<member>" and "<builder>.default"."""
    aliases: dict[str, str] = {}
    for entry in _ENTRIES:
        member = entry.name.split(".", 1)[1]
        aliases[entry.name.lower()] = entry.name
        aliases[f"{_short_builder(entry.builder)}.{member}".lower()] = entry.name
    for enum, target in DEFAULTS.items():
        aliases[f"{enum}.DEFAULT".lower()] = target
        aliases[f"{_short_builder(WEIGHTS[target].builder)}.default"] = target
    return aliases


ALIASES: dict[str, str] = _build_aliases()
_BY_FILENAME: dict[str, WeightsEntry] = {e.filename: e for e in _ENTRIES}


def find_weights(name: str) -> WeightsEntry | None:
    """Registry entry for a name or alias (case-insensitive), or None if it is not one."""
    target = ALIASES.get(name.strip().lower())
    return WEIGHTS[target] if target else None


def get_weights(name: str) -> WeightsEntry:
    """Registry entry for a name or alias; KeyError listing the known names otherwise.

    Accepted: "MobileNet_V3_Large_Weights.IMAGENET1K_V1", "MobileNet_V3_Large_Weights.DEFAULT",
    "mobilenet_v3_large.imagenet1k_v1", "mobilenet_v3_large.default" (any case); the quantized
    weights also as "quantized_mobilenet_v3_large.imagenet1k_qnnpack_v1".
    """
    entry = find_weights(name)
    if entry is None:
        raise KeyError(f"unknown weights {name!r}; known: {sorted(WEIGHTS)} "
                       "(or '<Enum>.DEFAULT', '<builder>.<member>', '<builder>.default')")
    return entry


def list_weights(builder: str | None = None) -> list[WeightsEntry]:
    """All registry entries, or those for one builder name."""
    return [e for e in _ENTRIES if builder is None or e.builder == builder]


def default_weights(builder: str) -> WeightsEntry:
    """The DEFAULT weights of a builder (torchvision's choice; Large -> IMAGENET1K_V2)."""
    for target in DEFAULTS.values():
        if WEIGHTS[target].builder == builder:
            return WEIGHTS[target]
    raise KeyError(f"no published weights for builder {builder!r}; "
                   f"builders with weights: {sorted({e.builder for e in _ENTRIES})}")


def entry_for_file(uri: str) -> WeightsEntry | None:
    """Registry entry whose file name equals the last path component of ``uri``."""
    return _BY_FILENAME.get(_basename(uri))


# --------------------------------------------------------------------------- reading files

# torchvision convention: "<name>-<sha256 prefix>.pth". All-digit tails (dates, epochs)
# are not taken as hashes.
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.(?:pth|pt)$")


def _basename(uri: str) -> str:
    return uri.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]


def expected_sha256(uri: str) -> str | None:
    """The sha256 (prefix) a file is known to have: registry entry first, then its name."""
    entry = entry_for_file(uri)
    if entry is not None:
        return entry.sha256_prefix
    match = _HASH_IN_NAME.search(_basename(uri))
    if match and not match.group(1).isdigit():
        return match.group(1)
    return None


def read_bytes(uri: str, storage_options: Mapping[str, Any] | None = None) -> tuple[bytes, str]:
    """Read a whole file through fsspec; returns (bytes, full sha256 hex) computed while reading."""
    digest = hashlib.sha256()
    buf = io.BytesIO()
    options = dict(storage_options or {})
    if uri.startswith(("http://", "https://")):
        options.setdefault("block_size", 0)  # one streamed GET: many servers refuse range requests
    try:
        with fsspec.open(uri, "rb", **options) as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
                buf.write(chunk)
    except FileNotFoundError as exc:
        raise WeightsError(f"weights file not found: {uri} ({exc})") from exc
    except (OSError, ValueError, ImportError) as exc:
        raise WeightsError(f"cannot read weights file {uri}: {type(exc).__name__}: {exc}") from exc
    return buf.getvalue(), digest.hexdigest()


def _looks_like_state_dict(obj: Any) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(k, str) for k in obj)
            and any(isinstance(v, Tensor) for v in obj.values()))


# Wrappers seen in training checkpoints, tried in this order.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")


def unwrap_state_dict(obj: Any, uri: str = "<object>") -> dict[str, Any]:
    """Return the state_dict inside a loaded checkpoint.

    Accepted: a plain state_dict (str keys, tensor values; quantized models also hold
    packed-parameter and dtype values); a dict holding one under "state_dict",
    "model_state_dict", "model", "module" or "net" (training checkpoints with optimizer
    state next to it; nested wrappers too); keys all prefixed with "module." (saved from
    DistributedDataParallel), which is stripped.
    """
    for _ in range(3):
        if _looks_like_state_dict(obj) and not any(
                k in WRAPPER_KEYS and isinstance(obj[k], Mapping) for k in obj):
            break
        if not isinstance(obj, Mapping):
            break
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not _looks_like_state_dict(obj):
        kind = type(obj).__name__
        if isinstance(obj, Mapping):
            kind = f"dict with keys {sorted(map(str, obj))[:_SHOW]}"
        raise WeightsError(f"{uri} holds no state_dict (found a {kind}); expected a mapping of parameter "
                           f"names to tensors, possibly under one of {list(WRAPPER_KEYS)}")
    sd = dict(obj)
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def load_state_dict(uri: str, *, sha256: str | None = None,
                    storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Read, verify and unpickle a checkpoint from any fsspec URI; see ``read_state_dict``."""
    return read_state_dict(uri, sha256=sha256, storage_options=storage_options)[0]


def read_state_dict(uri: str, *, sha256: str | None = None,
                    storage_options: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], str]:
    """Like ``load_state_dict`` but also returns the file's full sha256 hex.

    The expected hash is ``sha256`` if given (full hex or a prefix), else the registry
    entry with the same file name, else the ``-<hex>.pth`` suffix of the file name; pass
    ``sha256=""`` to skip the check. Unpickling uses ``weights_only=True``, so files that
    hold arbitrary Python objects are refused rather than executed.
    """
    data, actual = read_bytes(uri, storage_options)
    expected = expected_sha256(uri) if sha256 is None else sha256.strip().lower()
    if expected and not actual.startswith(expected):
        raise WeightsError(
            f"sha256 mismatch for {uri}: expected prefix {expected}, got {actual}. The file is corrupt, "
            "truncated or not the file it is named as; download it again. If the name's '-<hex>.pth' tail "
            "is not a hash, rename the file or pass sha256='' to skip the check.")
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower() or "weights_only" in str(exc).lower():
            raise WeightsError(
                f"{uri} contains Python objects other than tensors, which weights_only loading refuses "
                f"(for safety). Re-save only the state_dict: torch.save(model.state_dict(), path). "
                f"Detail: {str(exc).splitlines()[0]}") from exc
        raise WeightsError(f"{uri} is not a PyTorch checkpoint (unpickling failed: {exc})") from exc
    except Exception as exc:  # garbage makes the unpickler fail in many ways (IndexError, KeyError, ...)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WeightsError(f"{uri} is not a PyTorch checkpoint ({len(data)} bytes; torch.load: {first})") \
            from exc
    return unwrap_state_dict(obj, uri), actual


# --------------------------------------------------------------------------- loading into a model


@dataclass(frozen=True)
class WeightsInfo:
    """What was loaded: where from, its hash, the registry entry if any, and key counts."""

    uri: str
    sha256: str
    entry: WeightsEntry | None
    num_keys: int
    missing_keys: tuple[str, ...] = ()
    unexpected_keys: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.entry.name if self.entry else _basename(self.uri)

    @property
    def categories(self) -> tuple[str, ...] | None:
        return self.entry.categories if self.entry else None


@dataclass
class KeyDiff:
    """How a state_dict differs from a model's: key sets and tensor shapes."""

    missing: list[str]
    unexpected: list[str]
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]  # key, file shape, model shape

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)


def compare_keys(model_sd: Mapping[str, Any], sd: Mapping[str, Any]) -> KeyDiff:
    """Keys/shapes of ``sd`` against ``model_sd``.

    ``num_batches_tracked`` is ignored both ways, as loading does: BatchNorm fills it in
    when the file lacks it, and FrozenBatchNorm2d drops it when the file has it (an
    unexpected one counts only if the model has no running stats under that prefix).
    """
    missing = [k for k in model_sd if k not in sd and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in sd if k not in model_sd and not (
        k.endswith(".num_batches_tracked")
        and k[: -len("num_batches_tracked")] + "running_mean" in model_sd)]
    mismatched = [(k, tuple(v.shape), tuple(model_sd[k].shape)) for k, v in sd.items()
                  if k in model_sd and isinstance(v, Tensor) and isinstance(model_sd[k], Tensor)
                  and v.shape != model_sd[k].shape]
    return KeyDiff(missing, unexpected, mismatched)


# Final layers whose first dimension is the number of classes.
_CLASS_HEADS = ("classifier.3.weight", "roi_heads.box_predictor.cls_score.weight", "classifier.4.weight",
                "classifier.low_classifier.weight", "head.classification_head.module_list.0.1.weight")


def _layout(keys: Any) -> tuple[str, str] | None:
    """(what kind of model a key set belongs to, the builder that makes it), from key prefixes."""
    keys = list(keys)
    if any(k.startswith(("rpn.", "roi_heads.", "backbone.body.", "backbone.fpn.")) for k in keys):
        return "Faster R-CNN detector", "fasterrcnn_mobilenet_v3_large_fpn or ..._320_fpn"
    if any(k.startswith("head.classification_head.") for k in keys):
        return "SSDLite detector", "ssdlite320_mobilenet_v3_large"
    if any(k.startswith("classifier.cbr.") for k in keys):
        return "LR-ASPP segmentation model", "lraspp_mobilenet_v3_large"
    if any(k.startswith("classifier.0.convs.") for k in keys):
        return "DeepLabV3 segmentation model", "deeplabv3_mobilenet_v3_large"
    if any(k.endswith((".scale", ".zero_point", "_packed_params")) or "fake_quant" in k
           or ".activation_post_process." in k for k in keys):
        return "quantized MobileNetV3 classifier", "mnv3.quantization.mobilenet_v3_large(quantize=True)"
    stages = {int(m.group(1)) for k in keys if (m := re.match(r"features\.(\d+)\.", k))}
    if stages:
        n = max(stages) + 1
        arch = {13: "small", 17: "large"}.get(n)
        if arch is None:
            return f"MobileNetV3 classifier with {n} feature stages", "mobilenet_v3_large / _small"
        return f"MobileNetV3-{arch.capitalize()} classifier ({n} feature stages)", f"mobilenet_v3_{arch}"
    return None


def diagnose(model_sd: Mapping[str, Any], sd: Mapping[str, Any], diff: KeyDiff) -> list[str]:
    """Likely causes of a key/shape difference, as hints for the error message."""
    hints: list[str] = []
    file_layout, model_layout = _layout(sd), _layout(model_sd)
    if file_layout and model_layout and file_layout != model_layout:
        hints.append(f"the file looks like a {file_layout[0]} checkpoint (builder: {file_layout[1]}), "
                     f"but the model is a {model_layout[0]}")
        if file_layout[0].startswith("MobileNetV3-") and model_layout[0].endswith(("detector", "model")):
            hints.append("a classification checkpoint initialises a detector/segmenter backbone: "
                         "pass it as weights_backbone, not weights")
        return hints
    for key, file_shape, model_shape in diff.mismatched:
        if key in _CLASS_HEADS and file_shape[1:] == model_shape[1:]:
            hints.append(f"the file has {file_shape[0]} classes ({key}); build the model with "
                         f"num_classes={file_shape[0]}, or delete the head's keys from the state_dict "
                         "and load it with strict=False")
            break
    else:
        if diff.mismatched:
            hints.append("same layout, different widths: check width_mult / reduced_tail / dilated "
                         "against the checkpoint's builder arguments")
    if any(k.startswith("aux_classifier.") for k in diff.unexpected):
        hints.append("the file has an aux head (aux_classifier.*): build the model with aux_loss=True")
    return hints


def _format_diff(diff: KeyDiff) -> str:
    lines = []
    for label, items in (("missing from file", diff.missing), ("unexpected in file", diff.unexpected)):
        if items:
            more = f", ... (+{len(items) - _SHOW} more)" if len(items) > _SHOW else ""
            lines.append(f"  {len(items)} {label}: {', '.join(items[:_SHOW])}{more}")
    if diff.mismatched:
        shown = "; ".join(f"{k}: file {list(f)} vs model {list(m)}" for k, f, m in diff.mismatched[:_SHOW])
        more = f"; ... (+{len(diff.mismatched) - _SHOW} more)" if len(diff.mismatched) > _SHOW else ""
        lines.append(f"  {len(diff.mismatched)} shape mismatches: {shown}{more}")
    return "\n".join(lines)


def _offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _hub_dir() -> Path:
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "torch")
    return Path(torch_home) / "hub" / "checkpoints"


def resolve(weights: str, *, weights_dir: str | os.PathLike[str] | None = None,
            allow_download: bool | None = None,
            storage_options: Mapping[str, Any] | None = None) -> tuple[str, WeightsEntry | None]:
    """Turn a registry name/alias or a URI into (URI to read, registry entry or None).

    A registry name is looked up, in order, under ``weights_dir`` (or env MNV3_WEIGHTS_DIR,
    which may be any fsspec URL such as s3://bucket/weights) as "<dir>/<file>" and
    "<dir>/<file name>", then in torch's hub cache ($TORCH_HOME/hub/checkpoints); failing
    that its https URL is used unless ``allow_download`` is False (default: allowed unless
    env MNV3_OFFLINE is set). ``storage_options`` are used to look into ``weights_dir``.
    """
    entry = find_weights(weights)
    if entry is None:
        return weights, entry_for_file(weights)
    base = weights_dir if weights_dir is not None else os.environ.get(WEIGHTS_DIR_ENV)
    candidates = []
    if base:
        base = str(base).rstrip("/")
        candidates += [f"{base}/{entry.file}", f"{base}/{entry.filename}"]
    candidates.append(str(_hub_dir() / entry.filename))
    for uri in dict.fromkeys(candidates):
        try:
            fs, path = fsspec.core.url_to_fs(uri, **dict(storage_options or {}))
            if fs.exists(path):
                return uri, entry
        except (OSError, ValueError, ImportError):
            continue
    if allow_download is None:
        allow_download = not _offline()
    if not allow_download:
        raise WeightsError(
            f"{entry.name}: {entry.filename} not found locally "
            f"(looked in: {', '.join(dict.fromkeys(candidates))}) "
            f"and downloading is off. Download {entry.url} into a directory and set {WEIGHTS_DIR_ENV} "
            f"(local path or s3://...) or pass weights_dir=.")
    return entry.url, entry


def load_weights(model: nn.Module, weights: str, *, weights_dir: str | os.PathLike[str] | None = None,
                 storage_options: Mapping[str, Any] | None = None, strict: bool = True,
                 sha256: str | None = None, allow_download: bool | None = None) -> WeightsInfo:
    """Load a checkpoint into ``model`` after checking hash, keys and shapes.

    ``weights``: a registry name or alias (see ``get_weights``; found as described in
    ``resolve``) or any fsspec URI. With ``strict`` every key must match; with
    ``strict=False`` missing/unexpected keys are allowed (and reported in the result) but
    shape mismatches are still errors. The model is not modified when an error is raised.
    """
    uri, entry = resolve(weights, weights_dir=weights_dir, allow_download=allow_download,
                         storage_options=storage_options)
    if sha256 is None and entry is not None:
        sha256 = entry.sha256_prefix
    if entry is not None and uri == entry.url:
        storage_options = None  # the user's options are for their storage, not download.pytorch.org
    sd, digest = read_state_dict(uri, sha256=sha256, storage_options=storage_options)
    model_sd = model.state_dict()
    diff = compare_keys(model_sd, sd)
    if diff.mismatched or (strict and not diff.ok):
        hints = diagnose(model_sd, sd, diff)
        if entry is not None:
            hints.insert(0, f"{entry.name} is for builder {entry.builder}"
                         + (f" with {entry.builder_kwargs}" if entry.builder_kwargs else ""))
        hint_text = "".join(f"\n  hint: {h}" for h in hints)
        raise WeightsError(f"weights {uri} do not fit {type(model).__name__} ({len(sd)} keys in file, "
                           f"{len(model_sd)} in model):\n{_format_diff(diff)}{hint_text}")
    try:
        result = model.load_state_dict(sd, strict=strict)
    except RuntimeError as exc:
        raise WeightsError(f"loading {uri} into {type(model).__name__} failed: {exc}") from exc
    return WeightsInfo(uri=uri, sha256=digest, entry=entry, num_keys=len(sd),
                       missing_keys=tuple(result.missing_keys), unexpected_keys=tuple(result.unexpected_keys))
