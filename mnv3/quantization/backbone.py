"""Turn the MobileNetV3 feature layers inside a detector or segmenter into quantizable ones.

The dense models hold MobileNetV3-Large feature layers under their own container
(``backbone.body`` for Faster R-CNN, ``backbone`` for the segmenters). We swap those layers
for the quantizable blocks (FloatFunctional skip add and SE multiply, non-inplace ReLU,
plain BatchNorm2d in place of FrozenBatchNorm2d so conv+BN can be fused) and load the
original weights back: parameter names do not change.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from torch import nn

from mnv3.layers import FrozenBatchNorm2d
from mnv3.mobilenetv3 import InvertedResidual


def _norm_eps(layers: nn.Module) -> float:
    for m in layers.modules():
        if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
            return float(m.eps)
    return 1e-3


def _is_dilated(layers: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) and m.dilation[0] > 1 for m in layers.modules())


def swap_feature_layers(container: nn.Module) -> None:
    """Replace the children of ``container`` (named "0".."N", MobileNetV3-Large features) in place.

    The replacement layers carry the same parameter names and receive the original weights
    (FrozenBatchNorm2d statistics become BatchNorm2d buffers, eval mode).
    """
    from mnv3.quantization.mobilenetv3 import mobilenet_v3_large

    if not any(isinstance(m, InvertedResidual) for m in container.children()):
        raise ValueError(f"{type(container).__name__} holds no MobileNetV3 blocks to make quantizable")
    state = container.state_dict()
    norm = partial(nn.BatchNorm2d, eps=_norm_eps(container))
    q = mobilenet_v3_large(dilated=_is_dilated(container), norm_layer=norm)
    for name, _ in list(container.named_children()):
        container._modules[name] = q.features[int(name)]
    result = container.load_state_dict(state, strict=False)
    _check_only_bn_counters(result, type(container).__name__)
    container.eval()


def _check_only_bn_counters(result: Any, where: str) -> None:
    bad = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    bad += list(result.unexpected_keys)
    if bad:
        raise RuntimeError(f"making {where} quantizable changed its parameters: {bad[:8]}")
