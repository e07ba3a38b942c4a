"""Measure the detection ops and detectors on CPU (numbers for the closing note of the detection work).

    python scripts/measure_detection_speed.py [--repeats N] [--threads T]

Prints (a) the speedup of the vectorized ops in ``mnv3.ops`` over straightforward loop
implementations (``tests/naive_ops.py``, written from the definitions) on inputs of the
sizes the detectors produce, (b) images/s per core of both Faster R-CNN detectors (fp32,
batch 1, one 640x480 image, ``torch.set_num_threads(1)``) and (c) the share of detector time
spent in the transform, backbone + FPN, RPN head, RPN proposal filtering (decode, top-k,
NMS), RoIAlign, the box head (fc6/fc7 + predictor) and the rest (detection post-processing).

Weights are the builders' random init (no download): the RPN still keeps its full
post-NMS count of proposals, so the box head runs on as many RoIs as with trained weights,
but few boxes pass the final score threshold, so the last per-class NMS is cheaper than with
trained weights. Times are medians over ``--repeats`` runs; on a shared machine compare the
ratios printed in one run rather than absolute times.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from naive_ops import loop_nms, naive_nms, naive_roi_align  # noqa: E402

import mnv3  # noqa: E402
from mnv3 import ops  # noqa: E402


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def random_boxes(n: int, span: float, max_wh: float, gen: torch.Generator) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=gen) * span
    wh = torch.rand(n, 2, generator=gen) * max_wh + 1.0
    return torch.cat([xy, xy + wh], dim=1)


def offset_batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor,
                       thr: float) -> torch.Tensor:
    """Straightforward batched NMS: shift each class by its own offset, then one loop NMS."""
    offsets = idxs.to(boxes) * (boxes.max() + 1)
    return loop_nms(boxes + offsets[:, None], scores, thr)


def naive_multiscale(features: dict[str, torch.Tensor], boxes: list[torch.Tensor],
                     pooler: ops.MultiScaleRoIAlign) -> torch.Tensor:
    """Level mapping, then the loop RoIAlign level by level."""
    feats = [features[k] for k in pooler.featmap_names if k in features]
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], 1) for i, b in enumerate(boxes)])
    levels = pooler.map_levels(boxes) if len(feats) > 1 else torch.zeros(len(rois), dtype=torch.int64)
    out = torch.zeros(len(rois), feats[0].shape[1], *pooler.output_size)
    for level, (feat, scale) in enumerate(zip(feats, pooler.scales, strict=True)):
        idx = torch.where(levels == level)[0]
        if idx.numel():
            out[idx] = naive_roi_align(feat, rois[idx], pooler.output_size[0], scale, pooler.sampling_ratio)
    return out


def measure_ops(repeats: int) -> list[tuple[str, float, float, str]]:
    """(case, ours in s, straightforward in s, which straightforward) for each op case."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n in (150, 1000, 2000):
        boxes, scores = random_boxes(n, 600, 200, gen), torch.rand(n, generator=gen)
        ours = median_time(lambda b=boxes, s=scores: ops.nms(b, s, 0.7), repeats)
        loop = median_time(lambda b=boxes, s=scores: loop_nms(b, s, 0.7), repeats)
        rows.append((f"nms, {n} boxes, thr 0.7", ours, loop, "tensor loop over kept boxes"))
        if n <= 1000:
            pure = median_time(lambda b=boxes, s=scores: naive_nms(b, s, 0.7), max(1, repeats // 3), warmup=0)
            rows.append((f"nms, {n} boxes, thr 0.7", ours, pure, "pure Python pairs"))
    # RPN: 3 levels x 1000 proposals, NMS per level; box head: 1000 RoIs x 90 classes -> scores > thr.
    for n, classes, thr, what in ((3000, 3, 0.7, "RPN, 3 levels"), (1500, 30, 0.5, "box head, 30 classes")):
        boxes, scores = random_boxes(n, 600, 200, gen), torch.rand(n, generator=gen)
        idxs = torch.randint(0, classes, (n,), generator=gen)
        ours = median_time(lambda b=boxes, s=scores, i=idxs, t=thr: ops.batched_nms(b, s, i, t), repeats)
        loop = median_time(lambda b=boxes, s=scores, i=idxs, t=thr: offset_batched_nms(b, s, i, t), repeats)
        rows.append((f"batched_nms, {n} boxes ({what})", ours, loop, "class offsets + tensor loop NMS"))
    # RoIAlign on a stride-32 map of a 640x480 image resized to 320 (10 x 14) and to 800 (25 x 34).
    for k, (h, w) in ((150, (10, 14)), (300, (25, 34))):
        feat = torch.randn(1, 256, h, w, generator=gen)
        b = random_boxes(k, w * 32 * 0.8, w * 32 * 0.5, gen)
        rois = torch.cat([torch.zeros(k, 1), b], 1)
        ours = median_time(lambda f=feat, r=rois: ops.roi_align(f, r, 7, 1 / 32, 2), repeats)
        naive = median_time(lambda f=feat, r=rois: naive_roi_align(f, r, 7, 1 / 32, 2), 1, warmup=0)
        rows.append((f"roi_align, {k} RoIs, 256 x {h} x {w}, 7x7, sampling 2", ours, naive,
                     "loops over samples"))
    # The detectors' pooler: maps '0' and '1' at stride 32 (every RoI pooled from '0').
    feats = {"0": torch.randn(1, 256, 25, 34, generator=gen), "1": torch.randn(1, 256, 25, 34, generator=gen)}
    pooler = ops.MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    boxes = [random_boxes(200, 800, 400, gen)]
    ours = median_time(lambda: pooler(feats, boxes, [(800, 1066)]), repeats)
    naive = median_time(lambda: naive_multiscale(feats, boxes, pooler), 1, warmup=0)
    rows.append(("MultiScaleRoIAlign, 200 RoIs, 2 maps 256 x 25 x 34", ours, naive,
                 "level map + loop RoIAlign"))
    # A pyramid where RoIs really spread over levels (stride 4..32), as in a classic FPN.
    feats = {str(i): torch.randn(1, 64, 200 >> i, 272 >> i, generator=gen) for i in range(4)}
    pooler = ops.MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    boxes = [random_boxes(200, 800, 500, gen)]
    ours = median_time(lambda: pooler(feats, boxes, [(800, 1088)]), repeats)
    naive = median_time(lambda: naive_multiscale(feats, boxes, pooler), 1, warmup=0)
    rows.append(("MultiScaleRoIAlign, 200 RoIs, 4 levels 64 ch", ours, naive, "level map + loop RoIAlign"))
    return rows


class StageTimer:
    """Wall time per named submodule via forward pre/post hooks (summed over calls)."""

    def __init__(self, model: torch.nn.Module, stages: dict[str, str]) -> None:
        self.totals = dict.fromkeys(stages, 0.0)
        self._start: dict[str, float] = {}
        for label, path in stages.items():
            module = model.get_submodule(path)
            module.register_forward_pre_hook(lambda *_, label=label: self._begin(label))
            module.register_forward_hook(lambda *_, label=label: self._end(label))

    def _begin(self, label: str) -> None:
        self._start[label] = time.perf_counter()

    def _end(self, label: str) -> None:
        self.totals[label] += time.perf_counter() - self._start.pop(label)

    def reset(self) -> None:
        self.totals = dict.fromkeys(self.totals, 0.0)


def measure_detector(name: str, build: Callable[..., torch.nn.Module], repeats: int) -> dict[str, float]:
    """Median per-image seconds in total and per stage for one 640x480 image, batch 1."""
    torch.manual_seed(0)
    model = build(num_classes=91).eval()
    image = torch.rand(3, 480, 640, generator=torch.Generator().manual_seed(1))
    # Hook the RPN head separately: rpn = head + anchors/decode/top-k/NMS ("rpn filter").
    timer = StageTimer(model, {"transform": "transform", "backbone+fpn": "backbone", "rpn": "rpn",
                               "rpn head": "rpn.head", "roi_align": "roi_heads.box_roi_pool",
                               "box head": "roi_heads.box_head", "box predictor": "roi_heads.box_predictor"})
    runs: list[dict[str, float]] = []
    with torch.no_grad():
        model([image])
        for _ in range(repeats):
            timer.reset()
            t = time.perf_counter()
            out = model([image])
            total = time.perf_counter() - t
            runs.append({"total": total, **timer.totals})
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    shares = {
        "transform": med["transform"],
        "backbone+fpn": med["backbone+fpn"],
        "rpn head (conv)": med["rpn head"],
        "rpn filter (anchors, decode, top-k, NMS)": med["rpn"] - med["rpn head"],
        "roi_align": med["roi_align"],
        "box head (fc6, fc7, predictor)": med["box head"] + med["box predictor"],
    }
    shares["other (post-processing, NMS per class)"] = med["total"] - sum(shares.values())
    print(f"\n{name}: {1.0 / med['total']:.2f} images/s per core ({med['total'] * 1000:.0f} ms per image, "
          f"median of {repeats}); {len(out[0]['boxes'])} boxes in the last output")
    for label, seconds in shares.items():
        print(f"  {label:44s} {seconds * 1000:8.1f} ms  {100 * seconds / med['total']:5.1f} %")
    return med


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 = per core)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    print("\n(a) ops: vectorized mnv3.ops vs straightforward implementations (median wall time)")
    for case, ours, other, what in measure_ops(args.repeats):
        print(f"  {case:58s} ours {ours * 1000:8.2f} ms  {what} {other * 1000:9.1f} ms  x{other / ours:7.1f}")
    print("\n(b, c) detectors: fp32, batch 1, one 640x480 image")
    measure_detector("fasterrcnn_mobilenet_v3_large_320_fpn", mnv3.fasterrcnn_mobilenet_v3_large_320_fpn,
                     args.repeats)
    measure_detector("fasterrcnn_mobilenet_v3_large_fpn", mnv3.fasterrcnn_mobilenet_v3_large_fpn,
                     args.repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
