"""LR-ASPP / DeepLabV3 / FCN on the dilated MobileNetV3-Large: torchvision parity, loss, bad input.

Reference digests come from ``scripts/fixtures_segmentation.py`` (run with torchvision in the
dev environment); see its docstring for what a digest holds.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from param_fill import fill_model, make_input
from torch import nn

import mnv3
from mnv3.segmentation import (
    FCN,
    LRASPP,
    DeepLabV3,
    deeplabv3_mobilenet_v3_large,
    fcn_mobilenet_v3_large,
    lraspp_mobilenet_v3_large,
    segmentation_loss,
)
from mnv3.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SegmentationPreset,
    SegmentationTrainPreset,
    normalize,
    to_tensor,
)
from pipeline.masks import decode_masks, masks_from_logits
from pipeline.synth import CATEGORIES as SYNTH_CATEGORIES
from pipeline.synth import render_sample

FIXTURES = Path(__file__).parent / "fixtures" / "segmentation"
TOL = 1e-4  # max abs difference allowed against torchvision in float32
TOL_F64 = 1e-9

BUILDERS = {
    "lraspp": lambda: lraspp_mobilenet_v3_large(num_classes=21),
    "deeplabv3": lambda: deeplabv3_mobilenet_v3_large(num_classes=21),
    "deeplabv3_aux": lambda: deeplabv3_mobilenet_v3_large(num_classes=21, aux_loss=True),
}
PARAMS = {"lraspp": 3_221_538, "deeplabv3": 11_025_477, "deeplabv3_aux": 11_029_328}


@pytest.fixture(scope="module")
def reference() -> dict:
    return torch.load(FIXTURES / "outputs.pt", weights_only=True)


@pytest.fixture(scope="module")
def filled(reference):
    """One model per name, filled as the fixture script filled torchvision's, built on demand."""
    cache: dict[str, nn.Module] = {}

    def get(name: str) -> nn.Module:
        if name not in cache:
            gain = reference["models"][name]["gain"]
            if name == "deeplabv3" and reference["models"]["deeplabv3_aux"]["gain"] == gain:
                # The fill is a function of key and shape only, so the no-aux model's fill is
                # the aux model's without the aux keys (saves a fill of 11 M parameters).
                model = BUILDERS[name]()
                aux_sd = get("deeplabv3_aux").state_dict()
                model.load_state_dict({k: aux_sd[k] for k in model.state_dict()}, strict=True)
                cache[name] = model.eval()
            else:
                cache[name] = fill_model(BUILDERS[name](), gain=gain).eval()
        return cache[name]

    return get


def reference_outputs(reference: dict, name: str) -> dict:
    res = reference["models"][name]
    return reference["models"][res["outputs_from"]] if "outputs_from" in res else res


def input_name(shape) -> str:
    return f"input/segmentation/{tuple(shape)}"


def compare(ours: torch.Tensor, ref: dict, tol: float) -> float:
    """Max abs difference of ``ours`` against a digest; asserts every part is within ``tol``."""
    assert list(ours.shape) == ref["shape"]
    sample = ours[:, :, ref["rows"]][:, :, :, ref["cols"]]
    diffs = {
        "sample": (sample.to(ref["sample"].dtype) - ref["sample"]).abs().max().item(),
        "row_mean": (ours.double().mean(dim=(1, 3)) - ref["row_mean"]).abs().max().item(),
        "col_mean": (ours.double().mean(dim=(1, 2)) - ref["col_mean"]).abs().max().item(),
        "class_mean": (ours.double().mean(dim=(2, 3)) - ref["class_mean"]).abs().max().item(),
    }
    assert max(diffs.values()) <= tol, diffs
    return diffs["sample"]


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_keys_and_shapes_match_torchvision(name):
    model = BUILDERS[name]()
    expected = json.loads((FIXTURES / f"{name}.keys.json").read_text())
    assert [[k, list(v.shape)] for k, v in model.state_dict().items()] == expected
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]
    assert all(k.startswith(("backbone.", "classifier.", "aux_classifier.")) for k, _ in expected)
    assert sum(k.startswith("backbone.") for k, _ in expected) == 308


