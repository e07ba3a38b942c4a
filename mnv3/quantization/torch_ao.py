"""The one doorway to ``torch.ao.quantization``, with its deprecation noise silenced.

torch 2.13 warns on every eager-mode quantization call (``prepare``, observer
construction, ``convert``, quantized tensor creation) that the API is deprecated in favour
of torchao. We rely on that API deliberately (torchao is not a dependency), so every call
we make goes through ``quiet()``, which hides exactly those messages and nothing else.
``REQUIRED_API`` lists what we use; a test fails if a torch upgrade removes any of it.
"""

from __future__ import annotations

import contextlib
import importlib
import warnings
from collections.abc import Iterator

# Exact message prefixes (regular expressions) of the warnings we silence.
_SILENCED = (
    r"torch\.ao\.quantization is deprecated",
    r"Please use quant_min and quant_max to specify the range for observers",
    r"torch\.quantize_per_tensor, torch\.quantize_per_channel and other quantized tensor creation",
)

# module -> attribute names this package calls.
REQUIRED_API: dict[str, tuple[str, ...]] = {
    "torch.ao.quantization": (
        "QuantStub", "DeQuantStub", "QConfig", "fuse_modules", "fuse_modules_qat", "prepare", "prepare_qat",
        "convert", "get_default_qconfig", "get_default_qat_qconfig", "enable_observer", "disable_observer",
        "enable_fake_quant", "disable_fake_quant", "quantize_dynamic", "default_dynamic_qconfig",
        "HistogramObserver", "MinMaxObserver", "PerChannelMinMaxObserver",
    ),
    "torch.ao.nn.quantized": ("FloatFunctional", "QFunctional", "Conv2d"),
    "torch.ao.nn.intrinsic.quantized": ("ConvReLU2d",),
    "torch.ao.nn.intrinsic.qat": ("freeze_bn_stats", "update_bn_stats"),
}


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Hide torch's eager-quantization deprecation warnings inside the ``with`` block."""
    with warnings.catch_warnings():
        for pattern in _SILENCED:
            warnings.filterwarnings("ignore", message=pattern)
        yield


def missing_api() -> list[str]:
    """Names from ``REQUIRED_API`` that this torch does not have (empty when all is well)."""
    missing = []
    with quiet():
        for module_name, names in REQUIRED_API.items():
            try:
                module = importlib.import_module(module_name)
            except ImportError:
                missing.append(module_name)
                continue
            missing += [f"{module_name}.{n}" for n in names if not hasattr(module, n)]
    return missing


with quiet():
    import torch.ao.nn.intrinsic.qat as nniqat  # noqa: E402
    import torch.ao.nn.intrinsic.quantized as nniq  # noqa: E402
    import torch.ao.nn.quantized as nnq  # noqa: E402
    import torch.ao.quantization as tq  # noqa: E402

__all__ = ["REQUIRED_API", "missing_api", "nniq", "nniqat", "nnq", "quiet", "tq"]
