"""MobileNetV3 Large/Small classification models (torchvision-compatible state_dicts).

The block tables, channel rounding, init scheme and forward follow torchvision 0.29 so
an official checkpoint loads with ``strict=True`` and gives the same logits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from mnv3.layers import ConvNormActivation, SqueezeExcitation, make_divisible

__all__ = [
    "BlockConfig",
    "InvertedResidual",
    "MobileNetV3",
    "block_configs",
    "mobilenet_v3_large",
    "mobilenet_v3_small",
]


@dataclass(frozen=True)
class BlockConfig:
    """One inverted-residual block, channels already scaled by ``width_mult``."""

    input_channels: int
    kernel: int
    expanded_channels: int
    out_channels: int
    use_se: bool
    use_hs: bool
    stride: int
    dilation: int

    @classmethod
    def make(cls, inp: int, kernel: int, exp: int, out: int, se: bool, act: str, stride: int,
             dilation: int, width_mult: float) -> BlockConfig:
        if act not in ("RE", "HS"):
            raise ValueError(f"activation must be 'RE' or 'HS', got {act!r}")
        return cls(
            scale_channels(inp, width_mult), kernel, scale_channels(exp, width_mult),
            scale_channels(out, width_mult), se, act == "HS", stride, dilation,
        )


def scale_channels(channels: float, width_mult: float) -> int:
    """Channels after the width multiplier, rounded to a multiple of 8."""
    return make_divisible(channels * width_mult, 8)


class InvertedResidual(nn.Module):
    """expand 1x1 (if needed) -> depthwise kxk -> SE (optional) -> project 1x1 (+ residual)."""

    def __init__(
        self,
        cnf: BlockConfig,
        norm_layer: Callable[..., nn.Module],
        se_layer: Callable[..., nn.Module] = SqueezeExcitation,
    ) -> None:
        super().__init__()
        if cnf.stride not in (1, 2):
            raise ValueError(f"block stride must be 1 or 2, got {cnf.stride}")
        self.use_res_connect = cnf.stride == 1 and cnf.input_channels == cnf.out_channels
        activation = nn.Hardswish if cnf.use_hs else nn.ReLU
        layers: list[nn.Module] = []
        if cnf.expanded_channels != cnf.input_channels:
            layers.append(ConvNormActivation(cnf.input_channels, cnf.expanded_channels, 1,
                                             norm_layer=norm_layer, activation_layer=activation))
        dw_stride = 1 if cnf.dilation > 1 else cnf.stride
        layers.append(ConvNormActivation(
            cnf.expanded_channels, cnf.expanded_channels, cnf.kernel, stride=dw_stride,
            dilation=cnf.dilation, groups=cnf.expanded_channels, norm_layer=norm_layer,
            activation_layer=activation,
        ))
        if cnf.use_se:
            squeeze = make_divisible(cnf.expanded_channels // 4, 8)
            layers.append(se_layer(cnf.expanded_channels, squeeze))
        layers.append(ConvNormActivation(cnf.expanded_channels, cnf.out_channels, 1,
                                         norm_layer=norm_layer, activation_layer=None))
        self.block = nn.Sequential(*layers)
        self.out_channels = cnf.out_channels
        # A "C-n" boundary: the block that starts a new output stride (kept True when dilated).
        self._is_cn = cnf.stride > 1

    def forward(self, x: Tensor) -> Tensor:
        result = self.block(x)
        if self.use_res_connect:
            result += x
        return result


def default_norm_layer() -> Callable[..., nn.Module]:
    """BatchNorm as trained for MobileNetV3 (eps 1e-3, momentum 0.01)."""
    return partial(nn.BatchNorm2d, eps=0.001, momentum=0.01)


class MobileNetV3(nn.Module):
    """``features`` -> global average pool -> two-layer classifier."""

    def __init__(
        self,
        inverted_residual_setting: Sequence[BlockConfig],
        last_channel: int,
        num_classes: int = 1000,
        block: Callable[..., nn.Module] | None = None,
        norm_layer: Callable[..., nn.Module] | None = None,
        dropout: float = 0.2,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if not inverted_residual_setting:
            raise ValueError("inverted_residual_setting must not be empty")
        if not all(isinstance(c, BlockConfig) for c in inverted_residual_setting):
            raise TypeError("inverted_residual_setting must be a sequence of BlockConfig")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        block = block or InvertedResidual
        norm_layer = norm_layer or default_norm_layer()

        first_out = inverted_residual_setting[0].input_channels
        layers: list[nn.Module] = [ConvNormActivation(3, first_out, 3, stride=2, norm_layer=norm_layer,
                                                      activation_layer=nn.Hardswish)]
        layers += [block(cnf, norm_layer) for cnf in inverted_residual_setting]
        last_in = inverted_residual_setting[-1].out_channels
        last_out = 6 * last_in
        layers.append(ConvNormActivation(last_in, last_out, 1, norm_layer=norm_layer,
                                         activation_layer=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(last_out, last_channel),
            nn.Hardswish(inplace=True),
            nn.Dropout(p=dropout, inplace=True),
            nn.Linear(last_channel, num_classes),
        )
        init_weights(self)

    def _forward_impl(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)

    def forward(self, x: Tensor) -> Tensor:
        return self._forward_impl(x)


def init_weights(model: nn.Module) -> None:
    """He-normal (fan_out) convs, unit/zero norms, N(0, 0.01) linears, zero biases."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