def test_head_batchnorm_settings():
    model = deeplabv3_mobilenet_v3_large(aux_loss=True)
    backbone_bn = getattr(model.backbone, "4").block[0][1]
    assert backbone_bn.eps == 1e-3 and backbone_bn.momentum == 0.01
    for head in (model.classifier, model.aux_classifier, lraspp_mobilenet_v3_large().classifier):
        bns = [m for m in head.modules() if isinstance(m, nn.BatchNorm2d)]
        assert bns and all(bn.eps == 1e-5 and bn.momentum == 0.1 for bn in bns)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_eval_outputs_match_torchvision(name, reference, filled):
    model = filled(name)
    ref = reference_outputs(reference, name)
    for shape in reference["eval_shapes"]:
        x = make_input(input_name(shape), tuple(shape))
        with torch.no_grad():
            out = model(x)
        expected = ref["eval"][str(shape)]
        if name == "deeplabv3":
            expected = {"out": expected["out"]}  # the shared digest also holds the aux output
        assert set(out) == set(expected)
        for key, y in out.items():
            assert y.shape[-2:] == x.shape[-2:]
            compare(y, expected[key], TOL)


@pytest.mark.parametrize("name", ["lraspp", "deeplabv3_aux"])
def test_float64_outputs_match_torchvision(name, reference, filled):
    model = filled(name)
    shape = tuple(reference["f64_shape"])
    try:
        with torch.no_grad():
            out = model.double()(make_input(input_name(shape), shape).double())
    finally:
        model.float()
    for key, y in out.items():
        compare(y, reference_outputs(reference, name)["f64"][key], TOL_F64)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_train_mode_outputs_and_running_stats_match_torchvision(name, reference, filled):
    res = reference["models"][name]
    model = copy.deepcopy(filled(name)).train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    shape = tuple(reference["train_shape"])
    with torch.no_grad():
        out = model(make_input(input_name(shape), shape))
    expected = reference_outputs(reference, name)["train"]
    for key, y in out.items():
        compare(y, expected[key], TOL)
    sd = model.state_dict()
    assert res["running"]
    for key, value in res["running"].items():
        if value.is_floating_point():
            torch.testing.assert_close(sd[key], value, rtol=1e-4, atol=1e-5, msg=key)
        else:
            assert torch.equal(sd[key], value), key


@pytest.mark.parametrize("name,builder", [
    ("lraspp", lraspp_mobilenet_v3_large),
    ("deeplabv3_aux", deeplabv3_mobilenet_v3_large),
])
def test_official_checkpoint_layout_loads_strict(name, builder, tmp_path):
    """A file with torchvision's exact keys/shapes (as the official .pth) loads through ``weights``."""
    layout = json.loads((FIXTURES / f"{name}.keys.json").read_text())
    sd = {k: (torch.full(shape, 3) if k.endswith("num_batches_tracked") else make_input(k, tuple(shape)))
          for k, shape in layout}
    sd = {k: v.long() if k.endswith("num_batches_tracked") else v for k, v in sd.items()}
    path = tmp_path / f"{name}_checkpoint.pth"
    torch.save(sd, path)
    model = builder(weights=str(path))  # DeepLabV3: aux forced on by weights
    loaded = model.state_dict()
    assert list(loaded) == [k for k, _ in layout]
    for k, v in sd.items():
        assert torch.equal(loaded[k], v), k


def test_weights_force_aux_head_on(tmp_path):
    model = deeplabv3_mobilenet_v3_large(aux_loss=True)
    path = tmp_path / "deeplab.pth"
    torch.save(model.state_dict(), path)
    assert deeplabv3_mobilenet_v3_large(weights=str(path)).aux_classifier is not None
    with pytest.raises(ValueError, match="aux_loss"):
        deeplabv3_mobilenet_v3_large(weights=str(path), aux_loss=False)


