"""Check mnv3.weights.WEIGHTS against torchvision's weight enums (dev environment only).

Compares, for every registry entry, the URL, parameter count, categories, metrics,
min_size, GFLOPS, file size, backend, recipe, eval transforms and each enum's DEFAULT with
the metadata torchvision ships. Exits non-zero on the first difference. Nothing is
downloaded: only metadata is read.

    <dev-python> scripts/check_weights_registry.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _torchvision_enums() -> list:
    from torchvision import models
    from torchvision.models import detection, quantization, segmentation

    return [models.MobileNet_V3_Large_Weights, models.MobileNet_V3_Small_Weights,
            quantization.MobileNet_V3_Large_QuantizedWeights,
            detection.FasterRCNN_MobileNet_V3_Large_FPN_Weights,
            detection.FasterRCNN_MobileNet_V3_Large_320_FPN_Weights,
            segmentation.DeepLabV3_MobileNet_V3_Large_Weights,
            segmentation.LRASPP_MobileNet_V3_Large_Weights,
            detection.SSDLite320_MobileNet_V3_Large_Weights]


def _transform_sizes(transform) -> tuple[int | None, int | None]:
    resize = getattr(transform, "resize_size", None)
    crop = getattr(transform, "crop_size", None)
    return (resize[0] if resize else None), (crop[0] if crop else None)


def differences() -> list[str]:
    from mnv3.weights import DEFAULTS, WEIGHTS

    problems: list[str] = []
    seen = set()
    for enum in _torchvision_enums():
        for member in enum:
            name = f"{enum.__name__}.{member.name}"
            seen.add(name)
            entry = WEIGHTS.get(name)
            if entry is None:
                problems.append(f"{name}: missing from the registry")
                continue
            meta = member.meta
            pairs = {
                "url": (member.url, entry.url),
                "num_params": (meta["num_params"], entry.num_params),
                "categories": (tuple(meta["categories"]), entry.categories),
                "metrics": (meta["_metrics"], entry.metrics),
                "min_size": (tuple(meta["min_size"]), entry.min_size),
                "gflops": (round(meta["_ops"], 3), round(entry.gflops, 3)),
                "file_size_mb": (round(meta["_file_size"], 3), round(entry.file_size_mb, 3)),
                "backend": (meta.get("backend"), entry.backend),
                "recipe": (meta["recipe"], entry.recipe),
                "transform sizes": (_transform_sizes(member.transforms()),
                                    (entry.preprocessing.resize_size, entry.preprocessing.crop_size)),
            }
            problems += [f"{name}: {field} torchvision={tv!r} registry={ours!r}"
                         for field, (tv, ours) in pairs.items() if tv != ours]
        default = f"{enum.__name__}.{enum.DEFAULT.name}"
        ours = DEFAULTS.get(enum.__name__)
        if ours != default:
            problems.append(f"{enum.__name__}.DEFAULT: torchvision={default} registry={ours}")
    problems += [f"{name}: in the registry but not in torchvision" for name in sorted(set(WEIGHTS) - seen)]
    return problems


def main() -> int:
    problems = differences()
    for line in problems:
        print(line)
    print("registry matches torchvision" if not problems else f"{len(problems)} differences")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
