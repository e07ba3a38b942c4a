"""Detection parity fixtures: torchvision.ops on hand-made edge cases and both Faster R-CNN
MobileNetV3 detectors (shared deterministic fill) on images of several sizes and shapes.

Writes ``ops.pt`` (inputs and outputs of every op case), ``<layout>.keys.json`` and
``detectors.pt`` (fill gains, model kwargs, input names/shapes, detections, training losses).
The test side rebuilds inputs with ``param_fill.make_input`` and weights with ``fill_model``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torchvision
from make_fixtures import write_keys
from param_fill import fill_model, make_input
from torchvision import ops as tvops
from torchvision.models import mobilenet_v3_large
from torchvision.models.detection import (
    fasterrcnn_mobilenet_v3_large_320_fpn,
    fasterrcnn_mobilenet_v3_large_fpn,
)
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, BoxCoder, Matcher
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import _mobilenet_extractor
from torchvision.models.detection.faster_rcnn import FasterRCNN
from torchvision.models.detection.image_list import ImageList
from torchvision.ops.misc import FrozenBatchNorm2d

# ----------------------------------------------------------------------------- ops


def _boxes(name: str, n: int, span: float = 100.0, max_wh: float = 40.0) -> torch.Tensor:
    xy = make_input(name + "/xy", (n, 2), -0.1 * span, span)
    wh = make_input(name + "/wh", (n, 2), 0.0, max_wh)
    return torch.cat([xy, xy + wh], dim=1)


def nms_cases() -> dict:
    cases = {}
    # IoU exactly 0.5 with threshold 0.5: both kept (strict >). IoU = 0.3 exactly representable?
    # float32(30/100) > 0.3 in double, so the C++ comparison suppresses it.
    cases["iou_at_threshold"] = (torch.tensor([[0, 0, 10, 10], [0, 0, 10, 5], [0, 0, 10, 3],
                                               [20, 20, 30, 30.]]),
                                 torch.tensor([0.9, 0.8, 0.7, 0.6]), [0.5, 0.3, 0.7, 0.29])
    # Equal scores: order among ties is decided by index (stable sort).
    cases["ties"] = (torch.tensor([[0, 0, 10, 10], [1, 0, 11, 10], [0, 1, 10, 11], [50, 50, 60, 60],
                                   [0, 0, 10, 10.]]),
                     torch.tensor([0.5, 0.5, 0.5, 0.5, 0.5]), [0.5, 0.7])
    cases["empty"] = (torch.zeros((0, 4)), torch.zeros((0,)), [0.5])
    cases["single"] = (torch.tensor([[1, 2, 3, 4.]]), torch.tensor([0.1]), [0.5])
    # Degenerate (zero area) boxes: IoU is 0/0 = NaN, never suppressed; boxes outside the image.
    cases["degenerate_outside"] = (torch.tensor([[5, 5, 5, 5], [5, 5, 5, 5], [-20, -20, -5, -5],
                                                 [-19, -20, -5, -4],
                                                 [0, 0, 0, 10], [200, 300, 260, 330.]]),
                                   torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4]), [0.5, 0.0])
    b = _boxes("nms/random", 300)
    s = (make_input("nms/random/scores", (300,)) * 20).round() / 20  # many exact ties
    cases["random_ties"] = (b, s, [0.3, 0.5, 0.7])
    b = _boxes("nms/chain", 400, span=60, max_wh=60)
    cases["dense_chain"] = (b, make_input("nms/chain/scores", (400,)), [0.5, 0.7, 0.9])
    out = {}
    for name, (boxes, scores, thrs) in cases.items():
        out[name] = {"boxes": boxes, "scores": scores,
                     "keep": {thr: tvops.nms(boxes, scores, thr) for thr in thrs}}
    return out


def batched_nms_cases() -> dict:
    out = {}
    # Same box in two classes: both kept; same class: one suppressed.
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 5.]])
    out["classes"] = {"boxes": boxes, "scores": torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5]),
                      "idxs": torch.tensor([0, 1, 0, 1, 2]), "thr": 0.5}
    out["empty"] = {"boxes": torch.zeros((0, 4)), "scores": torch.zeros((0,)),
                    "idxs": torch.zeros((0,), dtype=torch.int64), "thr": 0.5}
    for name, n, ncls in (("small_many_classes", 500, 20), ("large_few_classes", 2600, 3)):
        b = _boxes(f"bnms/{name}", n, span=200, max_wh=80)
        out[name] = {"boxes": b, "scores": make_input(f"bnms/{name}/s", (n,)),
                     "idxs": (make_input(f"bnms/{name}/c", (n,)) * ncls).long().clamp(max=ncls - 1),
                     "thr": 0.6}
    for case in out.values():
        case["keep"] = tvops.batched_nms(case["boxes"], case["scores"], case["idxs"], case["thr"])
    return out


def box_cases() -> dict:
    b1 = torch.cat([_boxes("iou/a", 30), torch.tensor([[0, 0, 0, 0], [5, 5, 5, 9.]])])
    b2 = torch.cat([_boxes("iou/b", 20), torch.tensor([[0, 0, 0, 0.]])])
    outside = torch.tensor([[-10, -5, 30, 40], [50, 60, 250, 170], [-30, -30, -10, -10], [10, 10, 20, 20],
                            [120, 90, 140, 95.]])
    small = torch.tensor([[0, 0, 1e-3, 5], [0, 0, 9e-4, 5], [0, 0, 1e-2, 1e-2], [0, 0, 0.0099, 1],
                          [3, 3, 2, 5], [0, 0, 10, 10.]])
    int_boxes = torch.tensor([[0, 0, 10, 10], [5, 5, 15, 15], [0, 0, 3, 7]], dtype=torch.int64)
    return {
        "box_iou": {"boxes1": b1, "boxes2": b2, "out": tvops.box_iou(b1, b2)},
        "box_iou_int": {"boxes": int_boxes, "out": tvops.box_iou(int_boxes, int_boxes)},
        "clip": {"boxes": outside, "size": (100, 120), "out": tvops.clip_boxes_to_image(outside, (100, 120))},
        "small": {"boxes": small, "keep": {m: tvops.remove_small_boxes(small, m) for m in (1e-3, 1e-2, 1.0)}},
    }


def roi_align_cases() -> dict:
    feat = make_input("roi/feat", (2, 4, 11, 13), -1.0, 1.0)
    rois = torch.tensor([
        [0, 2.0, 3.0, 30.0, 25.0],      # ordinary
        [1, 0.0, 0.0, 52.0, 44.0],      # whole image (at borders, scale 1/4)
        [0, 48.0, 40.0, 52.0, 44.0],    # bottom-right corner
        [1, 10.0, 10.0, 10.0, 10.0],    # degenerate (zero size)
        [0, 7.5, 3.25, 7.75, 30.0],     # sliver
        [1, -20.0, -16.0, 8.0, 6.0],    # partly outside (negative)
        [0, 60.0, 50.0, 90.0, 80.0],    # completely outside
        [1, -8.0, -8.0, 70.0, 60.0],    # larger than the image
        [0, 30.0, 20.0, 12.0, 5.0],     # reversed corners
    ])
    out = {"feat_name": "roi/feat", "feat_shape": (2, 4, 11, 13), "rois": rois, "results": []}
    for aligned in (False, True):
        for sampling in (2, 1, 0):
            for scale in (0.25, 1.0 / 3.0, 1.0):
                for size in (7, (3, 5)):
                    y = tvops.roi_align(feat, rois, size, spatial_scale=scale, sampling_ratio=sampling,
                                        aligned=aligned)
                    out["results"].append({"aligned": aligned, "sampling_ratio": sampling,
                                           "spatial_scale": scale, "output_size": size, "out": y})
    # list-of-boxes form and an empty RoI set
    boxes = [rois[rois[:, 0] == 0, 1:], rois[rois[:, 0] == 1, 1:]]
    out["list_form"] = {"boxes": boxes, "out": tvops.roi_align(feat, boxes, 7, 0.25, 2)}
    out["empty"] = tvops.roi_align(feat, torch.zeros((0, 5)), 7, 0.25, 2)
    return out


def multiscale_cases() -> dict:
    feats = {"0": make_input("msroi/0", (2, 3, 16, 16), -1, 1),
             "1": make_input("msroi/1", (2, 3, 8, 8), -1, 1),
             "pool": make_input("msroi/pool", (2, 3, 4, 4), -1, 1)}
    boxes = [torch.tensor([[0, 0, 10, 10], [4, 4, 60, 60], [0, 0, 64, 48], [2, 3, 150, 160.]]),
             torch.tensor([[10, 10, 30, 40], [0, 0, 160, 160.], [5, 5, 6, 6]])]
    shapes = [(64, 64), (60, 50)]
    pooler = tvops.MultiScaleRoIAlign(["0", "1"], 5, 2)
    y = pooler(feats, boxes, shapes)
    return {"feat_names": {k: (f"msroi/{k}", tuple(v.shape)) for k, v in feats.items()}, "boxes": boxes,
            "image_shapes": shapes, "out": y, "scales": pooler.scales}


def detection_util_cases() -> dict:
    gen = AnchorGenerator(((32,), (64,), (128, 256)), ((0.5, 1.0, 2.0),) * 3)
    image = torch.zeros((2, 3, 800, 1088))
    maps = [torch.zeros((2, 8, 25, 34)), torch.zeros((2, 8, 25, 34)), torch.zeros((2, 8, 13, 17))]
    anchors = gen(ImageList(image, [(800, 1080), (790, 1088)]), maps)
    ref = _boxes("coder/ref", 50, span=300, max_wh=120)
    ref[:, 2:] += 1.0
    gt = _boxes("coder/gt", 50, span=300, max_wh=120)
    gt[:, 2:] += 1.0
    codes = make_input("coder/codes", (50, 12), -6.0, 6.0)  # includes dw, dh beyond the clamp
    coders = {}
    for w in ((1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)):
        c = BoxCoder(w)
        coders[w] = {"encode": c.encode([gt[:20], gt[20:]], [ref[:20], ref[20:]]),
                     "decode": c.decode(codes, [ref[:20], ref[20:]])}
    quality = torch.tensor([[0.9, 0.7, 0.3, 0.1, 0.65, 0.0], [0.2, 0.69, 0.3, 0.29, 0.65, 0.0],
                            [0.0, 0.1, 0.05, 0.05, 0.2, 0.0]])
    matchers = {}
    for fg, bg, low_q in ((0.7, 0.3, True), (0.7, 0.3, False), (0.5, 0.5, False)):
        matchers[(fg, bg, low_q)] = Matcher(fg, bg, low_q)(quality.clone())
    labels = [(make_input("sampler/a", (3000,)) * 3).floor() - 1,
              (make_input("sampler/b", (500,)) * 1.2).floor()]
    sampler = {}
    for seed in (0, 7):
        torch.manual_seed(seed)
        pos, neg = BalancedPositiveNegativeSampler(256, 0.5)(labels)
        sampler[seed] = {"pos": pos, "neg": neg}
    return {"anchors": {"gen_sizes": ((32,), (64,), (128, 256)), "batch_shape": (800, 1088),
                        "grids": [(25, 34), (25, 34), (13, 17)], "out": anchors[0], "n_images": len(anchors)},
            "coder": {"ref": ref, "gt": gt, "codes": codes, "results": coders},
            "matcher": {"quality": quality, "results": matchers},
            "sampler": {"labels": labels, "results": sampler}}


# ----------------------------------------------------------------------------- detectors

# (H, W): landscape, portrait, square, and one wider than both max_size values.
IMAGE_SHAPES = [(120, 160), (200, 90), (100, 100), (150, 1400)]
TRAIN_TARGETS = [
    {"boxes": [[10.0, 20.0, 80.0, 100.0], [50.0, 10.0, 150.0, 60.0], [0.0, 0.0, 40.0, 30.0]],
     "labels": [3, 17, 1]},
    {"boxes": [[5.0, 30.0, 85.0, 190.0], [20.0, 20.0, 40.0, 60.0]], "labels": [44, 3]},
]
VARIANTS = {
    "fpn": (fasterrcnn_mobilenet_v3_large_fpn, {"rpn_score_thresh": 0.05}),
    "320_fpn": (fasterrcnn_mobilenet_v3_large_320_fpn,
                {"min_size": 320, "max_size": 640, "rpn_pre_nms_top_n_test": 150,
                 "rpn_post_nms_top_n_test": 150, "rpn_score_thresh": 0.05}),
}
# Gains by key prefix (longest prefix wins). The box-regression layers get small gains: with
# unit gain their deltas reach the exp() clamp, so boxes grow ~60x, and even small deltas
# multiply the rounding noise of the fp32 convolutions (which differs between thread counts,
# CPUs and torch versions) by the anchor size (up to 512 px). Tiny weights keep that noise far
# below the 1e-3 px tolerance (the filled biases still move every box); the box coder itself is
# checked with large codes in the ops fixtures.
HEAD_GAINS = {"backbone.fpn": 1.0, "rpn": 1.0, "roi_heads": 1.0,
              "rpn.head.bbox_pred": 0.002, "roi_heads.box_predictor.bbox_pred": 0.02}
# Per-image detection cap in the fixtures, above any count they produce (so no cut at a tie).
MAX_DETS = 250
# The fixtures must be robust to fp32 rounding: the same model in float64 must give the same
# detections within these margins (half the test tolerances; float32's spacing is 1.2e-4 px for
# the ~1400 px coordinates of the widest image), and no box score may lie this close to the
# score threshold.
FP64_BOX_MARGIN = 5e-4
FP64_LOSS_MARGIN = 2.5e-5
SCORE_THRESH_MARGIN = 1e-4
# Training parity: every labelled anchor and every proposal is "sampled" (batch sizes above
# any count), so the losses do not depend on which near-tied proposals the RNG draws; fewer
# proposals than the defaults keep the box head cheap, and a smaller resize (256, max 512 for
# both variants: only the state_dict layout differs between the two training cases) keeps the
# backward pass through the backbone quick in the tests.
TRAIN_KWARGS = {"rpn_batch_size_per_image": 1_000_000, "box_batch_size_per_image": 1_000_000,
                "rpn_pre_nms_top_n_train": 1000, "rpn_post_nms_top_n_train": 200,
                "min_size": 256, "max_size": 512}


def build_tv(variant: str, frozen: bool, **kwargs):
    """torchvision detector without downloads: BN layout from the builder, FrozenBN layout by hand."""
    builder, defaults = VARIANTS[variant]
    if not frozen:
        return builder(weights=None, weights_backbone=None, **kwargs)
    backbone = _mobilenet_extractor(mobilenet_v3_large(norm_layer=FrozenBatchNorm2d), True, 3)
    anchors = AnchorGenerator(((32, 64, 128, 256, 512),) * 3, ((0.5, 1.0, 2.0),) * 3)
    return FasterRCNN(backbone, 91, rpn_anchor_generator=anchors, **{**defaults, **kwargs})


def image_inputs(prefix: str, shapes) -> tuple[list[str], list[torch.Tensor]]:
    names = [f"{prefix}/{h}x{w}" for h, w in shapes]
    return names, [make_input(n, (3, h, w)) for n, (h, w) in zip(names, shapes)]


def detector_gain(variant: str) -> float:
    """Global fill gain giving the FPN's first map a std of about 1 (bisection, 4 decimals)."""
    model = build_tv(variant, True).eval()
    _, imgs = image_inputs("gain", IMAGE_SHAPES[:1])
    batch, _ = model.transform(imgs)
    lo, hi = 0.5, 1.0
    for _ in range(16):
        mid = (lo + hi) / 2
        fill_model(model, gain=mid)  # uniform gain here; the head gains are applied afterwards
        with torch.no_grad():
            std = float(model.backbone(batch.tensors)["0"].std())
        lo, hi = (lo, mid) if std > 1.0 else (mid, hi)
    return round((lo + hi) / 2, 4)


