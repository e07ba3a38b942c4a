"""Semantic segmentation heads on the dilated MobileNetV3-Large (torchvision-compatible keys).

Three models share one backbone wrapper whose children are the backbone's feature layers
'0'..'16', so state_dict keys read ``backbone.N.…`` exactly as in torchvision's checkpoints:

* ``lraspp_mobilenet_v3_large``: Lite R-ASPP (stride-8 and stride-16 features), 3.2 M params.
* ``deeplabv3_mobilenet_v3_large``: ASPP head on the stride-16 features (+ an optional FCN
  auxiliary head on the stride-8 features, always present in the official checkpoint).
* ``fcn_mobilenet_v3_large``: an FCN head on the stride-16 features. This one is ours:
  torchvision ships no FCN for MobileNetV3 (its FCNs are ResNet only), so no official
  weights exist for it.

Every model maps an NCHW float batch to a dict with ``out`` (and ``aux`` when the auxiliary
head is on): per-class logits upsampled bilinearly to the input size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mnv3.mobilenetv3 import mobilenet_v3_large

__all__ = [
    "ASPP",
    "FCN",
    "LRASPP",
    "OUTPUT_STRIDE",
    "ASPPConv",
    "ASPPPooling",
    "BackboneFeatures",
    "DeepLabHead",
    "DeepLabV3",
    "FCNHead",
    "LRASPPHead",
    "SegmentationModel",
    "deeplabv3_mobilenet_v3_large",
    "fcn_mobilenet_v3_large",
    "lraspp_mobilenet_v3_large",
    "segmentation_loss",
]

OUTPUT_STRIDE = 16  # the dilated backbone's coarsest feature map is 1/16 of the input
IGNORE_INDEX = 255  # target label that the loss skips (unlabelled / boundary pixels)
AUX_LOSS_WEIGHT = 0.5


class BackboneFeatures(nn.Module):
    """Runs the first layers of a feature ``nn.Sequential`` and returns chosen outputs by name.

    Only the layers up to the last requested one are kept, registered under their original
    indices so parameter keys stay ``<index>.…`` (what the official checkpoints expect).
    """

    def __init__(self, features: nn.Sequential, return_layers: Mapping[str, str]) -> None:
        super().__init__()
        names = [name for name, _ in features.named_children()]
        missing = set(return_layers) - set(names)
        if missing:
            raise ValueError(f"return_layers {sorted(missing)} are not children of the backbone "
                             f"(it has {names[0]}..{names[-1]})")
        last = max(names.index(n) for n in return_layers)
        for name, layer in list(features.named_children())[: last + 1]:
            self.add_module(name, layer)
        self.return_layers = dict(return_layers)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        result: dict[str, Tensor] = {}
        for name, layer in self.named_children():
            x = layer(x)
            if name in self.return_layers:
                result[self.return_layers[name]] = x
        return result


def check_images(x: Tensor) -> None:
    """Reject inputs the segmentation models cannot handle, naming the problem and the fix."""
    if not isinstance(x, Tensor):
        raise TypeError(f"expected an NCHW float tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"expected an NCHW batch (4 dims), got shape {tuple(x.shape)}; "
                         "add a batch dimension with x.unsqueeze(0)")
    if x.shape[1] != 3:
        raise ValueError(f"expected 3 (RGB) channels, got {x.shape[1]} in input of shape {tuple(x.shape)}; "
                         "convert greyscale/RGBA images to RGB first")
    if not x.is_floating_point():
        raise ValueError(f"expected a float tensor (normalized image), got dtype {x.dtype}")
    h, w = x.shape[-2:]
    if h < OUTPUT_STRIDE or w < OUTPUT_STRIDE:
        raise ValueError(f"input of {h}x{w} pixels is smaller than the output stride ({OUTPUT_STRIDE}); "
                         f"resize images so both sides are at least {OUTPUT_STRIDE} "
                         "(the presets use 520 or 320)")


def _upsample(x: Tensor, size: Sequence[int]) -> Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class LRASPPHead(nn.Module):
    """Lite R-ASPP: a sigmoid-gated 1x1 branch on the high features, plus a 1x1 low-feature skip."""

    def __init__(self, low_channels: int, high_channels: int, num_classes: int,
                 inter_channels: int = 128) -> None:
        super().__init__()
        self.cbr = nn.Sequential(
            nn.Conv2d(high_channels, inter_channels, 1, bias=False),
            nn.BatchNorm2d(inter_channels),
            nn.ReLU(inplace=True),
        )
        self.scale = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(high_channels, inter_channels, 1, bias=False),
            nn.Sigmoid(),
        )
        self.low_classifier = nn.Conv2d(low_channels, num_classes, 1)
        self.high_classifier = nn.Conv2d(inter_channels, num_classes, 1)

    def forward(self, features: Mapping[str, Tensor]) -> Tensor:
        low, high = features["low"], features["high"]
        gated = self.cbr(high) * self.scale(high)
        gated = _upsample(gated, low.shape[-2:])
        return self.low_classifier(low) + self.high_classifier(gated)


class LRASPP(nn.Module):
    """Backbone (``low`` and ``high`` features) -> LRASPPHead -> logits at the input size."""

    def __init__(self, backbone: nn.Module, low_channels: int, high_channels: int, num_classes: int,
                 inter_channels: int = 128) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = LRASPPHead(low_channels, high_channels, num_classes, inter_channels)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        check_images(x)
        logits = self.classifier(self.backbone(x))
        return {"out": _upsample(logits, x.shape[-2:])}


class ASPPConv(nn.Sequential):
    """3x3 atrous conv (padding = dilation, so the size is kept) -> BN -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, dilation: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=dilation, dilation=dilation, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        )


