"""Int8 MobileNetV3 models on CPU: quantizable builders, PTQ calibration and QAT hooks.

``mobilenet_v3_large(weights=..., quantize=True)`` loads torchvision's QAT checkpoint
format; ``prepare_ptq`` / ``calibrate`` / ``convert`` quantize any of our float models
after training; ``prepare_qat`` and friends are the hooks the finetune job uses. The
quantized engine follows the CPU architecture (see ``engine.py``).
"""

from mnv3.quantization.engine import choose_engine, default_engine, set_engine
from mnv3.quantization.mobilenetv3 import QuantizableMobileNetV3, mobilenet_v3_large, mobilenet_v3_small
from mnv3.quantization.ptq import (
    calibrate,
    convert,
    convert_qat,
    freeze_bn_stats,
    freeze_observers,
    load_qat_state_dict,
    prepare_ptq,
    prepare_qat,
    quantize_ptq,
)

__all__ = [
    "QuantizableMobileNetV3",
    "calibrate",
    "choose_engine",
    "convert",
    "convert_qat",
    "default_engine",
    "freeze_bn_stats",
    "freeze_observers",
    "load_qat_state_dict",
    "mobilenet_v3_large",
    "mobilenet_v3_small",
    "prepare_ptq",
    "prepare_qat",
    "quantize_ptq",
    "set_engine",
]