def sorted_dets(d: dict) -> dict:
    return {k: v.detach().clone() for k, v in d.items()}


def choose_score_thresh(variant: str, gain: float, gains: dict[str, float],
                        imgs: list[torch.Tensor]) -> float:
    """Lowest candidate threshold that leaves every image between 3 and MAX_DETS boxes.

    NMS in score order is unaffected by dropping boxes below a higher threshold, so counts at
    each candidate come from one run at the default 0.05 with a large per-image cap.
    """
    model = fill_model(build_tv(variant, True, box_detections_per_img=1000), gain=gain, gains=gains).eval()
    with torch.no_grad():
        scores = [model([img])[0]["scores"] for img in imgs]
    for thr in [round(0.1 + 0.05 * i, 2) for i in range(18)]:  # 0.1, 0.15, ..., 0.95
        counts = [int((s > thr).sum()) for s in scores]
        near = sum(int(((s - thr).abs() < SCORE_THRESH_MARGIN).sum()) for s in scores)
        if max(counts) <= MAX_DETS and near == 0:
            print(f"{variant}: box_score_thresh {thr} -> boxes per image {counts}")
            if min(counts) < 3:
                raise RuntimeError(f"{variant}: too few boxes at threshold {thr}: {counts}; "
                                   "tune the fill gains")
            return thr
    raise RuntimeError(f"{variant}: no threshold keeps <= {MAX_DETS} boxes per image clear of near-ties")