def test_builders_exported_and_typed():
    assert mnv3.lraspp_mobilenet_v3_large is lraspp_mobilenet_v3_large
    assert mnv3.deeplabv3_mobilenet_v3_large is deeplabv3_mobilenet_v3_large
    assert mnv3.fcn_mobilenet_v3_large is fcn_mobilenet_v3_large
    assert isinstance(lraspp_mobilenet_v3_large(num_classes=3), LRASPP)
    assert isinstance(deeplabv3_mobilenet_v3_large(num_classes=3), DeepLabV3)
    with pytest.raises(NotImplementedError):
        lraspp_mobilenet_v3_large(aux_loss=True)
    with pytest.raises(ValueError, match="num_classes"):
        deeplabv3_mobilenet_v3_large(num_classes=0)


def test_fcn_head_is_ours():
    """FCN is not in torchvision: check its structure, size and outputs directly."""
    model = fcn_mobilenet_v3_large(num_classes=21)
    assert isinstance(model, FCN)
    assert sum(p.numel() for p in model.parameters()) == 5_051_093
    aux = fcn_mobilenet_v3_large(num_classes=5, aux_loss=True).eval()
    assert [k for k in aux.state_dict() if k.startswith("classifier.0")] == ["classifier.0.weight"]
    assert tuple(aux.classifier[0].weight.shape) == (240, 960, 3, 3)
    assert tuple(aux.aux_classifier[0].weight.shape) == (10, 40, 3, 3)
    x = torch.rand(1, 3, 64, 80)
    with torch.no_grad():
        out = aux(x)
    assert set(out) == {"out", "aux"}
    assert out["out"].shape == (1, 5, 64, 80) and out["aux"].shape == (1, 5, 64, 80)
    assert out["out"].std() > 0


def test_backbone_keeps_layers_0_to_16():
    model = lraspp_mobilenet_v3_large()
    assert [n for n, _ in model.backbone.named_children()] == [str(i) for i in range(17)]
    with torch.no_grad():
        feats = model.eval().backbone(torch.rand(1, 3, 520, 520))
    assert feats["low"].shape == (1, 40, 65, 65) and feats["high"].shape == (1, 960, 33, 33)


# --------------------------------------------------------------------------------- loss


def test_loss_is_out_plus_half_aux_and_ignores_255():
    torch.manual_seed(0)
    out, aux = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    target = torch.randint(0, 4, (2, 8, 8))
    target[0, :4] = 255
    both = segmentation_loss({"out": out, "aux": aux}, target)
    only_out = segmentation_loss({"out": out}, target)
    only_aux = segmentation_loss({"out": aux}, target)
    torch.testing.assert_close(both, only_out + 0.5 * only_aux)
    # ignored pixels do not count: changing their logits leaves the loss unchanged
    out2 = out.clone()
    out2[0, :, :4] += 100.0
    torch.testing.assert_close(segmentation_loss({"out": out2}, target), only_out)
    mask = target != 255
    manual = F.log_softmax(out, 1).gather(1, target.clamp(max=3)[:, None])[:, 0][mask].neg().mean()
    torch.testing.assert_close(only_out, manual)


