"""Faster R-CNN MobileNetV3-Large FPN / 320 FPN: layouts, outputs and losses vs torchvision fixtures."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from param_fill import fill_model, make_input
from PIL import Image

import mnv3
from mnv3 import ops
from mnv3.detection import FasterRCNN
from pipeline.synth import write_dataset
from pipeline.training.precise_bn import detector_backbone_forward, recompute_bn_stats

FIXTURES = Path(__file__).parent / "fixtures" / "detection"
BUILDERS = {"fpn": mnv3.fasterrcnn_mobilenet_v3_large_fpn,
            "320_fpn": mnv3.fasterrcnn_mobilenet_v3_large_320_fpn}
BOX_ATOL = 1e-3
SCORE_ATOL = 1e-4
LOSS_ATOL = 1e-4
LOSS_RTOL = 1e-4


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
    assert len(got["boxes"]) == len(want["boxes"]), \
        f"{where}: {len(got['boxes'])} vs {len(want['boxes'])} boxes"
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
    shapes = case["image_shapes"]
    # >= 4 sizes and aspects: a portrait one and one beyond max_size among them
    assert len(set(shapes)) >= 4 and any(h > w for h, w in shapes)
    assert any(max(h, w) > model.transform.max_size for h, w in shapes)
    images = [make_input(n, (3, h, w)) for n, (h, w) in zip(case["image_names"], shapes)]
    counts = []
    for run in case["runs"]:
        with torch.no_grad():
            dets = model([images[i] for i in run["images"]])
        assert len(dets) == len(run["images"])
        for i, got, want in zip(run["images"], dets, run["detections"], strict=True):
            assert set(got) == {"boxes", "labels", "scores"}
            _match_detections(got, want, f"{variant} image {i} of run {run['images']}")
            if len(run["images"]) == 1:
                counts.append(len(want["boxes"]))
            h, w = case["image_shapes"][i]
            if len(got["boxes"]):
                assert float(got["boxes"][:, 2].max()) <= w and float(got["boxes"][:, 3].max()) <= h
    # Several boxes per image on its own (in the padded batch of four the thin image keeps fewer).
    assert len(counts) >= 4 and min(counts) >= 3, "the fixture must exercise non-trivial detections"


@pytest.mark.parametrize("variant", ["320_fpn", "fpn"])
def test_training_losses_match_torchvision(ref, variant):
    """The four losses on a fixed batch (both layouts: BN for 320, FrozenBN for fpn).

    The fixture samples every labelled anchor and proposal (batch sizes above any count),
    so the losses do not hinge on which of two near-tied proposals a random draw picks;
    the seed still aligns the transform's size draw and the samplers' randperm calls.
    """
    case = ref[f"{variant}_train"]
    assert case["kwargs"]["box_batch_size_per_image"] >= 10**5
    model = build(variant, case["frozen"], **case["kwargs"])
    fill_model(model, gain=case["gain"], gains=case["gains"]).train()
    images = [make_input(n, (3, h, w)) for n, (h, w) in zip(case["image_names"], case["image_shapes"])]
    targets = [{"boxes": torch.tensor(t["boxes"]), "labels": torch.tensor(t["labels"])}
               for t in case["targets"]]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(case["seed"])
        losses = model(images, targets)
    assert set(losses) == set(case["losses"])
    for k, v in case["losses"].items():
        diff = abs(float(losses[k]) - float(v))
        assert diff <= LOSS_ATOL, f"{k}: {float(losses[k])} vs {float(v)}"
        assert diff <= LOSS_RTOL * abs(float(v)), f"{k}: {float(losses[k])} vs {float(v)}"
    sum(losses.values()).backward()
    params = dict(model.named_parameters())
    for k, g in case["grads"].items():
        torch.testing.assert_close(params[k].grad, g, rtol=1e-3, atol=1e-3 * float(g.abs().max()))


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def small_model() -> FasterRCNN:
    """An untrained 320 detector at a small size: enough to reach every input check."""
    return mnv3.fasterrcnn_mobilenet_v3_large_320_fpn(num_classes=4, min_size=64, max_size=96)


def _target(boxes: list[list[float]], labels: list[int]) -> dict[str, torch.Tensor]:
    return {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels)}


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_bad_images_get_clear_errors(small_model, mode):
    model = small_model.train(mode == "train")
    ok = torch.rand(3, 40, 50)
    targets = [_target([[1, 2, 30, 20]], [1])] * 2
    cases = [
        ([], r"images is an empty list"),
        ([ok, torch.rand(3, 0, 50)], r"images\[1\] has an empty dimension \(shape \(3, 0, 50\)\)"),
        ([torch.rand(3, 40, 0), ok], r"images\[0\] has an empty dimension"),
        ([ok, torch.rand(1, 40, 50)], r"images\[1\] has 1 channels.*expected 3"),
        ([torch.rand(4, 40, 50), ok], r"images\[0\] has 4 channels"),
        ([ok, torch.rand(40, 50)], r"3d tensors of shape \[C, H, W\], got images\[1\] with shape \(40, 50\)"),
        ([ok, (ok * 255).to(torch.uint8)], r"images\[1\] has dtype torch.uint8"),
        (torch.rand(2, 3, 40, 50), r"not one batched tensor"),
    ]
    for images, message in cases:
        with pytest.raises(ValueError, match=message):
            model(images, targets[: len(images)] if mode == "train" else None)


def test_bad_training_targets_get_clear_errors(small_model):
    model = small_model.train()
    images = [torch.rand(3, 40, 50), torch.rand(3, 30, 60)]
    good = _target([[1, 2, 30, 20]], [1])
    cases = [
        (None, r"targets should not be None in training mode"),
        ([good], r"got 1 targets for 2 images"),
        ([good, {"boxes": good["boxes"]}], r"targets\[1\] must have 'boxes' and 'labels'"),
        ([good, _target([[10, 5, 10, 25]], [2])],
         r"positive height and width.*\[10.0, 5.0, 10.0, 25.0\].*target at index 1 \(box 0"),
        ([_target([[1, 2, 30, 20], [20, 20, 10, 30]], [1, 2]), good],
         r"positive height and width.*\[20.0, 20.0, 10.0, 30.0\].*target at index 0 \(box 1"),
        ([good, _target([[1, 2, float("nan"), 20]], [1])], r"targets\[1\]\['boxes'\] has non-finite"),
        ([good, {"boxes": torch.tensor([[1, 2, 3]]), "labels": torch.tensor([1])}],
         r"shape \[N, 4\], got \(1, 3\) in targets\[1\]"),
        ([good, {"boxes": torch.tensor([[1, 2, 30, 20]]), "labels": torch.tensor([1])}],
         r"target boxes must be a float tensor, got torch.int64 in targets\[1\]"),
        ([good, _target([[1, 2, 30, 20]], [4])], r"targets\[1\]\['labels'\] must be in \[0, 3\].*got 4"),
        ([good, {"boxes": good["boxes"], "labels": torch.tensor([1.0])}], r"must be int64"),
    ]
    for targets, message in cases:
        with pytest.raises(ValueError, match=message):
            model(images, targets)
    # Images without any box are fine: they contribute negatives only.
    empty = {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)}
    losses = model(images, [good, empty])
    assert all(torch.isfinite(v) for v in losses.values())


# ----------------------------------------------------------------------------- overfit


def _synth_images(tmp_path: Path, count: int) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """The first ``count`` images of a `synth` dataset with 2-4 shapes, each at least 24 px a side."""
    root = tmp_path / "synth"
    write_dataset(str(root), images=16, shards=1, seed=0, min_size=96, max_size=160)
    coco = json.loads((root / "annotations.json").read_text())
    anns: dict[int, list[dict]] = {}
    for a in coco["annotations"]:
        anns.setdefault(a["image_id"], []).append(a)
    chosen = [im for im in coco["images"]
              if 2 <= len(anns.get(im["id"], [])) <= 4
              and all(min(a["bbox"][2:]) >= 24 for a in anns[im["id"]])]
    assert len(chosen) >= count, "the synthetic dataset changed: too few images with large shapes"
    images, targets = [], []
    with tarfile.open(root / chosen[0]["shard"]) as tar:
        for im in chosen[:count]:
            data = tar.extractfile(im["file_name"]).read()
            rgb = np.array(Image.open(io.BytesIO(data)).convert("RGB"))
            images.append(torch.from_numpy(rgb).permute(2, 0, 1).float() / 255.0)
            xywh = torch.tensor([a["bbox"] for a in anns[im["id"]]], dtype=torch.float32)
            targets.append({"boxes": torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1),
                            "labels": torch.tensor([a["category_id"] for a in anns[im["id"]]])})
    return images, targets


def test_overfits_synthetic_shapes(tmp_path):
    """Train from scratch on three synthetic images: losses fall and every shape is found.

    One thread, a fixed seed and a learning-rate drop for the last steps keep the run
    reproducible and its end point stable (about 20 s of CPU).
    """
    images, targets = _synth_images(tmp_path, 3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = mnv3.fasterrcnn_mobilenet_v3_large_320_fpn(
                num_classes=6, min_size=160, max_size=224, rpn_batch_size_per_image=64,
                box_batch_size_per_image=32, rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=64,
                rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=64)
            optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
            schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[40], gamma=0.1)
            model.train()
            history = []
            for _ in range(50):
                losses = model(images, targets)
                total = sum(losses.values())
                optimizer.zero_grad()
                total.backward()
                optimizer.step()
                schedule.step()
                history.append({k: float(v) for k, v in losses.items()})
            first, last = history[0], history[-5:]
            mean_last = {k: sum(h[k] for h in last) / len(last) for k in first}
            assert sum(mean_last.values()) < 0.35 * sum(first.values()), (first, mean_last)
            assert mean_last["loss_classifier"] < 0.3 * first["loss_classifier"], (first, mean_last)
            assert mean_last["loss_objectness"] < 0.3 * first["loss_objectness"], (first, mean_last)
            # After a few dozen large steps from scratch the running averages still mix earlier
            # weights' statistics: recompute them on the training batch (precise BN).
            recompute_bn_stats(model, [images], detector_backbone_forward)
            model.eval()
            with torch.no_grad():
                detections = model(images)
    finally:
        torch.set_num_threads(threads)
    for i, (det, target) in enumerate(zip(detections, targets, strict=True)):
        confident = det["scores"] >= 0.3
        boxes, labels = det["boxes"][confident], det["labels"][confident]
        iou = ops.box_iou(target["boxes"], boxes)
        for j, label in enumerate(target["labels"].tolist()):
            hits = (iou[j] > 0.5) & (labels == label)
            assert bool(hits.any()), (
                f"image {i}: shape {j} (label {label}, box {target['boxes'][j].tolist()}) not found; "
                f"confident detections {boxes.tolist()} {labels.tolist()}")


def test_no_proposal_left_gives_empty_detections():
    """When the RPN keeps no proposal (early in training from scratch), eval returns empty results."""
    torch.manual_seed(0)
    model = mnv3.fasterrcnn_mobilenet_v3_large_320_fpn(num_classes=6).eval()
    model.rpn.score_thresh = 2.0  # objectness probabilities never reach it
    with torch.no_grad():
        outputs = model([torch.rand(3, 120, 160), torch.rand(3, 90, 200)])
    assert len(outputs) == 2
    for out in outputs:
        assert out["boxes"].shape == (0, 4) and out["labels"].shape == (0,) and out["scores"].shape == (0,)
        assert out["labels"].dtype == torch.int64
