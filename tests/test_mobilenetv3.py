"""Parity of our MobileNetV3 classifiers with torchvision (fixtures from scripts/make_fixtures.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from param_fill import fill_model, make_input
from torch import nn

import mnv3
from mnv3.layers import make_divisible
from mnv3.mobilenetv3 import block_configs

FIXTURES = Path(__file__).parent / "fixtures" / "classification"
OUTPUTS = torch.load(FIXTURES / "outputs.pt", weights_only=True)

# Same table as scripts/fixtures_classification.py (builder, kwargs).
CONFIGS = {
    "large": ("large", {}),
    "small": ("small", {}),
    "large_w075": ("large", {"width_mult": 0.75}),
    "large_reduced_tail": ("large", {"reduced_tail": True}),
    "large_dilated": ("large", {"dilated": True}),
    "small_reduced_dilated": ("small", {"reduced_tail": True, "dilated": True}),
    "large_w05_c10": ("large", {"width_mult": 0.5, "num_classes": 10}),
}
BUILDERS = {"large": mnv3.mobilenet_v3_large, "small": mnv3.mobilenet_v3_small}


def build(name: str) -> nn.Module:
    arch, kwargs = CONFIGS[name]
    return fill_model(BUILDERS[arch](**kwargs), gain=OUTPUTS[name]["gain"])


def test_fixture_configs_match():
    assert set(OUTPUTS) == set(CONFIGS)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_state_dict_keys_and_shapes_match_torchvision(name):
    arch, kwargs = CONFIGS[name]
    ours = [[k, list(v.shape)] for k, v in BUILDERS[arch](**kwargs).state_dict().items()]
    expected = json.loads((FIXTURES / f"{name}.keys.json").read_text())
    assert ours == expected


@pytest.mark.parametrize("name", list(CONFIGS))
def test_eval_logits_match_torchvision(name):
    ref = OUTPUTS[name]
    model = build(name).eval()
    x = make_input(ref["input_name"], tuple(ref["shape"]))
    with torch.no_grad():
        y = model(x)
    diff = (y - ref["eval_logits"]).abs().max().item()
    assert diff <= 1e-4, f"{name}: max abs diff {diff:.3g}"
    # the fixture is informative: logits are O(1) and differ between the two images
    assert ref["eval_logits"].std() > 0.5
    assert (ref["eval_logits"][0] - ref["eval_logits"][1]).abs().max() > 0.1


@pytest.mark.parametrize("name", [n for n in CONFIGS if "train_logits" in OUTPUTS[n]])
def test_train_mode_batchnorm_matches_torchvision(name):
    ref = OUTPUTS[name]
    model = build(name).train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    x = make_input(ref["input_name"], tuple(ref["shape"]))
    with torch.no_grad():
        y = model(x)
    assert (y - ref["train_logits"]).abs().max().item() <= 1e-4
    sd = model.state_dict()
    for key, expected in ref["running"].items():
        if expected.is_floating_point():
            assert (sd[key] - expected).abs().max().item() <= 1e-5, key
        else:
            assert torch.equal(sd[key], expected), key


def test_torchvision_checkpoint_loads_strict_and_gives_same_logits(tmp_path):
    """A state_dict saved in torchvision's layout round-trips through a file, strict."""
    src = build("large").eval()
    path = tmp_path / "mobilenet_v3_large-custom.pth"
    torch.save(src.state_dict(), path)
    dst = mnv3.mobilenet_v3_large()
    dst.load_state_dict(torch.load(path, weights_only=True), strict=True)
    x = make_input("roundtrip", (1, 3, 96, 128))
    with torch.no_grad():
        assert torch.equal(src(x), dst.eval()(x))


@pytest.mark.parametrize(("builder", "params", "keys"), [
    (mnv3.mobilenet_v3_large, 5_483_032, 312),
    (mnv3.mobilenet_v3_small, 2_542_856, 244),
])
def test_parameter_and_key_counts_match_spec(builder, params, keys):
    model = builder()
    assert sum(p.numel() for p in model.parameters()) == params
    assert len(model.state_dict()) == keys


def test_make_divisible_rules():
    assert make_divisible(72 // 4) == 24  # 18 -> 16 is below 0.9 * 18, so +8
    assert make_divisible(16 * 0.75) == 16
    assert make_divisible(1280 * 0.75) == 960


def test_block_tables_reduced_tail_and_dilation():
    configs, last = block_configs("large", reduced_tail=True)
    tail = [(c.input_channels, c.expanded_channels, c.out_channels) for c in configs[-3:]]
    assert tail == [(112, 672, 80), (80, 480, 80), (80, 480, 80)]
    assert last == 640
    configs, _ = block_configs("small", dilated=True)
    assert [c.dilation for c in configs[-3:]] == [2, 2, 2] and configs[-3].stride == 2


def test_output_stride_and_stage_flags():
    model = mnv3.mobilenet_v3_large(dilated=True).eval()
    x = torch.zeros(1, 3, 224, 224)
    with torch.no_grad():
        assert model.features(x).shape[-2:] == (14, 14)  # stride 16 when dilated
        assert mnv3.mobilenet_v3_large().eval().features(x).shape[-2:] == (7, 7)
    stages = [0] + [i for i, b in enumerate(model.features) if getattr(b, "_is_cn", False)] + [16]
    assert stages == [0, 2, 4, 7, 13, 16]
    dw = model.features[13].block[1][0]
    assert (dw.stride, dw.dilation, dw.padding) == ((1, 1), (2, 2), (4, 4))


def test_init_scheme():
    torch.manual_seed(0)
    model = mnv3.mobilenet_v3_large()
    lin = model.classifier[3]
    assert abs(lin.weight.std().item() - 0.01) < 1e-3 and lin.bias.abs().max() == 0
    conv = model.features[16][0]  # 160 -> 960, 1x1: fan_out = 960
    assert abs(conv.weight.std().item() - math.sqrt(2.0 / 960)) < 0.05 * math.sqrt(2.0 / 960)
    bn = model.features[16][1]
    assert (bn.eps, bn.momentum) == (0.001, 0.01)
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
    se = model.features[4].block[2]
    assert se.fc1.bias is not None and torch.all(se.fc1.bias == 0)


@pytest.mark.parametrize("kwargs, match", [
    ({"width_mult": 0}, "width_mult"),
    ({"num_classes": 0}, "num_classes"),
])
def test_bad_arguments_are_clear(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mnv3.mobilenet_v3_large(**kwargs)
