"""Faster R-CNN MobileNetV3-Large FPN / 320 FPN: layouts, outputs and losses vs torchvision fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from param_fill import fill_model, make_input

import mnv3
from mnv3.detection import FasterRCNN

FIXTURES = Path(__file__).parent / "fixtures" / "detection"
BUILDERS = {"fpn": mnv3.fasterrcnn_mobilenet_v3_large_fpn, "320_fpn": mnv3.fasterrcnn_mobilenet_v3_large_320_fpn}
BOX_ATOL = 1e-3
SCORE_ATOL = 1e-4
LOSS_ATOL = 1e-4


@pytest.fixture(scope="module")
def ref() -> dict:
    return torch.load(FIXTURES / "detectors.pt", weights_only=True)


def build(variant: str, frozen: bool, **kwargs) -> FasterRCNN:
    return BUILDERS[variant](frozen_bn=frozen, **kwargs)


@pytest.mark.parametrize("variant", ["fpn", "320_fpn"])
@pytest.mark.parametrize("layout", ["frozen", "bn"])
def test_state_dict_layout_matches_torchvision(variant, layout):
    expected = json.loads((FIXTURES / f"{variant}_{layout}.keys.json").read_text())
    model = build(variant, layout == "frozen")
    got = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    assert got == expected
    assert len(got) == (284 if layout == "frozen" else 330)
    # a checkpoint with exactly these keys loads strictly (zeros stand in for the weights)
    model.load_state_dict({k: torch.zeros(s) for k, s in expected}, strict=True)


def test_parameter_counts_and_frozen_stages():
    frozen = build("320_fpn", True)
    assert sum(p.numel() for p in frozen.parameters()) == 19_386_354  # frozen BN values are buffers
    assert sum(p.numel() for p in frozen.parameters() if p.requires_grad) == 19_327_458
    assert all(not p.requires_grad for p in frozen.backbone.body[:7].parameters())
    trainable_all = build("320_fpn", True, trainable_backbone_layers=6)
    assert all(p.requires_grad for p in trainable_all.parameters())
    untrained = build("fpn", False)
    assert sum(p.numel() for p in untrained.parameters()) == 19_410_754
    assert all(p.requires_grad for p in untrained.parameters())
    with pytest.raises(ValueError, match=r"range \[0,6\]"):
        build("fpn", True, trainable_backbone_layers=7)


def test_builder_defaults_follow_torchvision():
    low = build("320_fpn", False)
    assert (low.transform.min_size, low.transform.max_size) == ((320,), 640)
    assert low.rpn._pre_nms_top_n == {"training": 2000, "testing": 150}
    assert low.rpn._post_nms_top_n == {"training": 2000, "testing": 150}
    assert low.rpn.score_thresh == 0.05
    high = build("fpn", False, rpn_score_thresh=0.1, box_detections_per_img=7, num_classes=5)
    assert (high.transform.min_size, high.transform.max_size) == ((800,), 1333)
    assert high.rpn.score_thresh == 0.1 and high.roi_heads.detections_per_img == 7
    assert high.roi_heads.box_predictor.cls_score.out_features == 5


def test_legacy_checkpoint_keys_are_renamed_on_load():
    model = build("320_fpn", True)
    sd = model.state_dict()
    for new, old in (("rpn.head.conv.0.0.weight", "rpn.head.conv.weight"),
                     ("rpn.head.conv.0.0.bias", "rpn.head.conv.bias"),
                     ("backbone.fpn.inner_blocks.0.0.weight", "backbone.fpn.inner_blocks.0.weight"),
                     ("backbone.fpn.layer_blocks.1.0.bias", "backbone.fpn.layer_blocks.1.bias")):
        sd[old] = sd.pop(new) + 1.0
    model.load_state_dict(sd, strict=True)
    assert float(model.rpn.head.conv[0][0].bias[0]) == 1.0


def _match_detections(got: dict, want: dict, where: str) -> tuple[float, float]:
    """Same count and labels; pair each reference box with ours (same label, closest box)."""
    assert len(got["boxes"]) == len(want["boxes"]), f"{where}: {len(got['boxes'])} vs {len(want['boxes'])} boxes"
    assert got["labels"].dtype == torch.int64
    assert sorted(got["labels"].tolist()) == sorted(want["labels"].tolist()), where
    free = torch.ones(len(got["boxes"]), dtype=torch.bool)
    max_box = max_score = 0.0
    for box, label, score in zip(want["boxes"], want["labels"], want["scores"]):
        diff = (got["boxes"] - box).abs().amax(dim=1)
        diff[(got["labels"] != label) | ~free] = float("inf")
        j = int(diff.argmin())
        free[j] = False
        max_box = max(max_box, float(diff[j]))
        max_score = max(max_score, abs(float(got["scores"][j] - score)))
    assert max_box <= BOX_ATOL, f"{where}: box diff {max_box}"
    assert max_score <= SCORE_ATOL, f"{where}: score diff {max_score}"
    return max_box, max_score


@pytest.mark.parametrize("variant", ["320_fpn", "fpn"])
def test_detections_match_torchvision(ref, variant):
    case = ref[variant]
    model = fill_model(build(variant, True, **case["kwargs"]), gain=case["gain"], gains=case["gains"]).eval()
    images = [make_input(n, (3, h, w)) for n, (h, w) in zip(case["image_names"], case["image_shapes"])]
    counts = []
    for run in case["runs"]:
        with torch.no_grad():
            dets = model([images[i] for i in run["images"]])
        assert len(dets) == len(run["images"])
        for i, got, want in zip(run["images"], dets, run["detections"]):
            assert set(got) == {"boxes", "labels", "scores"}
            _match_detections(got, want, f"{variant} image {i} of run {run['images']}")
            counts.append(len(want["boxes"]))
            h, w = case["image_shapes"][i]
            if len(got["boxes"]):
                assert float(got["boxes"][:, 2].max()) <= w and float(got["boxes"][:, 3].max()) <= h
    assert min(counts) >= 3, "the fixture must exercise non-trivial detections"


@pytest.mark.parametrize("variant", ["320_fpn", "fpn"])
def test_training_losses_match_torchvision(ref, variant):
    """Same seed on both sides: the transform's size draw and the samplers' randperm calls
    happen in the same order, so both implementations sample the same anchors and RoIs."""
    case = ref[f"{variant}_train"]
    model = fill_model(build(variant, case["frozen"], **case["kwargs"]), gain=case["gain"], gains=case["gains"])
    model.train()
    images = [make_input(n, (3, h, w)) for n, (h, w) in zip(case["image_names"], case["image_shapes"])]
    targets = [{"boxes": torch.tensor(t["boxes"]), "labels": torch.tensor(t["labels"])} for t in case["targets"]]
    torch.manual_seed(case["seed"])
    losses = model(images, targets)
    assert set(losses) == set(case["losses"])
    for k, v in case["losses"].items():
        assert abs(float(losses[k]) - float(v)) <= LOSS_ATOL, f"{k}: {float(losses[k])} vs {float(v)}"
    sum(losses.values()).backward()
    params = dict(model.named_parameters())
    for k, g in case["grads"].items():
        torch.testing.assert_close(params[k].grad, g, rtol=1e-3, atol=1e-4)
