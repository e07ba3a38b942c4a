"""Quantizable versions of the MobileNetV3 building blocks, and module-tree fusion.

Eager-mode quantization needs every tensor operation that is not a module to become one:
the residual ``+`` and the squeeze-excitation ``*`` go through ``FloatFunctional`` so they
get observers and become quantized ops after ``convert``. Module and parameter names stay
those of the float blocks, so float and torchvision QAT checkpoints load key for key.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from mnv3.layers import SqueezeExcitation
from mnv3.mobilenetv3 import BlockConfig, InvertedResidual
from mnv3.quantization.torch_ao import nnq, quiet, tq


class QuantizableSqueezeExcitation(SqueezeExcitation):
    """SE gate whose final multiply is an observed ``FloatFunctional``."""

    # v2 added an observer on the hard-sigmoid; older QAT checkpoints lack its buffers.
    _version = 2

    def __init__(self, input_channels: int, squeeze_channels: int,
                 activation: Callable[..., nn.Module] = nn.ReLU, **_: object) -> None:
        super().__init__(input_channels, squeeze_channels, activation, nn.Hardsigmoid)
        self.skip_mul = nnq.FloatFunctional()

    def forward(self, x: Tensor) -> Tensor:
        return self.skip_mul.mul(self._scale(x), x)

    def fuse_model(self, is_qat: bool | None = None) -> None:
        """Fold the inner ReLU into fc1 (fc1 becomes a ConvReLU, ``activation`` an Identity)."""
        fuse(self, [["fc1", "activation"]], is_qat)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        version = local_metadata.get("version")
        if hasattr(self, "qconfig") and (version is None or version < 2):
            # Fixed-qparams fake-quant of the gate: supply its (constant) state when absent.
            base = prefix + "scale_activation.activation_post_process."
            defaults = {
                "scale": torch.tensor([1.0]),
                "zero_point": torch.tensor([0], dtype=torch.int32),
                "fake_quant_enabled": torch.tensor([1]),
                "observer_enabled": torch.tensor([1]),
                "activation_post_process.scale": torch.tensor([1.0]),
                "activation_post_process.zero_point": torch.tensor([0], dtype=torch.int32),
            }
            own = self.state_dict(prefix=prefix)
            for suffix, value in defaults.items():
                if base + suffix in own and base + suffix not in state_dict:
                    state_dict[base + suffix] = value
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class QuantizableInvertedResidual(InvertedResidual):
    """Inverted residual block whose skip connection is an observed ``FloatFunctional`` add."""

    def __init__(self, cnf: BlockConfig, norm_layer: Callable[..., nn.Module]) -> None:
        super().__init__(cnf, norm_layer, se_layer=QuantizableSqueezeExcitation)
        self.skip_add = nnq.FloatFunctional()

    def forward(self, x: Tensor) -> Tensor:
        if self.use_res_connect:
            return self.skip_add.add(x, self.block(x))
        return self.block(x)


def replace_relu(module: nn.Module) -> None:
    """Swap every exact ``nn.ReLU``/``nn.ReLU6`` for a non-inplace ``nn.ReLU`` (in place, recursively).

    In-place activations would overwrite the tensor an observer or a skip add still needs.
    """
    for name, child in list(module.named_children()):
        replace_relu(child)
        if type(child) in (nn.ReLU, nn.ReLU6):
            module._modules[name] = nn.ReLU(inplace=False)


def fuse(module: nn.Module, groups: list[list[str]], is_qat: bool | None = None) -> None:
    """Fuse each group of child names of ``module`` in place (QAT fusion when ``is_qat``).

    ``is_qat=None`` follows ``module.training``, as torchvision does.
    """
    if is_qat is None:
        is_qat = module.training
    method = tq.fuse_modules_qat if is_qat else tq.fuse_modules
    with quiet():
        method(module, groups, inplace=True)


def conv_bn_relu_groups(seq: nn.Sequential) -> list[list[str]]:
    """Runs of (Conv2d, BatchNorm2d[, ReLU]) or (Conv2d, ReLU) among the direct children of a Sequential."""
    names = list(seq._modules)
    mods = [seq._modules[n] for n in names]
    groups = []
    i = 0
    while i < len(mods) - 1:
        if type(mods[i]) is nn.Conv2d and type(mods[i + 1]) in (nn.BatchNorm2d, nn.ReLU):
            group = [names[i], names[i + 1]]
            if type(mods[i + 1]) is nn.BatchNorm2d and i + 2 < len(mods) and type(mods[i + 2]) is nn.ReLU:
                group.append(names[i + 2])
            groups.append(group)
            i += len(group)
        else:
            i += 1
    return groups


def fuse_tree(model: nn.Module, is_qat: bool | None = None) -> None:
    """Fuse conv+BN(+ReLU) / conv+ReLU in every Sequential and fc1+ReLU in every quantizable SE gate.

    Hardswish is never fused (it stays a separate, observed module). Only Sequential
    containers are scanned because only there is child order the execution order. For
    MobileNetV3 this is exactly torchvision's ``fuse_model``.
    """
    if is_qat is None:
        is_qat = model.training
    for m in list(model.modules()):
        if isinstance(m, nn.Sequential):
            groups = conv_bn_relu_groups(m)
            if groups:
                fuse(m, groups, is_qat)
        elif type(m) is QuantizableSqueezeExcitation and type(m.activation) is nn.ReLU:
            m.fuse_model(is_qat)


class TransparentWrapper(nn.Module):
    """A wrapper whose state_dict keys are the wrapped model's, plus the wrapper's own state.

    The detector and segmenter wrappers add quant/dequant stubs and observed ops around a
    float model; checkpoints of the float model must load unchanged, so the wrapped model's
    keys carry no prefix. Once prepared or converted, the wrapper's own modules gain state
    (observer ranges, output scales); it is saved under their names (``quant.scale``, ...)
    so an int8 artifact rebuilds exactly. ``_inner`` names the wrapped child.
    """

    _inner = "model"

    def _own(self) -> list[str]:
        return [n for n, m in self._modules.items() if n != self._inner and m is not None]

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "",  # type: ignore[override]
                   keep_vars: bool = False) -> Any:
        if args:
            raise TypeError("state_dict takes keyword arguments only (destination=, prefix=, keep_vars=)")
        if destination is None:
            destination = OrderedDict()
            destination._metadata = OrderedDict()  # type: ignore[attr-defined]
        getattr(self, self._inner).state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)
        for name in self._own():
            self._modules[name].state_dict(destination=destination, prefix=f"{prefix}{name}.",
                                           keep_vars=keep_vars)
        return destination

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True,  # type: ignore[override]
                        assign: bool = False) -> Any:
        own = tuple(f"{n}." for n in self._own())

        def inward(key: str) -> str:
            return key if key.startswith(own) else f"{self._inner}.{key}" if key else self._inner

        remapped = OrderedDict((inward(k), v) for k, v in state_dict.items())
        metadata = getattr(state_dict, "_metadata", None)
        if metadata is not None:
            remapped._metadata = OrderedDict((inward(k), v) for k, v in metadata.items())  # type: ignore
        result = super().load_state_dict(remapped, strict=strict, assign=assign)
        cut = len(self._inner) + 1
        outward = [k[cut:] if k.startswith(f"{self._inner}.") else k for k in result.missing_keys]
        unexpected = [k[cut:] if k.startswith(f"{self._inner}.") else k for k in result.unexpected_keys]
        return type(result)(outward, unexpected)