class ASPPPooling(nn.Sequential):
    """Image-level context: global average -> 1x1 conv -> BN -> ReLU, broadcast back bilinearly."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        )

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        for layer in self:
            x = layer(x)
        return _upsample(x, size)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, three dilated 3x3 and a pooled branch, fused by 1x1."""

    def __init__(self, in_channels: int, atrous_rates: Sequence[int] = (12, 24, 36),
                 out_channels: int = 256) -> None:
        super().__init__()
        branches: list[nn.Module] = [nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        )]
        branches += [ASPPConv(in_channels, out_channels, rate) for rate in atrous_rates]
        branches.append(ASPPPooling(in_channels, out_channels))
        self.convs = nn.ModuleList(branches)
        self.project = nn.Sequential(
            nn.Conv2d(len(branches) * out_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
            nn.Dropout(0.5),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.project(torch.cat([branch(x) for branch in self.convs], dim=1))


class DeepLabHead(nn.Sequential):
    """ASPP -> 3x3 conv/BN/ReLU -> 1x1 classifier (indices 0..4, as in the checkpoints)."""

    def __init__(self, in_channels: int, num_classes: int,
                 atrous_rates: Sequence[int] = (12, 24, 36)) -> None:
        super().__init__(
            ASPP(in_channels, atrous_rates, 256),
            nn.Conv2d(256, 256, 3, padding=1, bias=False),
            nn.BatchNorm2d(256),
            nn.ReLU(),
            nn.Conv2d(256, num_classes, 1),
        )


class FCNHead(nn.Sequential):
    """3x3 conv to in/4 channels -> BN -> ReLU -> Dropout(0.1) -> 1x1 classifier."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        inter_channels = in_channels // 4
        super().__init__(
            nn.Conv2d(in_channels, inter_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(inter_channels),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Conv2d(inter_channels, num_classes, 1),
        )


class SegmentationModel(nn.Module):
    """Backbone (``out`` and optional ``aux`` features) -> classifier(s) -> logits at input size."""

    def __init__(self, backbone: nn.Module, classifier: nn.Module,
                 aux_classifier: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier
        self.aux_classifier = aux_classifier

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        check_images(x)
        if self.training and x.shape[0] < 2 and _has_pooled_batchnorm(self.classifier):
            raise ValueError("training this model needs a batch of at least 2 images: the pooled "
                             "ASPP branch normalizes one value per channel and image")
        size = x.shape[-2:]
        features = self.backbone(x)
        result = {"out": _upsample(self.classifier(features["out"]), size)}
        if self.aux_classifier is not None:
            result["aux"] = _upsample(self.aux_classifier(features["aux"]), size)
        return result


def _has_pooled_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, ASPPPooling) for m in module.modules())


class DeepLabV3(SegmentationModel):
    """DeepLabV3: ``classifier`` is a DeepLabHead, ``aux_classifier`` an optional FCNHead."""


class FCN(SegmentationModel):
    """Fully convolutional network: ``classifier`` (and the optional ``aux_classifier``) are FCNHeads."""


def segmentation_loss(outputs: Mapping[str, Tensor], target: Tensor) -> Tensor:
    """Training loss: cross-entropy on ``out`` (label 255 ignored) + 0.5 x the same on ``aux``.

    ``target`` is an (N, H, W) integer label map at the logits' size; every label must be in
    [0, num_classes) or be 255.
    """
    if "out" not in outputs:
        raise KeyError(f"outputs must hold 'out' logits, got keys {sorted(outputs)}")
    logits = outputs["out"]
    check_target(target, logits)
    target = target.long()
    loss = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)
    if "aux" in outputs:
        loss = loss + AUX_LOSS_WEIGHT * F.cross_entropy(outputs["aux"], target, ignore_index=IGNORE_INDEX)
    return loss


def check_target(target: Tensor, logits: Tensor) -> None:
    """Validate a label map against (N, C, H, W) logits, with an error that says what is wrong."""
    if target.is_floating_point() or target.dtype == torch.bool:
        raise ValueError(f"target must be an integer label map, got dtype {target.dtype}")
    n, num_classes, h, w = logits.shape
    if tuple(target.shape) != (n, h, w):
        raise ValueError(f"target shape {tuple(target.shape)} does not match the logits: expected "
                         f"{(n, h, w)} (batch, height, width of 'out')")
    bad = (target != IGNORE_INDEX) & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        values = torch.unique(target[bad])[:10].tolist()
        raise ValueError(f"target holds labels {values} outside [0, {num_classes}) that are not the ignore "
                         f"label {IGNORE_INDEX}; remap them or mark them {IGNORE_INDEX}")


# ---------------------------------------------------------------------------------------------
# Builders


def _stage_indices(features: nn.Sequential) -> list[int]:
    """First layer, every block that starts a new stride, and the last layer."""
    cn = [i for i, layer in enumerate(features) if getattr(layer, "_is_cn", False)]
    return [0, *cn, len(features) - 1]


def _dilated_backbone(weights: str | None, weights_backbone: str | None) -> tuple[nn.Sequential, int, int]:
    """The dilated MobileNetV3-Large features and the (stride-8, stride-16) layer indices."""
    if weights is not None:
        weights_backbone = None  # the full checkpoint already holds the backbone
    features = mobilenet_v3_large(weights=weights_backbone, dilated=True).features
    stages = _stage_indices(features)
    return features, stages[-4], stages[-1]


def _load(model: nn.Module, weights: str | None) -> nn.Module:
    if weights is not None:
        from mnv3.weights import load_weights

        load_weights(model, weights)
    return model


def _check_num_classes(num_classes: int) -> None:
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")


def lraspp_mobilenet_v3_large(*, weights: str | None = None, num_classes: int = 21,
                              weights_backbone: str | None = None, aux_loss: bool | None = None,
                              inter_channels: int = 128, **kwargs: Any) -> LRASPP:
    """Lite R-ASPP on the dilated MobileNetV3-Large (3,221,538 params with 21 classes).

    ``weights``: a registry name or file URI of a full checkpoint (it then replaces
    ``weights_backbone``). ``weights_backbone``: ImageNet weights for the backbone only, e.g.
    to start training; nothing is downloaded unless one of them is given.
    """
    if aux_loss:
        raise NotImplementedError("LR-ASPP has no auxiliary head; call it with aux_loss=None/False")
    if kwargs:
        raise TypeError(f"lraspp_mobilenet_v3_large got unexpected arguments {sorted(kwargs)}")
    _check_num_classes(num_classes)
    features, low, high = _dilated_backbone(weights, weights_backbone)
    backbone = BackboneFeatures(features, {str(low): "low", str(high): "high"})
    model = LRASPP(backbone, features[low].out_channels, features[high].out_channels, num_classes,
                   inter_channels)
    return _load(model, weights)


def deeplabv3_mobilenet_v3_large(*, weights: str | None = None, num_classes: int = 21,
                                 aux_loss: bool | None = None, weights_backbone: str | None = None,
                                 **kwargs: Any) -> DeepLabV3:
    """DeepLabV3 on the dilated MobileNetV3-Large (11,025,477 params; 11,029,328 with aux).

    The auxiliary FCN head on the stride-8 features is on when ``aux_loss`` is true, and is
    forced on when ``weights`` is given (the official checkpoint contains it).
    """
    if kwargs:
        raise TypeError(f"deeplabv3_mobilenet_v3_large got unexpected arguments {sorted(kwargs)}")
    _check_num_classes(num_classes)
    aux = _aux_with_weights(aux_loss, weights)
    features, low, high = _dilated_backbone(weights, weights_backbone)
    return_layers = {str(high): "out"}
    if aux:
        return_layers[str(low)] = "aux"
    model = DeepLabV3(
        BackboneFeatures(features, return_layers),
        DeepLabHead(features[high].out_channels, num_classes),
        FCNHead(features[low].out_channels, num_classes) if aux else None,
    )
    return _load(model, weights)


def fcn_mobilenet_v3_large(*, weights: str | None = None, num_classes: int = 21,
                           aux_loss: bool | None = None, weights_backbone: str | None = None,
                           **kwargs: Any) -> FCN:
    """FCN on the dilated MobileNetV3-Large: ours, not in torchvision (no official weights).

    FCNHead(960 -> 240 -> classes) on the stride-16 features; with ``aux_loss`` an FCNHead(40)
    on the stride-8 features, as DeepLabV3's. 5,051,093 params with 21 classes
    (5,054,944 with aux). ``weights`` loads a checkpoint saved from this model.
    """
    if kwargs:
        raise TypeError(f"fcn_mobilenet_v3_large got unexpected arguments {sorted(kwargs)}")
    _check_num_classes(num_classes)
    features, low, high = _dilated_backbone(weights, weights_backbone)
    return_layers = {str(high): "out"}
    if aux_loss:
        return_layers[str(low)] = "aux"
    model = FCN(
        BackboneFeatures(features, return_layers),
        FCNHead(features[high].out_channels, num_classes),
        FCNHead(features[low].out_channels, num_classes) if aux_loss else None,
    )
    return _load(model, weights)


def _aux_with_weights(aux_loss: bool | None, weights: str | None) -> bool:
    if weights is None:
        return bool(aux_loss)
    if aux_loss is not None and not aux_loss:
        raise ValueError(f"weights {weights!r} contain the auxiliary head, so aux_loss must be True or None "
                         f"(got {aux_loss!r}); drop the aux head after loading if you do not need it")
    return True
