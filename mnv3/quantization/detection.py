"""Int8 Faster R-CNN MobileNetV3-Large FPN (both variants): what torchvision does not have.

Quantized: the backbone body and the FPN (one int8 graph from the normalized, resized
image batch to the FPN maps), the RPN head's shared 3x3 conv (+ReLU) and the box head's
two Linear layers (fc6/fc7 with their ReLUs fused, static int8). Float: the image
transform, the RPN's objectness/delta 1x1 convs, anchors and NMS, RoI Align, the box
predictor and all box logic, which need float precision or are cheap.
The model keeps torchvision's module names, so float checkpoints load unchanged.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from mnv3.detection.rpn import RPNHead
from mnv3.quantization.backbone import swap_feature_layers
from mnv3.quantization.blocks import TransparentWrapper, fuse, fuse_tree, replace_relu
from mnv3.quantization.torch_ao import nnq, quiet, tq

BUILDERS = ("fasterrcnn_mobilenet_v3_large_fpn", "fasterrcnn_mobilenet_v3_large_320_fpn")


class QuantizableBackboneWithFPN(nn.Module):
    """Quantize -> feature body -> FPN (observed adds) -> dequantize each map; names as BackboneWithFPN."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.body = original.body
        self.fpn = original.fpn
        self.return_layers = dict(original.return_layers)
        self.out_channels = original.out_channels
        with quiet():
            self.quant = tq.QuantStub()
            self.dequant = tq.DeQuantStub()
            self.fpn_add = nn.ModuleList(nnq.FloatFunctional() for _ in self.fpn.inner_blocks)

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        x = self.quant(x)
        taps: OrderedDict[str, Tensor] = OrderedDict()
        for name, layer in self.body.named_children():
            x = layer(x)
            if name in self.return_layers:
                taps[self.return_layers[name]] = x
        names, feats = list(taps.keys()), list(taps.values())
        inner, layer_blocks = self.fpn.inner_blocks, self.fpn.layer_blocks
        last_inner = inner[-1](feats[-1])
        results = [layer_blocks[-1](last_inner)]
        for idx in range(len(feats) - 2, -1, -1):
            lateral = inner[idx](feats[idx])
            top_down = F.interpolate(last_inner, size=lateral.shape[-2:], mode="nearest")
            last_inner = self.fpn_add[idx].add(lateral, top_down)
            results.insert(0, layer_blocks[idx](last_inner))
        results.append(F.max_pool2d(results[-1], 1, 2, 0))
        names.append("pool")
        return OrderedDict((n, self.dequant(r)) for n, r in zip(names, results))


class QuantizableTwoMLPHead(nn.Module):
    """flatten -> fc6 -> ReLU -> fc7 -> ReLU between quant/dequant stubs; keys ``fc6.*``/``fc7.*``."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.fc6 = original.fc6
        self.fc7 = original.fc7
        self.relu6 = nn.ReLU()
        self.relu7 = nn.ReLU()
        with quiet():
            self.quant = tq.QuantStub()
            self.dequant = tq.DeQuantStub()

    def forward(self, x: Tensor) -> Tensor:
        x = self.quant(x.flatten(start_dim=1))
        return self.dequant(self.relu7(self.fc7(self.relu6(self.fc6(x)))))

    def fuse_model(self, is_qat: bool | None = None) -> None:
        fuse(self, [["fc6", "relu6"], ["fc7", "relu7"]], is_qat)


class QuantizableRPNHead(RPNHead):
    """The RPN head with its shared conv between quant/dequant stubs; the 1x1 outputs stay float.

    A subclass of the float head (same keys, same old-checkpoint migration).
    """

    def __init__(self, in_channels: int, num_anchors: int) -> None:
        super().__init__(in_channels, num_anchors)
        with quiet():
            self.quant = tq.QuantStub()
            self.dequant = tq.DeQuantStub()
        replace_relu(self)

    def forward(self, x: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        logits, deltas = [], []
        for feature in x:
            t = self.dequant(self.conv(self.quant(feature)))
            logits.append(self.cls_logits(t))
            deltas.append(self.bbox_pred(t))
        return logits, deltas

    def set_qconfig(self, qconfig: Any) -> None:
        self.qconfig = qconfig
        self.cls_logits.qconfig = None
        self.bbox_pred.qconfig = None

    @classmethod
    def from_float(cls, original: nn.Module) -> QuantizableRPNHead:
        head = cls(original.cls_logits.in_channels, original.cls_logits.out_channels)
        head.load_state_dict(original.state_dict())
        return head.train(original.training)


class QuantizableDetector(TransparentWrapper):
    """Wraps a FasterRCNN; ``detector`` keeps its module tree (state_dict keys unchanged)."""

    _inner = "detector"

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        swap_feature_layers(detector.backbone.body)
        detector.backbone = QuantizableBackboneWithFPN(detector.backbone)
        detector.roi_heads.box_head = QuantizableTwoMLPHead(detector.roi_heads.box_head)
        detector.rpn.head = QuantizableRPNHead.from_float(detector.rpn.head)
        replace_relu(detector.backbone)
        self.detector = detector

    def forward(self, images: list[Tensor], targets: Any = None) -> Any:
        return self.detector(images, targets)

    def fuse_model(self, is_qat: bool | None = None) -> None:
        fuse_tree(self.detector.backbone, is_qat)
        fuse_tree(self.detector.rpn.head, is_qat)
        self.detector.roi_heads.box_head.fuse_model(is_qat)

    def set_qconfig(self, qconfig: Any) -> None:
        """Quantize the backbone + FPN, the RPN's shared conv and the box head; box logic stays float."""
        self.detector.backbone.qconfig = qconfig
        self.detector.rpn.head.set_qconfig(qconfig)
        self.detector.roi_heads.box_head.qconfig = qconfig


def quantizable_detector(builder: str, **kwargs: Any) -> QuantizableDetector:
    """The float detector from ``mnv3.detection`` in quantizable form (eval mode)."""
    import mnv3.detection as det

    if builder not in BUILDERS:
        raise ValueError(f"unknown detector builder {builder!r}; choose one of {list(BUILDERS)}")
    model = getattr(det, builder)(**kwargs).eval()
    return QuantizableDetector(model).eval()