def test_loss_rejects_labels_outside_classes():
    out = torch.randn(1, 3, 4, 4)
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    target[0, 0, 0] = 7
    with pytest.raises(ValueError, match=r"labels \[7\] outside \[0, 3\)"):
        segmentation_loss({"out": out}, target)
    target[0, 0, 0] = -1
    with pytest.raises(ValueError, match="outside"):
        segmentation_loss({"out": out}, target)
    target[0, 0, 0] = 255
    assert torch.isfinite(segmentation_loss({"out": out}, target))
    with pytest.raises(ValueError, match="does not match"):
        segmentation_loss({"out": out}, torch.zeros(1, 5, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        segmentation_loss({"out": out}, torch.zeros(1, 4, 4))


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("builder", [lraspp_mobilenet_v3_large, deeplabv3_mobilenet_v3_large,
                                     fcn_mobilenet_v3_large])
def test_bad_images_raise_clear_errors(builder):
    model = builder(num_classes=3).eval()
    with torch.no_grad():
        with pytest.raises(ValueError, match="3 \\(RGB\\) channels, got 4"):
            model(torch.rand(1, 4, 64, 64))
        with pytest.raises(ValueError, match="3 \\(RGB\\) channels, got 1"):
            model(torch.rand(2, 1, 64, 64))
        with pytest.raises(ValueError, match="smaller than the output stride"):
            model(torch.rand(1, 3, 15, 64))
        with pytest.raises(ValueError, match="NCHW"):
            model(torch.rand(3, 64, 64))
        with pytest.raises(ValueError, match="float"):
            model(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
        assert model(torch.rand(1, 3, 16, 16))["out"].shape == (1, 3, 16, 16)


def test_deeplab_training_needs_batch_of_two():
    model = deeplabv3_mobilenet_v3_large(num_classes=3).train()
    with pytest.raises(ValueError, match="batch of at least 2"):
        model(torch.rand(1, 3, 32, 32))
    assert model(torch.rand(2, 3, 32, 32))["out"].shape == (2, 3, 32, 32)


@pytest.fixture
def one_thread():
    """Backward passes with 2 OpenMP threads on a busy 2-core machine spin-wait for each other
    (measured: 15x the CPU time of one thread); one thread keeps this test's cost predictable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_loss_trains_the_aux_head_at_half_weight(one_thread):
    torch.manual_seed(0)
    model = deeplabv3_mobilenet_v3_large(num_classes=3, aux_loss=True).train()
    x, target = torch.rand(2, 3, 32, 48), torch.randint(0, 3, (2, 32, 48))
    target[:, :4] = 255
    out = model(x)
    loss = segmentation_loss(out, target)
    expected = (F.cross_entropy(out["out"], target, ignore_index=255)
                + 0.5 * F.cross_entropy(out["aux"], target, ignore_index=255))
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert model.aux_classifier[4].weight.grad.abs().sum() > 0
    assert model.classifier[4].weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------ presets


@pytest.mark.parametrize("size", [520, 320])
def test_eval_presets_resize_shorter_side_with_antialias(size):
    """The 520 preset (official eval) and the 320 low-res one: shorter side, aspect kept, no crop."""
    preset = SegmentationPreset() if size == 520 else SegmentationPreset(resize_size=size)
    assert preset.resize_size == size
    img = torch.rand(3, 390, 260)  # portrait: the width is the shorter side
    out = preset(img)
    assert out.shape == (3, size * 390 // 260, size)
    expected = F.interpolate(img[None], size=out.shape[-2:], mode="bilinear", align_corners=False,
                             antialias=True)[0]
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    torch.testing.assert_close(out, (expected - mean) / std)


def test_train_preset_moves_mask_with_pixels_and_pads_with_ignore():
    torch.manual_seed(0)
    img = torch.zeros(3, 30, 50)
    img[0, :, 25:] = 1.0  # red right half ...
    mask = torch.zeros(30, 50, dtype=torch.long)
    mask[:, 25:] = 2  # ... labelled 2
    preset = SegmentationTrainPreset(base_size=24, crop_size=40)  # shorter side 12..48: pads often
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    red_threshold = (0.5 - mean[0]) / std[0]
    padded_any = False
    for _ in range(10):
        x, y = preset(img, mask)
        assert x.shape == (3, 40, 40) and y.shape == (40, 40) and y.dtype == mask.dtype
        assert set(torch.unique(y).tolist()) <= {0, 2, 255}
        pad = y == 255  # padding is the ignore label, and black (0) before normalization
        torch.testing.assert_close(x[:, pad], ((0 - mean) / std)[:, None].expand(3, int(pad.sum())))
        padded_any |= bool(pad.any())
        # away from label edges (where the antialiased image blends), label 2 is where red is
        near_edge = _dilate(_dilate(_label_edges(y)))
        keep = ~pad & ~near_edge
        agree = ((x[0] > red_threshold) == (y == 2))[keep]
        assert agree.numel() > 50 and agree.all()
    assert padded_any


def _label_edges(y: torch.Tensor) -> torch.Tensor:
    edges = torch.zeros_like(y, dtype=torch.bool)
    edges[1:] |= y[1:] != y[:-1]
    edges[:, 1:] |= y[:, 1:] != y[:, :-1]
    return edges


def _dilate(m: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(m[None, None].float(), 3, stride=1, padding=1)[0, 0].bool()


# ------------------------------------------------------------------------ training sanity


def synth_semantic_batch(count: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized synth-shape images and their semantic label maps (0 background, category ids),
    built from the dataset's visible instance masks (those never overlap)."""
    images, labels = [], []
    for index in range(count):
        sample = render_sample(seed=0, index=index, min_size=size, max_size=size)
        label = np.zeros((size, size), dtype=np.int64)
        for inst in sample.instances:
            label[inst.mask] = inst.category_id
        images.append(normalize(to_tensor(np.array(sample.image))))
        labels.append(torch.from_numpy(label))
    return torch.stack(images), torch.stack(labels)


def mean_iou(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    """Mean over the classes present in ``target`` of intersection / union."""
    ious = [((pred == c) & (target == c)).sum().item() / ((pred == c) | (target == c)).sum().item()
            for c in range(num_classes) if (target == c).any()]
    return float(np.mean(ious))


def test_overfit_synth_shapes_miou_rises_well_above_chance(one_thread):
    num_classes = len(SYNTH_CATEGORIES) + 1
    x, y = synth_semantic_batch(8, 64)
    torch.manual_seed(0)
    model = lraspp_mobilenet_v3_large(num_classes=num_classes)
    with torch.no_grad():
        untrained = mean_iou(model.eval()(x)["out"].argmax(1), y, num_classes)
    majority = mean_iou(torch.zeros_like(y), y, num_classes)  # all background: the best constant
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    losses = []
    for _ in range(40):
        loss = segmentation_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # 40 steps barely move running stats at the backbone's BN momentum 0.01: re-estimate them
    # on the same images (cumulative average) before scoring in eval mode
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        model(x)
        logits = model.eval()(x)["out"]
    # score through the output path: logits -> per-class RLE masks -> label maps
    pred = torch.stack([torch.from_numpy(decode_masks(masks_from_logits(one, (64, 64))).astype(np.int64))
                        for one in logits])
    trained = mean_iou(pred, y, num_classes)
    assert losses[-1] < 0.3 * losses[0], losses
    assert untrained < 0.2 and majority < 0.2, (untrained, majority)
    assert trained > 0.5 and trained > 3 * max(untrained, majority), (trained, untrained, majority)


def test_bundle_drops_the_training_only_aux_head(tmp_path):
    """annotate builds DeepLabV3 from an aux-carrying checkpoint but does not run the aux head."""
    from pipeline.bundle import TaskSpec, build_model

    path = tmp_path / "deeplab_aux.pth"
    torch.save(mnv3.deeplabv3_mobilenet_v3_large(num_classes=3, aux_loss=True).state_dict(), path)
    spec = TaskSpec(task="segment", builder="deeplabv3_mobilenet_v3_large", weights=str(path),
                    num_classes=3, params={"resize_size": 64})
    model = build_model(spec)
    assert model.aux_classifier is None
    with torch.no_grad():
        out = model(torch.rand(1, 3, 64, 64))
    assert set(out) == {"out"} and out["out"].shape == (1, 3, 64, 64)
    # int8 from the same float checkpoint: the aux head is neither calibrated nor run
    int8 = build_model(dataclasses.replace(spec, precision="int8"))
    assert int8.model.aux_classifier is None and int8.needs_calibration
    with torch.no_grad():
        assert set(int8(torch.rand(1, 3, 64, 64))) == {"out"}