def matched_box_diff(a: dict, b: dict) -> float:
    """Largest box difference after pairing each box of ``b`` with the closest same-label box of ``a``."""
    free = torch.ones(len(a["boxes"]), dtype=torch.bool)
    worst = 0.0
    for box, label in zip(b["boxes"].double(), b["labels"]):
        diff = (a["boxes"].double() - box).abs().amax(dim=1)
        diff[(a["labels"] != label) | ~free] = float("inf")
        j = int(diff.argmin())
        free[j] = False
        worst = max(worst, float(diff[j]))
    return worst


def detector_case(variant: str) -> dict:
    gain = detector_gain(variant)
    # The FPN, RPN and box head keep unit gain: the global gain is tuned for the deep backbone.
    gains = dict(HEAD_GAINS)
    names, imgs = image_inputs("det", IMAGE_SHAPES)
    kwargs = {"box_score_thresh": choose_score_thresh(variant, gain, gains, imgs),
              "box_detections_per_img": 1000}
    model = fill_model(build_tv(variant, True, **kwargs), gain=gain, gains=gains).eval()
    runs = []
    groups = [[i] for i in range(len(imgs))]
    if variant == "320_fpn":
        groups.append(list(range(len(imgs))))  # one padded batch of all four
    for group in groups:
        with torch.no_grad():
            dets = model([imgs[i] for i in group])
        runs.append({"images": group, "detections": [sorted_dets(d) for d in dets]})
    # float64 run on a fresh model: the same detections tell that fp32 rounding cannot flip a decision.
    model64 = fill_model(build_tv(variant, True, **kwargs), gain=gain, gains=gains).eval().double()
    for run in runs:
        with torch.no_grad():
            dets64 = model64([imgs[i].double() for i in run["images"]])
        for d32, d64 in zip(run["detections"], dets64):
            same = len(d32["labels"]) == len(d64["labels"]) and torch.equal(d32["labels"].sort().values,
                                                                              d64["labels"].sort().values)
            diff = matched_box_diff(d32, d64) if same else float("inf")
            run.setdefault("fp64_same", []).append(same)
            run.setdefault("fp64_box_diff", []).append(diff)
        if not all(run["fp64_same"]) or max(run["fp64_box_diff"]) > FP64_BOX_MARGIN:
            raise RuntimeError(f"{variant} images {run['images']}: float64 detections differ (same labels "
                               f"{run['fp64_same']}, box diffs {run['fp64_box_diff']}); the fixture is too "
                               "sensitive to rounding: lower the box-regression gains")
    return {"gain": gain, "gains": gains, "kwargs": kwargs, "image_names": names,
            "image_shapes": IMAGE_SHAPES, "runs": runs}


