"""Builder names -> float models ready to be quantized, for every task.

An int8 artifact stores only a builder name, its keyword arguments and the converted
state_dict; rebuilding it means building the same quantizable float model, preparing and
converting it the same way, then loading the int8 state. This table is that lookup.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

TASKS = ("classification", "detection", "segmentation")


def _classification(name: str) -> Callable[..., nn.Module]:
    from mnv3.quantization import mobilenetv3

    return getattr(mobilenetv3, name)


def _detection(name: str) -> Callable[..., nn.Module]:
    from mnv3.quantization import detection

    return lambda **kw: detection.quantizable_detector(name, **kw)


def _segmentation(name: str) -> Callable[..., nn.Module]:
    from mnv3.quantization import segmentation

    return lambda **kw: segmentation.quantizable_segmenter(name, **kw)


BUILDERS: dict[str, tuple[str, Callable[[str], Callable[..., nn.Module]]]] = {
    "mobilenet_v3_large": ("classification", _classification),
    "mobilenet_v3_small": ("classification", _classification),
    "fasterrcnn_mobilenet_v3_large_fpn": ("detection", _detection),
    "fasterrcnn_mobilenet_v3_large_320_fpn": ("detection", _detection),
    "lraspp_mobilenet_v3_large": ("segmentation", _segmentation),
    "deeplabv3_mobilenet_v3_large": ("segmentation", _segmentation),
}


def task_of(builder: str) -> str:
    """The task ("classification", "detection", "segmentation") a builder belongs to."""
    if builder not in BUILDERS:
        raise ValueError(f"no int8 support for builder {builder!r}; choose one of {sorted(BUILDERS)}")
    return BUILDERS[builder][0]


def build_quantizable(builder: str, **kwargs: Any) -> nn.Module:
    """A float model (in quantizable form) for ``builder``; ``kwargs`` go to the builder."""
    task_of(builder)
    return BUILDERS[builder][1](builder)(**kwargs)
