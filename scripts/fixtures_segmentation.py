"""Segmentation parity fixtures: torchvision LR-ASPP and DeepLabV3 (with/without aux) with the shared fill.

Full 21-class logit maps at 520x520 are megabytes, so each output is stored as a digest
that the test recomputes from our model's full output:

* ``sample``: the logits at a grid of rows/cols (border rows/cols included), all classes;
* ``row_mean`` / ``col_mean`` / ``class_mean``: float64 means of the full map over the
  other axes (a max abs difference <= tol implies mean differences <= tol).
"""

from __future__ import annotations

from pathlib import Path

import torch
from make_fixtures import write_keys
from param_fill import choose_gain, fill_model, make_input
from torch import nn
from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large, lraspp_mobilenet_v3_large

MODELS = {
    "lraspp": (lraspp_mobilenet_v3_large, {}),
    "deeplabv3": (deeplabv3_mobilenet_v3_large, {"aux_loss": False}),
    "deeplabv3_aux": (deeplabv3_mobilenet_v3_large, {"aux_loss": True}),
}
# Eval inputs: the 520 preset, the 320 low-res preset, and a non-square size that is not a
# multiple of the stride (odd feature-map sizes at every stage).
EVAL_SHAPES = [(1, 3, 520, 520), (1, 3, 320, 320), (1, 3, 300, 452)]
# Train-mode BN check (batch statistics, running-stat updates with the head's momentum 0.1
# and the backbone's 0.01); dropout is switched off so the output is deterministic.
TRAIN_SHAPE = (2, 3, 96, 128)
GAIN_SHAPE = (1, 3, 320, 320)
# A float64 run on a small input: structural parity far below fp32 rounding.
F64_SHAPE = (1, 3, 72, 104)
# DeepLabV3 without aux shares every key of ``out``'s path with the aux model, so its ``out``
# digests are bit-identical (checked here) and stored once, under the aux model.
SHARED_OUT = {"deeplabv3": "deeplabv3_aux"}
# Running statistics kept in the fixture: the heads, plus the first and last backbone layers.
RUNNING_PREFIXES = ("classifier.", "aux_classifier.", "backbone.0.", "backbone.16.")


def sample_index(n: int) -> torch.Tensor:
    """About 16 rows (or cols) out of ``n``, always including both borders."""
    step = max(7, n // 15) | 1
    idx = torch.arange(3, n, step).tolist()
    return torch.tensor(sorted({0, n - 1, *idx}), dtype=torch.long)


def digest(y: torch.Tensor) -> dict:
    """Compact, comparable summary of an (N, C, H, W) output (see the module docstring)."""
    rows, cols = sample_index(y.shape[-2]), sample_index(y.shape[-1])
    y64 = y.double()
    return {
        "rows": rows,
        "cols": cols,
        "sample": y[:, :, rows][:, :, :, cols].clone(),
        "row_mean": y64.mean(dim=(1, 3)),
        "col_mean": y64.mean(dim=(1, 2)),
        "class_mean": y64.mean(dim=(2, 3)),
        "shape": list(y.shape),
    }


def spatial(outputs: dict) -> torch.Tensor:
    """The input-dependent part of ``out``: per-image, per-class spatial deviations."""
    y = outputs["out"]
    return y - y.mean(dim=(2, 3), keepdim=True)


def build(name: str) -> nn.Module:
    builder, kwargs = MODELS[name]
    return builder(weights=None, weights_backbone=None, num_classes=21, **kwargs)


def input_name(shape: tuple) -> str:
    return f"input/segmentation/{shape}"


def share_out(res: dict, other: dict, name: str) -> None:
    """Replace ``res``'s output digests by a reference to ``other``'s, after checking equality."""
    assert res["gain"] == other["gain"], name
    groups = [(res["train"], other["train"]), (res["f64"], other["f64"])]
    groups += [(res["eval"][k], other["eval"][k]) for k in res["eval"]]
    for mine, theirs in groups:
        assert set(mine) == {"out"}, name
        assert torch.equal(mine["out"]["sample"], theirs["out"]["sample"]), name
        assert torch.equal(mine["out"]["row_mean"], theirs["out"]["row_mean"]), name
    for key in ("train", "f64", "eval"):
        del res[key]
    res["outputs_from"] = SHARED_OUT[name]


def make(out_dir: Path) -> None:
    results: dict = {"eval_shapes": [list(s) for s in EVAL_SHAPES], "train_shape": list(TRAIN_SHAPE),
                     "f64_shape": list(F64_SHAPE),
                     "running_prefixes": list(RUNNING_PREFIXES), "models": {}}
    for name in sorted(MODELS, key=lambda n: n in SHARED_OUT):
        gain = choose_gain(lambda name=name: build(name), make_input(input_name(GAIN_SHAPE), GAIN_SHAPE),
                           target_std=1.0, output=spatial)
        model = fill_model(build(name), gain=gain).eval()
        write_keys(out_dir / f"{name}.keys.json", model.state_dict())
        res: dict = {"gain": gain, "eval": {}, "num_params": sum(p.numel() for p in model.parameters())}
        for shape in EVAL_SHAPES:
            x = make_input(input_name(shape), shape)
            with torch.no_grad():
                y = model(x)
                y64 = model.double()(x.double())
            model.float()
            res["eval"][str(list(shape))] = {k: digest(v) for k, v in y.items()}
            for k, v in y.items():
                f64 = (v.double() - y64[k]).abs().max()
                print(f"{name} {shape[-2]}x{shape[-1]} {k}: gain {gain} |max| {v.abs().max():.3f} "
                      f"spatial std {spatial({'out': v}).std():.3f} fp32-vs-fp64 {f64:.2e}")
        x = make_input(input_name(F64_SHAPE), F64_SHAPE).double()
        with torch.no_grad():
            res["f64"] = {k: digest(v) for k, v in model.double()(x).items()}
        model.float()
        model.train()
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.eval()
        x = make_input(input_name(TRAIN_SHAPE), TRAIN_SHAPE)
        with torch.no_grad():
            y = model(x)
        res["train"] = {k: digest(v) for k, v in y.items()}
        res["running"] = {k: v.clone() for k, v in model.state_dict().items()
                          if k.startswith(RUNNING_PREFIXES)
                          and k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
        if name in SHARED_OUT:
            share_out(res, results["models"][SHARED_OUT[name]], name)
        results["models"][name] = res
    torch.save(results, out_dir / "outputs.pt")