def _train_step(variant: str, frozen: bool, gain: float, dtype: torch.dtype) -> tuple[dict, dict]:
    model = fill_model(build_tv(variant, frozen, **TRAIN_KWARGS), gain=gain, gains=HEAD_GAINS)
    model = model.to(dtype).train()
    _, imgs = image_inputs("train", IMAGE_SHAPES[:2])
    targets = [{"boxes": torch.tensor(t["boxes"], dtype=dtype), "labels": torch.tensor(t["labels"])}
               for t in TRAIN_TARGETS]
    torch.manual_seed(1234)
    losses = model([img.to(dtype) for img in imgs], targets)
    sum(losses.values()).backward()
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters()
             if k in ("rpn.head.cls_logits.bias", "roi_heads.box_predictor.bbox_pred.bias")}
    return {k: v.detach() for k, v in losses.items()}, grads


def training_case(variant: str, frozen: bool, gain: float) -> dict:
    losses, grads = _train_step(variant, frozen, gain, torch.float32)
    losses64, _ = _train_step(variant, frozen, gain, torch.float64)
    fp64_diff = {k: abs(float(losses[k]) - float(losses64[k])) for k in losses}
    if max(fp64_diff.values()) > FP64_LOSS_MARGIN:
        raise RuntimeError(f"{variant} training: float64 losses differ by {fp64_diff}; the fixture is too "
                           "sensitive to rounding")
    names, _ = image_inputs("train", IMAGE_SHAPES[:2])
    return {"frozen": frozen, "gain": gain, "gains": dict(HEAD_GAINS), "kwargs": dict(TRAIN_KWARGS),
            "image_names": names, "image_shapes": IMAGE_SHAPES[:2], "targets": TRAIN_TARGETS, "seed": 1234,
            "losses": losses, "grads": grads, "fp64_loss_diff": fp64_diff}


