"""``mnv3-pipeline quantize``: calibrate an int8 model on your images, gate it, save the artifact."""

from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize", help="post-training int8 quantization with an accuracy gate against fp32",
        description="Calibrate an int8 version of a model on a sample of your images, compare it with "
                    "fp32 on held-out images (the accuracy gate) and write an int8 artifact that annotate "
                    "loads. "
                    "Exit code 4 when the gate refuses the int8 model.")
    p.add_argument("--task", choices=["classification", "detection", "segmentation", "classify", "detect",
                                      "segment"], help="task (default: the builder's)")
    p.add_argument("--builder", required=True, help="e.g. mobilenet_v3_large, "
                   "fasterrcnn_mobilenet_v3_large_320_fpn, lraspp_mobilenet_v3_large")
    p.add_argument("--weights", help="fp32 weights: registry name or URI (local, s3://, https://)")
    p.add_argument("--num-classes", type=int, help="classes of the weights (a finetune export's sidecar "
                   "gives them, and its sizes)")
    p.add_argument("--calibration", required=True,
                   help="URL of images or tar shards (e.g. the synth dataset)")
    p.add_argument("--output", required=True, help="artifact URL to write (local path or s3://...)")
    p.add_argument("--max-drop", type=float, help="largest allowed fp32 -> int8 drop in points (default: "
                   "classification 3, detection 5, segmentation 3)")
    p.add_argument("--calib-images", type=int, default=32, help="calibration images (default 32)")
    p.add_argument("--holdout-images", type=int, default=32, help="held-out images for the gate (default 32)")
    p.add_argument("--backend", help="qconfig family: x86, fbgemm, qnnpack (default: the engine)")
    p.add_argument("--engine", help="quantized engine (default: x86 on x86-64, qnnpack on ARM)")
    p.add_argument("--resize-size", type=int, help="classification resize / segmentation shorter side")
    p.add_argument("--crop-size", type=int, help="classification centre crop")
    p.add_argument("--labelled", action="store_true",
                   help="gate against ground truth: --calibration is a COCO dataset (annotations.json + "
                        "images or tar shards, as finetune reads) with the categories of --weights, a "
                        "finetune export")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.int8_export import QuantizeRequest, quantize_to_artifact
    from pipeline.quality_gate import QualityGateError

    kwargs = {"num_classes": args.num_classes} if args.num_classes else {}
    req = QuantizeRequest(builder=args.builder, calibration_url=args.calibration, output_url=args.output,
                          task=args.task, weights=args.weights, builder_kwargs=kwargs, backend=args.backend,
                          engine=args.engine, calib_images=args.calib_images,
                          holdout_images=args.holdout_images, max_drop=args.max_drop,
                          resize_size=args.resize_size, crop_size=args.crop_size, labelled=args.labelled)
    try:
        meta = quantize_to_artifact(req)
    except QualityGateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 4
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"output": args.output, "gate": meta["gate"]}, indent=1))
    return 0
