"""Export of a fine-tuned model: a torchvision-format state_dict plus a JSON sidecar.

The weights file is named ``<builder>-<sha256[:8]>.pth`` (so ``mnv3.weights`` checks its hash on
every load) and the sidecar ``<builder>-<sha256[:8]>.json`` sits beside it: the same URI with
``.json`` in place of ``.pth``. The sidecar says everything the annotate job needs to run the
model with no other setting (builder, classes and their names, input sizes, precision) plus
the validation metrics and the lineage of the run (format: ``SIDECAR_FORMAT``).

Detectors trained from scratch carry BatchNorm2d in the backbone; their export drops the
``num_batches_tracked`` counters so the file has torchvision's trained detector layout
(FrozenBatchNorm2d, 284 keys), which is how the detection builders load a full checkpoint.
Both norms use eps 1e-5 there, so the numbers are unchanged.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import posixpath
from collections.abc import Mapping
from typing import Any

import torch

from mnv3.transforms import IMAGENET_MEAN, IMAGENET_STD
from pipeline import storage

SIDECAR_FORMAT = "mnv3-finetune-export/1"


def sidecar_uri(weights_uri: str) -> str:
    """The sidecar of a weights URI: ``.pth``/``.pt`` replaced by ``.json``."""
    stem, ext = posixpath.splitext(weights_uri)
    if ext not in (".pth", ".pt"):
        raise ValueError(f"weights URI {weights_uri!r} does not end in .pth or .pt")
    return stem + ".json"


def torchvision_layout(task: str, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state_dict as torchvision's builders save it for ``task`` (see the module docstring)."""
    sd = {k: v.detach().clone().contiguous() for k, v in state_dict.items()}
    if task == "detect":
        sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    return sd


def preprocessing(task: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """What the model expects as input, in words and numbers (mirrors ``mnv3.transforms``)."""
    base = {"input": "RGB float in [0, 1]", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    if task == "detect":
        return {
            **base,
            "resize": "inside the model: shorter side to min_size, longer side at most max_size",
            "min_size": params.get("min_size"),
            "max_size": params.get("max_size"),
        }
    if task == "segment":
        return {
            **base,
            "resize": "shorter side to resize_size (bilinear, antialias)",
            "resize_size": params.get("resize_size"),
        }
    return {
        **base,
        "resize": "shorter side to resize_size, centre crop crop_size",
        "resize_size": params.get("resize_size"),
        "crop_size": params.get("crop_size"),
    }


def export_model(
    output_url: str,
    *,
    task: str,
    builder: str,
    state_dict: Mapping[str, torch.Tensor],
    labels: list[str],
    categories: list[dict],
    params: Mapping[str, Any],
    metrics: Mapping[str, Any],
    lineage: Mapping[str, Any],
    precision: str = "fp32",
    quantization: Mapping[str, Any] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> tuple[str, str]:
    """Write the weights and sidecar under ``output_url``; returns (weights URI, sidecar URI)."""
    sd = torchvision_layout(task, state_dict)
    buf = io.BytesIO()
    torch.save(sd, buf)
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    name = f"{builder}-{digest[:8]}.pth"
    fs, root = storage.open_fs(output_url, storage_options)
    storage.write_bytes_atomic(fs, storage.join(root, name), data)
    weights_uri = storage.join(output_url, name)
    sidecar = {
        "format": SIDECAR_FORMAT,
        "task": task,
        "builder": builder,
        "weights": name,
        "sha256": digest,
        "num_classes": len(labels),
        "labels": list(labels),
        "categories": list(categories),
        "precision": precision,
        "quantization": dict(quantization) if quantization else None,
        "params": {k: v for k, v in params.items() if v is not None},
        "preprocessing": preprocessing(task, params),
        "metrics": dict(metrics),
        "lineage": {
            **lineage,
            "exported_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "num_keys": len(sd),
        },
    }
    return weights_uri, write_sidecar(weights_uri, sidecar, storage_options)


def write_sidecar(weights_uri: str, sidecar: Mapping[str, Any],
                  storage_options: Mapping[str, Any] | None = None) -> str:
    """Write ``sidecar`` beside ``weights_uri`` (``.json`` in place of ``.pth``/``.pt``); returns its URI."""
    uri = sidecar_uri(weights_uri)
    fs, path = storage.open_fs(uri, storage_options)
    storage.write_bytes_atomic(fs, path, json.dumps(sidecar, indent=2, default=str).encode())
    return uri


def int8_sidecar(source: Mapping[str, Any], artifact_uri: str, artifact: bytes,
                 quantization: Mapping[str, Any]) -> dict[str, Any]:
    """The sidecar of an int8 artifact made from a fine-tuned export: the source's labels, sizes and
    metrics, with the artifact's own name, hash and ``precision: int8``, so ``annotate`` runs
    it from ``tasks.<task>.weights`` alone."""
    return {
        **source,
        "weights": posixpath.basename(artifact_uri),
        "sha256": hashlib.sha256(artifact).hexdigest(),
        "precision": "int8",
        "quantization": dict(quantization),
        "lineage": {**source.get("lineage", {}), "quantized_from": source.get("weights"),
                    "quantized_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")},
    }


def builder_kwargs(sidecar: Mapping[str, Any]) -> dict[str, Any]:
    """Builder arguments that rebuild an exported model as it was trained (classes, detector sizes)."""
    kwargs: dict[str, Any] = {"num_classes": int(sidecar["num_classes"])}
    if sidecar["task"] == "detect":
        params = sidecar.get("params", {})
        kwargs.update({k: params[k] for k in ("min_size", "max_size") if params.get(k)})
    return kwargs


def read_sidecar(weights_uri: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The sidecar JSON of an exported weights URI (FileNotFoundError when there is none)."""
    uri = sidecar_uri(weights_uri)
    fs, path = storage.open_fs(uri, storage_options)
    with fs.open(path, "rb") as f:
        side = json.load(f)
    if side.get("format") != SIDECAR_FORMAT:
        raise ValueError(
            f"{uri} is not a finetune export sidecar (format {side.get('format')!r}, expected "
            f"{SIDECAR_FORMAT!r})"
        )
    return side


def config_overrides(sidecar: Mapping[str, Any], weights_uri: str) -> dict[str, Any]:
    """The annotate config keys (``tasks.<task>.*``) that run an exported model as it was validated.

    This is the contract between the finetune export and the annotate job: given only the
    weights URI, annotate reads the sidecar and applies these keys (explicit user settings win).
    """
    task = sidecar["task"]
    out: dict[str, Any] = {
        f"tasks.{task}.enabled": True,
        f"tasks.{task}.builder": sidecar["builder"],
        f"tasks.{task}.weights": weights_uri,
        f"tasks.{task}.sha256": sidecar["sha256"],
        f"tasks.{task}.labels": list(sidecar["labels"]),
        f"tasks.{task}.num_classes": int(sidecar["num_classes"]),
        f"tasks.{task}.precision": sidecar.get("precision", "fp32"),
    }
    keys = {"detect": ("min_size", "max_size"), "segment": ("resize_size",),
            "classify": ("resize_size", "crop_size")}[task]
    for key in keys:
        if sidecar.get("params", {}).get(key) is not None:
            out[f"tasks.{task}.{key}"] = sidecar["params"][key]
    return out
