"""Which quantized kernel library (engine) to use on this CPU.

``x86`` (FBGEMM + oneDNN) is the fast engine on x86-64; ``qnnpack`` is the ARM engine
(AWS Graviton, Apple silicon). Both run on x86, but qnnpack there is several times slower
than x86, so the default follows the CPU architecture. The engine is a process-wide torch
setting and must be set before a model is converted (weights are packed for it) and kept
while the model runs.
"""

from __future__ import annotations

import os
import platform

import torch

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
        raise ValueError(f"quantized engine {engine!r} is not available in this torch build; "
                         f"choose one of {supported_engines()} (set via config/--backend or {ENGINE_ENV})")
    return engine


def set_engine(engine: str | None = None) -> str:
    """Make ``engine`` (or the chosen default) torch's active quantized engine; returns it."""
    engine = choose_engine(engine)
    torch.backends.quantized.engine = engine
    return engine
