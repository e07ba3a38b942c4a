"""Building the model to fine-tune: builder + new head size + starting weights (or none).

Starting weights are any torchvision-format checkpoint URI (official registry name, our own
export, a file on S3). Keys whose shapes differ from the new model (the class heads when
the number of classes changes) are left at their fresh initialisation; an ImageNet
classifier checkpoint given to a detector or segmenter initialises its backbone only.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

DEFAULT_BUILDERS = {
    "detect": "fasterrcnn_mobilenet_v3_large_320_fpn",
    "segment": "lraspp_mobilenet_v3_large",
    "classify": "mobilenet_v3_large",
}
_MODULES = {"detect": "mnv3.detection", "segment": "mnv3.segmentation", "classify": "mnv3.mobilenetv3"}


@dataclass
class InitReport:
    """What the starting weights did: loaded keys, keys left fresh (e.g. the new head), source."""

    uri: str | None
    loaded: int = 0
    fresh: list[str] = field(default_factory=list)
    kind: str = "scratch"  # scratch | full | backbone


def builder_fn(task: str, builder: str, qat: bool = False):
    """The mnv3 builder called ``builder`` for ``task`` (the quantizable one for QAT)."""
    if qat:
        if task != "classify":
            raise ValueError(
                f"quantization-aware training is available for classification only, not {task!r}; "
                "turn finetune.qat off"
            )
        module = importlib.import_module("mnv3.quantization")
    else:
        module = importlib.import_module(_MODULES[task])
    fn = getattr(module, builder, None)
    if fn is None:
        raise ValueError(f"finetune.builder {builder!r} is not a {task} builder in {module.__name__}")
    return fn


def _read_init(uri: str, storage_options: Mapping[str, Any] | None) -> dict[str, torch.Tensor]:
    from mnv3.weights import read_state_dict, resolve

    resolved, entry = resolve(uri, storage_options=storage_options)
    sd, _ = read_state_dict(
        resolved,
        sha256=entry.sha256_prefix if entry else None,
        storage_options=None if entry is not None and resolved == entry.url else storage_options,
    )
    return sd


def _is_classifier_sd(sd: Mapping[str, Any]) -> bool:
    return any(k.startswith("features.") for k in sd) and not any(k.startswith("backbone.") for k in sd)


def load_matching(
    model: nn.Module, sd: Mapping[str, torch.Tensor], prefix_map: tuple[str, str] = ("", "")
) -> tuple[int, list[str]]:
    """Copy every tensor of ``sd`` whose (renamed) key and shape exist in ``model``; returns
    (number loaded, model keys left as initialised)."""
    src, dst = prefix_map
    own = model.state_dict()
    picked = {}
    for key, value in sd.items():
        if not key.startswith(src):
            continue
        name = dst + key[len(src) :]
        if name in own and tuple(own[name].shape) == tuple(value.shape):
            picked[name] = value
    model.load_state_dict(picked, strict=False)
    return len(picked), sorted(k for k in own if k not in picked and not k.endswith("num_batches_tracked"))


def build_model(
    task: str,
    builder: str,
    num_classes: int,
    init: str | None = None,
    *,
    storage_options: Mapping[str, Any] | None = None,
    trainable_backbone_layers: int | None = None,
    detector_kwargs: Mapping[str, Any] | None = None,
    aux_loss: bool = False,
    qat: bool = False,
    qat_backend: str | None = None,
) -> tuple[nn.Module, InitReport]:
    """The model to train for ``task`` with ``num_classes`` outputs, initialised from ``init``."""
    fn = builder_fn(task, builder, qat)
    sd = _read_init(init, storage_options) if init else None
    report = InitReport(init)
    if task == "detect":
        kwargs = dict(detector_kwargs or {})
        full = sd is not None and not _is_classifier_sd(sd)
        # A full detector checkpoint is torchvision's trained layout (FrozenBatchNorm2d); a classifier
        # checkpoint goes into the backbone; from scratch the backbone trains with BatchNorm2d.
        if full:
            model = fn(
                num_classes=num_classes,
                frozen_bn=True,
                trainable_backbone_layers=trainable_backbone_layers,
                **kwargs,
            )
        elif sd is not None:
            model = fn(
                num_classes=num_classes,
                frozen_bn=True,
                trainable_backbone_layers=trainable_backbone_layers,
                **kwargs,
            )
        else:
            model = fn(num_classes=num_classes, **kwargs)
        if sd is not None:
            mapping = ("", "") if full else ("features.", "backbone.body.")
            report.loaded, report.fresh = load_matching(model, sd, mapping)
            report.kind = "full" if full else "backbone"
    elif task == "segment":
        model = (
            fn(num_classes=num_classes, aux_loss=aux_loss)
            if "deeplab" in builder
            else fn(num_classes=num_classes)
        )
        if sd is not None:
            mapping = ("features.", "backbone.") if _is_classifier_sd(sd) else ("", "")
            report.loaded, report.fresh = load_matching(model, sd, mapping)
            report.kind = "backbone" if mapping[0] else "full"
    else:
        model = fn(num_classes=num_classes)
        if sd is not None:
            report.loaded, report.fresh = load_matching(model, sd)
            report.kind = "full"
        if qat:
            from mnv3.quantization import prepare_qat

            prepare_qat(model, qat_backend)
    if sd is not None and report.loaded == 0:
        raise ValueError(
            f"initial weights {init!r} share no key and shape with {builder}; pass a checkpoint of "
            "this model family (or its ImageNet backbone)"
        )
    return model, report
