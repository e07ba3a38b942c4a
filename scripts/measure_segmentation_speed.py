"""Images/s per core of LR-ASPP and DeepLabV3 (MobileNetV3-Large) at the 520 and 320 presets.

    python scripts/measure_segmentation_speed.py [--sizes 520,320] [--rounds 5] [--iters 3] [--json out.json]

fp32 eager, batch 1, ``torch.set_num_threads(1)``, ``torch.no_grad()``, square inputs of
each size (what the presets give a square image; other aspect ratios scale with the pixel
count). Weights are the default init (speed does not depend on the values), so nothing is
downloaded. The configurations are measured round-robin, ``--rounds`` times ``--iters``
images each, and the median per configuration is kept, so load from other processes on a
shared machine hits every configuration alike; the ratios are the figures to compare. Both
wall time and this process's CPU time are reported (CPU time is less disturbed when other
processes compete for the core).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from mnv3.segmentation import deeplabv3_mobilenet_v3_large, lraspp_mobilenet_v3_large

BUILDERS = {
    "lraspp": lambda: lraspp_mobilenet_v3_large(num_classes=21),
    "deeplabv3": lambda: deeplabv3_mobilenet_v3_large(num_classes=21),
    # the official checkpoint forces the aux head on; inference needs only ``out``, so this
    # row shows what leaving the head on costs (set ``model.aux_classifier = None`` to drop it)
    "deeplabv3_aux": lambda: deeplabv3_mobilenet_v3_large(num_classes=21, aux_loss=True),
}


def measure(sizes: list[int], rounds: int, iters: int, warmup: int) -> list[dict]:
    """One row per (model, size): median seconds per image (wall and CPU) and images/s."""
    torch.set_num_threads(1)
    models = {name: build().eval() for name, build in BUILDERS.items()}
    inputs = {s: torch.rand(1, 3, s, s) for s in sizes}
    configs = [(name, s) for name in models for s in sizes]
    wall: dict[tuple[str, int], list[float]] = {c: [] for c in configs}
    cpu: dict[tuple[str, int], list[float]] = {c: [] for c in configs}
    with torch.no_grad():
        for name, s in configs:
            for _ in range(warmup):
                models[name](inputs[s])
        for _ in range(rounds):
            for name, s in configs:
                w0, c0 = time.perf_counter(), time.process_time()
                for _ in range(iters):
                    models[name](inputs[s])
                wall[(name, s)].append((time.perf_counter() - w0) / iters)
                cpu[(name, s)].append((time.process_time() - c0) / iters)
    rows = []
    for name, s in configs:
        w, c = statistics.median(wall[(name, s)]), statistics.median(cpu[(name, s)])
        rows.append({"model": name, "size": s, "batch": 1, "threads": 1, "dtype": "float32",
                     "wall_s_per_image": round(w, 4), "cpu_s_per_image": round(c, 4),
                     "images_per_s_wall": round(1 / w, 3), "images_per_s_cpu": round(1 / c, 3)})
    return rows


def format_rows(rows: list[dict]) -> str:
    """A table with each model's speed-up of every size against its largest size."""
    lines = [f"{'model':<14} {'size':>5} {'img/s (wall)':>13} {'img/s (cpu)':>12} {'x vs largest (cpu)':>19}"]
    for row in rows:
        ref = max((r for r in rows if r["model"] == row["model"]), key=lambda r: r["size"])
        speedup = ref["cpu_s_per_image"] / row["cpu_s_per_image"]
        lines.append(f"{row['model']:<14} {row['size']:>5} {row['images_per_s_wall']:>13.2f} "
                     f"{row['images_per_s_cpu']:>12.2f} {speedup:>19.2f}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="520,320", help="comma-separated square input sizes (default 520,320)")
    ap.add_argument("--rounds", type=int, default=5, help="round-robin passes over the configurations")
    ap.add_argument("--iters", type=int, default=3, help="images per configuration and pass")
    ap.add_argument("--warmup", type=int, default=2, help="untimed images per configuration first")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    if not sizes or min(sizes) < 16:
        ap.error(f"--sizes must list sizes of at least 16 (the output stride), got {args.sizes!r}")
    rows = measure(sizes, args.rounds, args.iters, args.warmup)
    print(format_rows(rows))
    for row in rows:
        print(json.dumps(row))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
