"""Class-name lists of the datasets the official weights were trained on.

Label id ``i`` of a model's output is ``categories[i]``. The lists are dataset facts:
ImageNet-1k (1000 names, read from ``mnv3/data/imagenet1k_categories.txt``, written by
``scripts/make_imagenet_categories.py``), COCO as used by the detection weights (91 slots:
``__background__`` at 0, the 80 classes at their official COCO ids 1..90, and "N/A" at
the 10 unused ids), and the 21 Pascal VOC labels the segmentation weights predict.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

# The 80 COCO object classes keyed by their official (sparse) category id.
_COCO_IDS: dict[int, str] = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train",
    8: "truck", 9: "boat", 10: "traffic light", 11: "fire hydrant", 13: "stop sign",
    14: "parking meter", 15: "bench", 16: "bird", 17: "cat", 18: "dog", 19: "horse", 20: "sheep",
    21: "cow", 22: "elephant", 23: "bear", 24: "zebra", 25: "giraffe", 27: "backpack",
    28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase", 34: "frisbee", 35: "skis",
    36: "snowboard", 37: "sports ball", 38: "kite", 39: "baseball bat", 40: "baseball glove",
    41: "skateboard", 42: "surfboard", 43: "tennis racket", 44: "bottle", 46: "wine glass",
    47: "cup", 48: "fork", 49: "knife", 50: "spoon", 51: "bowl", 52: "banana", 53: "apple",
    54: "sandwich", 55: "orange", 56: "broccoli", 57: "carrot", 58: "hot dog", 59: "pizza",
    60: "donut", 61: "cake", 62: "chair", 63: "couch", 64: "potted plant", 65: "bed",
    67: "dining table", 70: "toilet", 72: "tv", 73: "laptop", 74: "mouse", 75: "remote",
    76: "keyboard", 77: "cell phone", 78: "microwave", 79: "oven", 80: "toaster", 81: "sink",
    82: "refrigerator", 84: "book", 85: "clock", 86: "vase", 87: "scissors", 88: "teddy bear",
    89: "hair drier", 90: "toothbrush",
}

BACKGROUND = "__background__"
UNUSED = "N/A"

COCO_91: tuple[str, ...] = (BACKGROUND,) + tuple(_COCO_IDS.get(i, UNUSED) for i in range(1, 91))

VOC_21: tuple[str, ...] = (
    BACKGROUND, "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)

IMAGENET_FILE = "imagenet1k_categories.txt"


@cache
def imagenet_1k() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in label-id order (read once from package data)."""
    text = resources.files("mnv3").joinpath("data", IMAGENET_FILE).read_text(encoding="utf-8")
    names = tuple(line for line in text.splitlines() if line)
    if len(names) != 1000:
        raise RuntimeError(f"mnv3/data/{IMAGENET_FILE} holds {len(names)} names, expected 1000; "
                           "regenerate it with scripts/make_imagenet_categories.py")
    return names


_BY_NAME = {"imagenet1k": imagenet_1k, "coco91": lambda: COCO_91, "voc21": lambda: VOC_21}


def get_categories(name: str) -> tuple[str, ...]:
    """Category list by name: ``"imagenet1k"``, ``"coco91"`` or ``"voc21"``."""
    try:
        return _BY_NAME[name]()
    except KeyError:
        raise KeyError(f"unknown category list {name!r}; known: {sorted(_BY_NAME)}") from None
