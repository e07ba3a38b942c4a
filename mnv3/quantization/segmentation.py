"""Int8 LR-ASPP and DeepLabV3 on MobileNetV3-Large: backbone and heads quantized.

One int8 graph runs from the normalized image to the head's logits at 1/8 (LR-ASPP) or
1/16 (DeepLabV3) resolution: the dilated backbone, the LR-ASPP gate (sigmoid and the
gate multiply as observed ops) and branch sum, or the ASPP branches (observed concat) and
the DeepLab/FCN heads. The logits are dequantized before the final bilinear upsampling to
the input size, which stays float. Module names are the float models', so float
checkpoints load unchanged.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from mnv3.quantization.backbone import swap_feature_layers
from mnv3.quantization.blocks import TransparentWrapper, fuse_tree, replace_relu
from mnv3.quantization.torch_ao import nnq, quiet, tq

BUILDERS = ("lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large")


def _upsample(x: Tensor, size: Any) -> Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def _upsample_logits(x: Tensor, size: Any) -> Tensor:
    # Dequantized logits keep the int8 kernels' channels-last layout; the float bilinear
    # upsampling to the input size (a third of int8 LR-ASPP's time at 520) is ~2x faster from
    # it than from NCHW (4 vs 8 ms for 21x65x65 -> 520x520), and so is a later argmax over
    # classes. The output stays channels-last: same values, other strides than fp32's.
    return _upsample(x, size)


class QuantizableSegmenter(TransparentWrapper):
    """Wraps an LRASPP or DeepLabV3 model; its module tree (and state_dict keys) are kept."""

    _inner = "model"

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        from mnv3.segmentation import LRASPP

        swap_feature_layers(model.backbone)
        replace_relu(model)
        self.model = model
        self.is_lraspp = isinstance(model, LRASPP)
        with quiet():
            self.quant = tq.QuantStub()
            self.dequant = tq.DeQuantStub()
            self.dequant_aux = tq.DeQuantStub()
            self.gate_mul = nnq.FloatFunctional()  # LR-ASPP: cbr(high) * scale(high)
            self.head_add = nnq.FloatFunctional()  # LR-ASPP: low + high classifier
            self.aspp_cat = nnq.FloatFunctional()  # DeepLabV3: concat of the ASPP branches

    def _lraspp(self, feats: dict[str, Tensor]) -> Tensor:
        head = self.model.classifier
        low, high = feats["low"], feats["high"]
        gated = self.gate_mul.mul(head.cbr(high), head.scale(high))
        gated = _upsample(gated, low.shape[-2:])
        return self.head_add.add(head.low_classifier(low), head.high_classifier(gated))

    def _deeplab(self, x: Tensor) -> Tensor:
        head = self.model.classifier
        aspp = head[0]
        y = aspp.project(self.aspp_cat.cat([branch(x) for branch in aspp.convs], dim=1))
        for layer in list(head)[1:]:
            y = layer(y)
        return y

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        from mnv3.segmentation import check_images

        check_images(x)
        size = x.shape[-2:]
        feats = self.model.backbone(self.quant(x))
        if self.is_lraspp:
            return {"out": _upsample_logits(self.dequant(self._lraspp(feats)), size)}
        out = {"out": _upsample_logits(self.dequant(self._deeplab(feats["out"])), size)}
        if self.model.aux_classifier is not None:
            out["aux"] = _upsample_logits(self.dequant_aux(self.model.aux_classifier(feats["aux"])), size)
        return out

    def fuse_model(self, is_qat: bool | None = None) -> None:
        fuse_tree(self.model, is_qat)


def quantizable_segmenter(builder: str, **kwargs: Any) -> QuantizableSegmenter:
    """The float segmenter from ``mnv3.segmentation`` in quantizable form (eval mode)."""
    import mnv3.segmentation as seg

    if builder not in BUILDERS:
        raise ValueError(f"unknown segmentation builder {builder!r}; choose one of {list(BUILDERS)}")
    return QuantizableSegmenter(getattr(seg, builder)(**kwargs).eval()).eval()