_LARGE = [
    # in, k, exp, out, se, act, stride
    (16, 3, 16, 16, False, "RE", 1),
    (16, 3, 64, 24, False, "RE", 2),
    (24, 3, 72, 24, False, "RE", 1),
    (24, 5, 72, 40, True, "RE", 2),
    (40, 5, 120, 40, True, "RE", 1),
    (40, 5, 120, 40, True, "RE", 1),
    (40, 3, 240, 80, False, "HS", 2),
    (80, 3, 200, 80, False, "HS", 1),
    (80, 3, 184, 80, False, "HS", 1),
    (80, 3, 184, 80, False, "HS", 1),
    (80, 3, 480, 112, True, "HS", 1),
    (112, 3, 672, 112, True, "HS", 1),
]
_SMALL = [
    (16, 3, 16, 16, True, "RE", 2),
    (16, 3, 72, 24, False, "RE", 2),
    (24, 3, 88, 24, False, "RE", 1),
    (24, 5, 96, 40, True, "HS", 2),
    (40, 5, 240, 40, True, "HS", 1),
    (40, 5, 240, 40, True, "HS", 1),
    (40, 5, 120, 48, True, "HS", 1),
    (48, 5, 144, 48, True, "HS", 1),
]


def block_configs(arch: str, width_mult: float = 1.0, reduced_tail: bool = False,
                  dilated: bool = False) -> tuple[list[BlockConfig], int]:
    """Block table and classifier hidden size for ``arch`` in {"large", "small"}.

    ``reduced_tail`` halves the channels of the last stage (C4); ``dilated`` runs that stage
    at dilation 2 so the output stride is 16 instead of 32 (used by segmentation).
    """
    if width_mult <= 0:
        raise ValueError(f"width_mult must be > 0, got {width_mult}")
    rd = 2 if reduced_tail else 1
    dil = 2 if dilated else 1
    if arch == "large":
        head, c4_in, c4_out, c4_exp, c4_first_exp, last = _LARGE, 112, 160, 960, 672, 1280
    elif arch == "small":
        head, c4_in, c4_out, c4_exp, c4_first_exp, last = _SMALL, 48, 96, 576, 288, 1024
    else:
        raise ValueError(f"arch must be 'large' or 'small', got {arch!r}")
    rows = [(*r, 1) for r in head]
    rows += [
        (c4_in, 5, c4_first_exp, c4_out // rd, True, "HS", 2, dil),
        (c4_out // rd, 5, c4_exp // rd, c4_out // rd, True, "HS", 1, dil),
        (c4_out // rd, 5, c4_exp // rd, c4_out // rd, True, "HS", 1, dil),
    ]
    configs = [BlockConfig.make(*r, width_mult=width_mult) for r in rows]
    return configs, scale_channels(last // rd, width_mult)


def _build(arch: str, weights: str | None, width_mult: float, reduced_tail: bool, dilated: bool,
           **kwargs: Any) -> MobileNetV3:
    configs, last_channel = block_configs(arch, width_mult, reduced_tail, dilated)
    model = MobileNetV3(configs, last_channel, **kwargs)
    if weights is not None:
        from mnv3.weights import load_weights

        load_weights(model, weights)
    return model


def mobilenet_v3_large(*, weights: str | None = None, num_classes: int = 1000, width_mult: float = 1.0,
                       reduced_tail: bool = False, dilated: bool = False, dropout: float = 0.2,
                       norm_layer: Callable[..., nn.Module] | None = None, **kwargs: Any) -> MobileNetV3:
    """MobileNetV3-Large. ``weights``: a registry name or a file URI (local, s3://, https://)."""
    return _build("large", weights, width_mult, reduced_tail, dilated, num_classes=num_classes,
                  dropout=dropout, norm_layer=norm_layer, **kwargs)


def mobilenet_v3_small(*, weights: str | None = None, num_classes: int = 1000, width_mult: float = 1.0,
                       reduced_tail: bool = False, dilated: bool = False, dropout: float = 0.2,
                       norm_layer: Callable[..., nn.Module] | None = None, **kwargs: Any) -> MobileNetV3:
    """MobileNetV3-Small. ``weights``: a registry name or a file URI (local, s3://, https://)."""
    return _build("small", weights, width_mult, reduced_tail, dilated, num_classes=num_classes,
                  dropout=dropout, norm_layer=norm_layer, **kwargs)
