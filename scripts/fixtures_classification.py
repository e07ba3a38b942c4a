"""Classification parity fixtures: torchvision MobileNetV3 with the shared fill."""

from __future__ import annotations

from pathlib import Path

import torch
from make_fixtures import write_keys
from param_fill import choose_gain, fill_model, make_input
from torch import nn
from torchvision.models import mobilenet_v3_large, mobilenet_v3_small

# name -> (builder, kwargs, input shape, also check train-mode BN)
CONFIGS = {
    "large": ("large", {}, (2, 3, 224, 224), True),
    "small": ("small", {}, (2, 3, 224, 224), True),
    "large_w075": ("large", {"width_mult": 0.75}, (2, 3, 224, 224), False),
    "large_reduced_tail": ("large", {"reduced_tail": True}, (2, 3, 224, 224), False),
    "large_dilated": ("large", {"dilated": True}, (2, 3, 192, 256), False),
    "small_reduced_dilated": ("small", {"reduced_tail": True, "dilated": True}, (2, 3, 224, 224), True),
    "large_w05_c10": ("large", {"width_mult": 0.5, "num_classes": 10}, (2, 3, 160, 160), True),
}

BUILDERS = {"large": mobilenet_v3_large, "small": mobilenet_v3_small}


def run_case(arch: str, kwargs: dict, shape: tuple, train: bool) -> dict:
    x = make_input(f"input/{arch}/{shape}", shape)
    gain = choose_gain(lambda: BUILDERS[arch](weights=None, **kwargs), x)
    model = fill_model(BUILDERS[arch](weights=None, **kwargs), gain=gain)
    out = {"input_name": f"input/{arch}/{shape}", "shape": list(shape), "gain": gain}
    model.eval()
    with torch.no_grad():
        out["eval_logits_f64"] = model.double()(x.double()).float()
    model.float()
    with torch.no_grad():
        out["eval_logits"] = model(x)
    if train:
        model.train()
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.eval()
        with torch.no_grad():
            out["train_logits"] = model(x)
        out["running"] = {k: v.clone() for k, v in model.state_dict().items()
                          if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    return model, out


def make(out_dir: Path) -> None:
    results = {}
    for name, (arch, kwargs, shape, train) in CONFIGS.items():
        model, res = run_case(arch, kwargs, shape, train)
        write_keys(out_dir / f"{name}.keys.json", model.state_dict())
        results[name] = res
        y = res["eval_logits"]
        f64 = (y - res["eval_logits_f64"]).abs().max()
        print(f"{name}: gain {res['gain']} logits |max| {y.abs().max():.3f} std {y.std():.3f} "
              f"img0-img1 {(y[0] - y[1]).abs().max():.3f} fp32-vs-fp64 {f64:.2e}")
    torch.save(results, out_dir / "outputs.pt")
