"""Quantizable MobileNetV3 classifiers (Large and Small) and their builders.

``quantize=True`` follows torchvision's recipe for its QAT checkpoint (a workaround for
vision issue #5890): build float -> fuse for QAT -> QAT qconfig -> ``prepare_qat`` ->
load the QAT-prepared state_dict (weights plus observer state) -> ``convert``. Float
weights load with ``quantize=False``; post-training quantization of those goes through
``mnv3.quantization.ptq`` (``prepare_ptq`` / ``calibrate`` / ``convert``).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from mnv3.mobilenetv3 import MobileNetV3, block_configs
from mnv3.quantization.blocks import QuantizableInvertedResidual, fuse_tree, replace_relu
from mnv3.quantization.engine import choose_engine
from mnv3.quantization.ptq import convert, load_qat_state_dict, prepare_qat
from mnv3.quantization.torch_ao import quiet, tq

__all__ = ["QuantizableMobileNetV3", "mobilenet_v3_large", "mobilenet_v3_small"]


class QuantizableMobileNetV3(MobileNetV3):
    """MobileNetV3 with a quantize stub before ``features`` and a dequantize stub after the classifier."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("block", QuantizableInvertedResidual)
        super().__init__(*args, **kwargs)
        with quiet():
            self.quant = tq.QuantStub()
            self.dequant = tq.DeQuantStub()
        replace_relu(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.dequant(self._forward_impl(self.quant(x)))

    def fuse_model(self, is_qat: bool | None = None) -> None:
        """Fuse every conv+BN(+ReLU) and each SE gate's fc1+ReLU; Hardswish stays separate."""
        fuse_tree(self, is_qat)


def _is_qat_state(sd: dict[str, Any]) -> bool:
    return any(".activation_post_process." in k or ".weight_fake_quant." in k for k in sd)


def _build(arch: str, weights: str | None, quantize: bool, backend: str | None, engine: str | None,
           width_mult: float, reduced_tail: bool, dilated: bool, **kwargs: Any) -> QuantizableMobileNetV3:
    sd: dict[str, Any] | None = None
    entry = None
    if weights is not None:
        from mnv3.weights import read_state_dict, resolve

        uri, entry = resolve(weights)
        sd, _ = read_state_dict(uri, sha256=entry.sha256_prefix if entry else None)
        if _is_qat_state(sd) and not quantize:
            raise ValueError(f"weights {weights!r} are a quantization-aware (QAT) checkpoint; "
                             "build with quantize=True")
        if quantize and not _is_qat_state(sd):
            raise ValueError(f"weights {weights!r} are float weights; quantize=True needs a QAT checkpoint. "
                             "For post-training quantization build with quantize=False and use "
                             "mnv3.quantization.prepare_ptq / calibrate / convert "
                             "(or `mnv3-pipeline quantize`)")
    if backend is None:
        backend = entry.backend if entry is not None and entry.backend else choose_engine()
    configs, last_channel = block_configs(arch, width_mult, reduced_tail, dilated)
    model = QuantizableMobileNetV3(configs, last_channel, **kwargs)
    if quantize:
        prepare_qat(model, backend)
    if sd is not None:
        if quantize:
            load_qat_state_dict(model, sd)
        else:
            model.load_state_dict(sd, strict=True)
    if quantize:
        convert(model, engine)
    model.quant_backend = backend
    return model


def mobilenet_v3_large(*, weights: str | None = None, quantize: bool = False, backend: str | None = None,
                       engine: str | None = None, num_classes: int = 1000, width_mult: float = 1.0,
                       reduced_tail: bool = False, dilated: bool = False, dropout: float = 0.2,
                       **kwargs: Any) -> QuantizableMobileNetV3:
    """Quantizable MobileNetV3-Large.

    ``weights``: registry name or URI; a QAT checkpoint (e.g. the official
    ``MobileNet_V3_Large_QuantizedWeights.IMAGENET1K_QNNPACK_V1``) with ``quantize=True``, or
    float weights with ``quantize=False``. ``backend``: qconfig family (default: the
    weights' backend, else this CPU's engine). ``engine``: kernels that run the int8 model
    (default: chosen by CPU architecture).
    """
    return _build("large", weights, quantize, backend, engine, width_mult, reduced_tail, dilated,
                  num_classes=num_classes, dropout=dropout, **kwargs)


def mobilenet_v3_small(*, weights: str | None = None, quantize: bool = False, backend: str | None = None,
                       engine: str | None = None, num_classes: int = 1000, width_mult: float = 1.0,
                       reduced_tail: bool = False, dilated: bool = False, dropout: float = 0.2,
                       **kwargs: Any) -> QuantizableMobileNetV3:
    """Quantizable MobileNetV3-Small (no published QAT weights; use PTQ or QAT). See the Large builder."""
    return _build("small", weights, quantize, backend, engine, width_mult, reduced_tail, dilated,
                  num_classes=num_classes, dropout=dropout, **kwargs)


