"""Deterministic, version-independent weight fill shared by the fixture script and tests.

Every value is a function of the tensor's state_dict key and shape only (an integer hash of
the key and the element index), so torchvision in the dev
environment and our models in the test environment get bit-identical weights without
storing any weight file.
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import nn


def pattern(name: str, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Uniform-looking values in [-1, 1), deterministic in (name, shape), float64.

    An integer hash of (name, flat index) in int64 arithmetic: exact on every platform and
    torch version, unlike a seeded RNG stream.
    """
    n = math.prod(shape) if len(shape) else 1
    seed = zlib.crc32(name.encode("utf-8"))
    mask = 0xFFFFFFFF
    x = (torch.arange(n, dtype=torch.int64) + seed * 2654435761) & mask
    for _ in range(2):
        x = ((x ^ (x >> 16)) * 0x45D9F3B) & mask
    x = x ^ (x >> 16)
    return (x.to(torch.float64) / 2.0**31 - 1.0).reshape(tuple(shape))


def fill_value(name: str, tensor: torch.Tensor, gain: float = 1.0) -> torch.Tensor | None:
    """The filled value for one state_dict entry, or None to leave it as it is."""
    if not tensor.is_floating_point():
        return None
    v = pattern(name, tensor.shape)
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "running_var":
        out = 0.5 + 0.5 * v.abs()
    elif leaf == "running_mean":
        out = 0.1 * v
    elif tensor.dim() == 1 and leaf == "weight":  # norm scale
        out = 1.0 + 0.2 * v
    elif leaf == "bias":
        out = 0.05 * v
    elif tensor.dim() >= 2:
        fan_in = math.prod(tensor.shape[1:])
        # uniform [-1, 1) has variance 1/3, so this gives var = 2 * gain^2 / fan_in (He).
        out = v * (gain * math.sqrt(6.0 / fan_in))
    else:
        return None
    return out.to(tensor.dtype)


def fill_model(model: nn.Module, gain: float = 1.0, gains: dict[str, float] | None = None) -> nn.Module:
    """Overwrite every floating point parameter and buffer of ``model`` in place.

    ``gains`` maps a key prefix to a gain that replaces ``gain`` for matching weights (the
    longest matching prefix wins), e.g. to give a classifier head logits of order one.
    """
    gains = gains or {}
    sd = model.state_dict()
    new = {}
    for name, t in sd.items():
        prefixes = [p for p in gains if name.startswith(p)]
        g = gains[max(prefixes, key=len)] if prefixes else gain
        val = fill_value(name, t, g)
        new[name] = t if val is None else val
    model.load_state_dict(new, strict=True)
    return model


def make_input(name: str, shape: tuple[int, ...], low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    """A deterministic float32 input in [low, high] (e.g. an image batch)."""
    v = pattern(name, shape)
    return (low + (v + 1.0) * 0.5 * (high - low)).to(torch.float32)


def choose_gain(build, x: torch.Tensor, target_std: float = 2.0, lo: float = 0.3, hi: float = 1.5,
                steps: int = 16, output=lambda y: y) -> float:
    """Bisect the fill gain so that the filled model's output on ``x`` has std ~ ``target_std``.

    Random-like weights with frozen BN statistics either lose the input signal or blow up,
    depending on depth and residuals; the fixture script searches the gain once per model,
    stores it in the fixture, and the tests reuse it. The gain is rounded to 4 decimals.
    """
    def std_at(g: float) -> float:
        model = fill_model(build(), gain=g).eval()
        with torch.no_grad():
            return float(output(model(x)).float().std())

    for _ in range(steps):
        mid = (lo + hi) / 2
        if std_at(mid) > target_std:
            hi = mid
        else:
            lo = mid
    return round((lo + hi) / 2, 4)