def make(out_dir: Path) -> None:
    print(f"torchvision {torchvision.__version__}, torch {torch.__version__}")
    ops = {"nms": nms_cases(), "batched_nms": batched_nms_cases(), "boxes": box_cases(),
           "roi_align": roi_align_cases(), "multiscale": multiscale_cases(), "utils": detection_util_cases()}
    torch.save(ops, out_dir / "ops.pt")
    for variant in VARIANTS:
        for frozen in (True, False):
            layout = "frozen" if frozen else "bn"
            write_keys(out_dir / f"{variant}_{layout}.keys.json", build_tv(variant, frozen).state_dict())
    detectors = {}
    for variant in VARIANTS:
        case = detector_case(variant)
        detectors[variant] = case
        for run in case["runs"]:
            print(f"{variant} images {run['images']}: boxes {[len(d['boxes']) for d in run['detections']]} "
                  f"fp64 same {run['fp64_same']} max box diff {max(run['fp64_box_diff']):.2e}")
        detectors[f"{variant}_train"] = training_case(variant, variant == "fpn", case["gain"])
        train = detectors[f"{variant}_train"]
        print(f"{variant} training losses", {k: round(float(v), 5) for k, v in train["losses"].items()},
              "fp64 diffs", {k: f"{v:.1e}" for k, v in train["fp64_loss_diff"].items()})
    torch.save(detectors, out_dir / "detectors.pt")
    sizes = {p.name: p.stat().st_size for p in out_dir.iterdir()}
    print("fixture sizes (bytes):", sizes, "total", sum(sizes.values()))
    assert sum(sizes.values()) < 1_000_000, "detection fixtures must stay under 1 MB"
    assert math.isfinite(sum(float(v) for v in detectors["fpn_train"]["losses"].values()))
