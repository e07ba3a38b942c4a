"""Quantized MobileNetV3 parity fixtures: torchvision's QAT-checkpoint path on filled weights.

torchvision's quantizable model is built with ``quantize=False``, fused for QAT, given the
``qnnpack`` QAT qconfig (the official checkpoint's format) and prepared; its weights come
from the shared fill, its observers see one deterministic calibration batch, then observers
are frozen. The non-filled state (observer ranges, fake-quant scales, flags) is stored so
the test loads the *same* QAT-prepared state_dict into our model, converts it under each
engine and compares int8 outputs. Stored: key lists, that quantization state, outputs.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from make_fixtures import write_keys
from param_fill import choose_gain, fill_model, fill_value, make_input
from torchvision.models.mobilenetv3 import _mobilenet_v3_conf
from torchvision.models.quantization.mobilenetv3 import QuantizableInvertedResidual, QuantizableMobileNetV3
from torchvision.models.quantization.utils import _replace_relu

BACKEND = "qnnpack"
ENGINES = ("qnnpack", "x86")
CASES = {"large": "mobilenet_v3_large", "small": "mobilenet_v3_small"}
INPUT = (2, 3, 224, 224)
CALIB = (4, 3, 224, 224)


def build_prepared(arch: str, fake_quant: bool = True) -> torch.nn.Module:
    setting, last_channel = _mobilenet_v3_conf(CASES[arch])
    model = QuantizableMobileNetV3(setting, last_channel, block=QuantizableInvertedResidual)
    _replace_relu(model)
    model.fuse_model(is_qat=True)
    model.qconfig = torch.ao.quantization.get_default_qat_qconfig(BACKEND)
    torch.ao.quantization.prepare_qat(model, inplace=True)
    if not fake_quant:
        model.apply(torch.ao.quantization.disable_fake_quant)
        model.apply(torch.ao.quantization.disable_observer)
    return model


def quant_state(model: torch.nn.Module) -> dict:
    """Entries of the QAT state_dict that the shared fill does not produce, packed flat.

    One float64 tensor holds every value (the integer flags and zero points are exact in
    float64), with key, shape and dtype lists: far smaller on disk than ~1000 tiny tensors.
    """
    items = [(k, v) for k, v in model.state_dict().items() if fill_value(k, v) is None]
    return {"keys": [k for k, _ in items], "shapes": [list(v.shape) for _, v in items],
            "dtypes": [str(v.dtype).replace("torch.", "") for _, v in items],
            "values": torch.cat([v.reshape(-1).double() for _, v in items])}


def run_case(arch: str) -> tuple[torch.nn.Module, dict]:
    x = make_input(f"quant/input/{arch}", INPUT)
    x_cal = make_input(f"quant/calib/{arch}", CALIB)
    gain = choose_gain(lambda: build_prepared(arch, fake_quant=False), x)
    model = fill_model(build_prepared(arch), gain=gain).eval()
    with torch.no_grad():
        model(x_cal)  # observers (activations and weights) record ranges
        model.apply(torch.ao.quantization.disable_observer)
        qat_out = model(x)
    res = {"gain": gain, "input_name": f"quant/input/{arch}", "calib_name": f"quant/calib/{arch}",
           "input_shape": list(INPUT), "calib_shape": list(CALIB), "backend": BACKEND,
           "quant_state": quant_state(model), "qat_logits": qat_out, "int8": {}, "int8_out_scale": {}}
    for engine in ENGINES:
        torch.backends.quantized.engine = engine
        converted = torch.ao.quantization.convert(copy.deepcopy(model), inplace=False).eval()
        with torch.no_grad():
            res["int8"][engine] = converted(x)
        res["int8_out_scale"][engine] = float(converted.classifier[3].scale)
        res["converted_keys"] = [[k, list(getattr(v, "shape", []))]
                                 for k, v in converted.state_dict().items()]
    return model, res


def make(out_dir: Path) -> None:
    torch.use_deterministic_algorithms(False)
    results = {}
    for arch in CASES:
        model, res = run_case(arch)
        write_keys(out_dir / f"{arch}_qat.keys.json", model.state_dict())
        results[arch] = res
        q, f = res["int8"]["x86"], res["qat_logits"]
        print(f"{arch}: gain {res['gain']} qat |max| {f.abs().max():.3f} std {f.std():.3f}; "
              f"int8(x86) vs fake-quant max diff {(q - f).abs().max():.4f} (out scale "
              f"{res['int8_out_scale']['x86']:.4f}); qnnpack vs x86 "
              f"{(res['int8']['qnnpack'] - q).abs().max():.4f}; {len(res['converted_keys'])} converted keys")
    torch.save(results, out_dir / "outputs.pt")
