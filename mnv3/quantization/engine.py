"""Which quantized kernel library (engine) to use on this CPU.

``x86`` (FBGEMM + oneDNN) is the fast engine on x86-64; ``qnnpack`` is the ARM engine
(AWS Graviton, Apple silicon). Both run on x86, but qnnpack there is several times slower
than x86, so the default follows the CPU architecture. The engine is a process-wide torch
setting and must be set before a model is converted (weights are packed for it) and kept
while the model runs.

One exception, for speed: FBGEMM (behind ``x86``) has no fast kernel for *dilated*
depthwise convolutions (the dilated MobileNetV3 backbone of the segmenters): it runs them
about 100x slower than float (245 ms instead of 2 ms for the 960-channel 5x5 one at 33x33).
oneDNN has one. A quantized conv runs with the kernels its weights were packed for, whatever
the active engine, so ``pack_dilated_depthwise_for_onednn`` re-packs just those convs for
oneDNN (results agree with FBGEMM to one int8 step).
"""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from mnv3.quantization.torch_ao import nniq, nnq

ENGINE_ENV = "MNV3_QUANT_ENGINE"

_X86 = {"x86_64", "amd64", "i386", "i686", "x86"}
_ARM = {"aarch64", "arm64", "armv7l", "armv8l", "arm"}


def supported_engines() -> list[str]:
    """Engines this torch build offers (without the placeholder ``none``)."""
    return [e for e in torch.backends.quantized.supported_engines if e != "none"]


def default_engine(machine: str | None = None) -> str:
    """The engine for a CPU architecture (``platform.machine()`` when not given)."""
    arch = (machine or platform.machine()).lower()
    available = supported_engines()
    if arch in _ARM:
        wanted = ["qnnpack"]
    elif arch in _X86:
        wanted = ["x86", "fbgemm"]
    else:
        wanted = ["qnnpack", "x86", "fbgemm"]
    for engine in wanted:
        if engine in available:
            return engine
    if not available:
        raise RuntimeError("this torch build has no quantized engine; int8 inference is not available")
    return available[0]


def choose_engine(override: str | None = None) -> str:
    """``override`` if given, else env ``MNV3_QUANT_ENGINE``, else the CPU's default engine."""
    engine = override or os.environ.get(ENGINE_ENV) or default_engine()
    engine = engine.strip().lower()
    if engine not in supported_engines():
        raise ValueError(f"quantized engine {engine!r} is not available in this torch build; choose one "
                         f"of {supported_engines()} (set it with engine= / --engine or {ENGINE_ENV})")
    return engine


def set_engine(engine: str | None = None) -> str:
    """Make ``engine`` (or the chosen default) torch's active quantized engine; returns it."""
    engine = choose_engine(engine)
    torch.backends.quantized.engine = engine
    return engine


@contextlib.contextmanager
def engine_scope(engine: str) -> Iterator[None]:
    """Make ``engine`` torch's active quantized engine inside the block, then restore the previous one."""
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


class OnednnConv2d(nnq.Conv2d):
    """Quantized conv whose weights are always packed for oneDNN (also when loading a state_dict)."""

    def set_weight_bias(self, w: torch.Tensor, b: torch.Tensor | None) -> None:
        with engine_scope("onednn"):
            super().set_weight_bias(w, b)

    def _get_name(self) -> str:
        return "OnednnConv2d"


class OnednnConvReLU2d(nniq.ConvReLU2d):
    """``OnednnConv2d`` with a fused ReLU."""

    def set_weight_bias(self, w: torch.Tensor, b: torch.Tensor | None) -> None:
        with engine_scope("onednn"):
            super().set_weight_bias(w, b)

    def _get_name(self) -> str:
        return "OnednnConvReLU2d"


_ONEDNN_CLASSES: dict[type, type] = {nnq.Conv2d: OnednnConv2d, nniq.ConvReLU2d: OnednnConvReLU2d}


def _is_dilated_depthwise(m: Any) -> bool:
    return m.groups > 1 and m.groups == m.in_channels and max(m.dilation) > 1


def pack_dilated_depthwise_for_onednn(model: nn.Module, engine: str) -> int:
    """After ``convert`` for ``engine`` x86/fbgemm: re-pack dilated depthwise int8 convs for oneDNN.

    Returns how many convs were re-packed (0 for other engines, or when this torch build has
    no oneDNN engine). The swapped modules keep their names and state_dict entries.
    """
    if engine not in ("x86", "fbgemm") or "onednn" not in supported_engines():
        return 0
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            cls = _ONEDNN_CLASSES.get(type(child))
            if cls is None or not _is_dilated_depthwise(child):
                continue
            new = cls.__new__(cls)
            new.__dict__.update(child.__dict__)  # same hyper-parameters, scale, zero point, hooks
            new.set_weight_bias(child.weight(), child.bias())
            parent._modules[name] = new
            count += 1
    return count
