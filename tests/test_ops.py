"""mnv3.ops and the detection helpers against torchvision fixtures and loop implementations."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from naive_ops import loop_nms, naive_nms, naive_roi_align
from param_fill import make_input

from mnv3 import ops
from mnv3.detection.anchors import AnchorGenerator
from mnv3.detection.box_coder import BoxCoder
from mnv3.detection.sampling import BalancedPositiveNegativeSampler, Matcher

FIXTURES = Path(__file__).parent / "fixtures" / "detection"


@pytest.fixture(scope="module")
def ref() -> dict:
    return torch.load(FIXTURES / "ops.pt", weights_only=True)


def test_nms_matches_torchvision(ref):
    for name, case in ref["nms"].items():
        for thr, expected in case["keep"].items():
            got = ops.nms(case["boxes"], case["scores"], thr)
            assert got.dtype == torch.int64
            assert torch.equal(got, expected), f"{name} thr={thr}: {got.tolist()} vs {expected.tolist()}"


def test_nms_threshold_is_strict_and_compared_in_double():
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 5], [0, 0, 10, 3.]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    # IoU(0, 1) == 0.5 exactly: kept at threshold 0.5 (strict >).
    assert ops.nms(boxes[:2], scores[:2], 0.5).tolist() == [0, 1]
    # IoU(0, 2) == float32(0.3) > 0.3: suppressed, as in the C++ kernel's double comparison.
    assert ops.nms(boxes[[0, 2]], scores[[0, 2]], 0.3).tolist() == [0]


def test_batched_nms_matches_torchvision(ref):
    for name, case in ref["batched_nms"].items():
        got = ops.batched_nms(case["boxes"], case["scores"], case["idxs"], case["thr"])
        # torchvision's per-class path orders equal scores with an unstable sort: compare the
        # kept set and the score sequence; our order among ties is by index.
        assert sorted(got.tolist()) == sorted(case["keep"].tolist()), name
        assert torch.equal(case["scores"][got], case["scores"][case["keep"]]), name


@pytest.mark.parametrize("n", [1, 7, 150, 600])
@pytest.mark.parametrize("thr", [0.3, 0.5, 0.7])
def test_nms_equals_loop_implementations(n, thr):
    xy = make_input(f"prop/{n}/xy", (n, 2), 0, 100)
    boxes = torch.cat([xy, xy + make_input(f"prop/{n}/wh", (n, 2), 1, 50)], 1)
    scores = make_input(f"prop/{n}/s", (n,))
    got = ops.nms(boxes, scores, thr)
    assert torch.equal(got, loop_nms(boxes, scores, thr))
    if n <= 150:
        assert torch.equal(got, naive_nms(boxes, scores, thr))


def test_batched_nms_paths_agree(monkeypatch):
    """The single IoU-matrix path and the per-class loop give the same indices in the same order."""
    n = 1200
    xy = make_input("bn/xy", (n, 2), 0, 300)
    boxes = torch.cat([xy, xy + make_input("bn/wh", (n, 2), 1, 80)], 1)
    scores = make_input("bn/s", (n,))
    idxs = (make_input("bn/c", (n,)) * 4).long()
    with monkeypatch.context() as m:
        m.setattr(ops, "_PER_CLASS_OVERHEAD_ENTRIES", 10**9)  # the single matrix always looks cheaper
        single = ops.batched_nms(boxes, scores, idxs, 0.5)
    monkeypatch.setattr(ops, "_SINGLE_MATRIX_MAX_BOXES", 10)
    per_class = ops.batched_nms(boxes, scores, idxs, 0.5)
    assert torch.equal(single, per_class)
    assert torch.all(scores[single][:-1] >= scores[single][1:])
    for c in range(4):
        members = torch.where(idxs == c)[0]
        kept = members[ops.nms(boxes[members], scores[members], 0.5)]
        assert set(kept.tolist()) == set(single[idxs[single] == c].tolist())


def test_box_ops_match_torchvision(ref):
    b = ref["boxes"]
    torch.testing.assert_close(ops.box_iou(b["box_iou"]["boxes1"], b["box_iou"]["boxes2"]),
                               b["box_iou"]["out"],
                               equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(ops.box_iou(b["box_iou_int"]["boxes"], b["box_iou_int"]["boxes"]),
                               b["box_iou_int"]["out"])
    assert torch.equal(ops.clip_boxes_to_image(b["clip"]["boxes"], b["clip"]["size"]), b["clip"]["out"])
    for min_size, keep in b["small"]["keep"].items():
        assert torch.equal(ops.remove_small_boxes(b["small"]["boxes"], min_size), keep), min_size


def test_roi_align_matches_torchvision(ref):
    case = ref["roi_align"]
    feat = make_input(case["feat_name"], case["feat_shape"], -1.0, 1.0)
    assert len(case["results"]) == 36
    for r in case["results"]:
        got = ops.roi_align(feat, case["rois"], r["output_size"], r["spatial_scale"], r["sampling_ratio"],
                            r["aligned"])
        torch.testing.assert_close(got, r["out"], rtol=0, atol=2e-6,
                                   msg=lambda m, r=r: f"{ {k: v for k, v in r.items() if k != 'out'} }: {m}")
    lf = case["list_form"]
    torch.testing.assert_close(ops.roi_align(feat, lf["boxes"], 7, 0.25, 2), lf["out"], rtol=0, atol=2e-6)
    assert ops.roi_align(feat, torch.zeros((0, 5)), 7, 0.25, 2).shape == case["empty"].shape == (0, 4, 7, 7)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [2, 0])
def test_roi_align_equals_loop_implementation(aligned, sampling_ratio):
    feat = make_input("ra/feat", (2, 3, 9, 12), -1, 1)
    xy = make_input("ra/xy", (12, 2), -10, 40)
    wh = make_input("ra/wh", (12, 2), 0, 30)
    rois = torch.cat([(make_input("ra/b", (12, 1)) * 2).floor(), xy, xy + wh], 1)
    got = ops.roi_align(feat, rois, 4, 0.25, sampling_ratio, aligned)
    want = naive_roi_align(feat, rois, 4, 0.25, sampling_ratio, aligned)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_multiscale_roi_align_matches_torchvision(ref):
    case = ref["multiscale"]
    feats = {k: make_input(name, shape, -1, 1) for k, (name, shape) in case["feat_names"].items()}
    pooler = ops.MultiScaleRoIAlign(["0", "1"], 5, 2)
    got = pooler(feats, case["boxes"], case["image_shapes"])
    assert pooler.scales == case["scales"]
    torch.testing.assert_close(got, case["out"], rtol=0, atol=2e-6)
    assert list(pooler.state_dict()) == []


def test_level_mapper_assigns_by_box_size():
    mapper = ops.LevelMapper(2, 5)
    boxes = [torch.tensor([[0, 0, 10, 10], [0, 0, 112, 112], [0, 0, 224, 224], [0, 0, 448, 448],
                           [0, 0, 2000, 2000.]])]
    assert mapper(boxes).tolist() == [0, 1, 2, 3, 3]


def test_anchor_generator_matches_torchvision(ref):
    case = ref["utils"]["anchors"]
    gen = AnchorGenerator(case["gen_sizes"], ((0.5, 1.0, 2.0),) * 3)
    maps = [torch.zeros((2, 8, h, w)) for h, w in case["grids"]]
    anchors = gen(case["batch_shape"], case["n_images"], maps)
    assert len(anchors) == 2
    assert torch.equal(anchors[0], case["out"])
    # the pool level (13 x 17 over 800 x 1088) has stride 800 // 13 = 61 vertically, 1088 // 17 = 64 across
    pool = anchors[0][-13 * 17 * 6:].view(13, 17, 6, 4)
    assert float(pool[1, 0, 0, 1] - pool[0, 0, 0, 1]) == 61.0
    assert float(pool[0, 1, 0, 0] - pool[0, 0, 0, 0]) == 64.0


def test_box_coder_matches_torchvision(ref):
    case = ref["utils"]["coder"]
    ref_boxes, gt = case["ref"], case["gt"]
    for weights, expected in case["results"].items():
        coder = BoxCoder(weights)
        enc = coder.encode([gt[:20], gt[20:]], [ref_boxes[:20], ref_boxes[20:]])
        for a, b in zip(enc, expected["encode"]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(coder.decode(case["codes"], [ref_boxes[:20], ref_boxes[20:]]),
                                   expected["decode"],
                                   rtol=1e-6, atol=1e-4)


def test_matcher_matches_torchvision(ref):
    case = ref["utils"]["matcher"]
    for (fg, bg, low_q), expected in case["results"].items():
        assert torch.equal(Matcher(fg, bg, low_q)(case["quality"].clone()), expected), (fg, bg, low_q)
    with pytest.raises(ValueError, match="No ground-truth boxes"):
        Matcher(0.7, 0.3)(torch.zeros((0, 5)))


def test_sampler_draws_match_torchvision_under_the_same_seed(ref):
    case = ref["utils"]["sampler"]
    for seed, expected in case["results"].items():
        torch.manual_seed(seed)
        pos, neg = BalancedPositiveNegativeSampler(256, 0.5)(case["labels"])
        for got, want in zip(pos + neg, expected["pos"] + expected["neg"]):
            assert torch.equal(got, want.bool()), seed
    pos, neg = BalancedPositiveNegativeSampler(256, 0.5)(case["labels"])
    assert int(pos[0].sum()) == 128 and int(neg[0].sum()) == 128


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match=r"boxes must be a tensor of shape \[N, 4\]"):
        ops.nms(torch.zeros(3, 5), torch.zeros(3), 0.5)
    with pytest.raises(ValueError, match="scores must have shape"):
        ops.nms(torch.zeros(3, 4), torch.zeros(2), 0.5)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        ops.roi_align(torch.zeros(3, 4, 5), torch.zeros(1, 5), 7)
    with pytest.raises(ValueError, match=r"rois must have shape \[K, 5\]"):
        ops.roi_align(torch.zeros(1, 3, 4, 5), torch.zeros(1, 4), 7)
    with pytest.raises(ValueError, match="batch indices"):
        ops.roi_align(torch.zeros(1, 3, 4, 5), torch.tensor([[1.0, 0, 0, 2, 2]]), 7)
