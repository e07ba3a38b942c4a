"""Post-training quantization and the quantization-aware-training hooks.

One flow for every task (classification, detection, segmentation):

    prepare_ptq(model, backend)      fuse conv+BN(+ReLU), attach observers
    calibrate(model, batches)        run a sample of the user's images through it
    convert(model, engine)           swap in int8 modules packed for the engine

QAT (used by the finetune job): ``prepare_qat`` -> train -> ``freeze_observers`` /
``freeze_bn_stats`` for the last epochs -> ``convert``. ``backend`` names the qconfig
family (``x86``/``fbgemm``: per-channel weights, 7-bit activations; ``qnnpack``:
per-tensor weights, 8-bit activations); ``engine`` is the kernel library that runs the
converted model (see ``engine.py``). A model converted for one engine must run under it.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from mnv3.quantization.blocks import fuse_tree
from mnv3.quantization.engine import choose_engine, pack_dilated_depthwise_for_onednn, set_engine
from mnv3.quantization.torch_ao import nniqat, quiet, tq

BACKENDS = ("x86", "fbgemm", "qnnpack", "onednn")


def _check_backend(backend: str) -> str:
    backend = backend.strip().lower()
    if backend not in BACKENDS:
        raise ValueError(f"unknown quantization backend {backend!r}; choose one of {list(BACKENDS)}")
    return backend


def ptq_qconfig(backend: str | None = None) -> Any:
    """torch's default post-training qconfig for ``backend`` (default: this CPU's engine)."""
    with quiet():
        return tq.get_default_qconfig(_check_backend(backend or choose_engine()))


def qat_qconfig(backend: str | None = None) -> Any:
    """torch's default QAT qconfig (fused moving-average fake quantizers) for ``backend``."""
    with quiet():
        return tq.get_default_qat_qconfig(_check_backend(backend or choose_engine()))


def fuse_model(model: nn.Module, is_qat: bool) -> None:
    """The model's own ``fuse_model`` when it has one, else the generic conv+BN(+ReLU) fusion."""
    if hasattr(model, "fuse_model"):
        model.fuse_model(is_qat=is_qat)
    else:
        fuse_tree(model, is_qat)


def _attach(model: nn.Module, qconfig: Any) -> None:
    """Give ``model`` a qconfig; models may keep parts float via ``set_qconfig``."""
    if hasattr(model, "set_qconfig"):
        model.set_qconfig(qconfig)
    else:
        model.qconfig = qconfig


def prepare_ptq(model: nn.Module, backend: str | None = None, qconfig: Any = None) -> nn.Module:
    """Fuse and attach observers for post-training quantization (in place; returns ``model``)."""
    model.eval()
    fuse_model(model, is_qat=False)
    _attach(model, qconfig or ptq_qconfig(backend))
    with quiet():
        tq.prepare(model, inplace=True)
    return model


def calibrate(model: nn.Module, batches: Iterable[Any], max_batches: int | None = None) -> int:
    """Run calibration batches through a prepared model so its observers record ranges.

    ``batches`` yields whatever the model's forward takes (an NCHW tensor for classifiers
    and segmenters, a list of CHW tensors for detectors). Returns the number of images
    seen. Raises if no batch came, because converting unobserved ranges gives garbage.
    """
    model.eval()
    seen = 0
    with torch.no_grad(), quiet():
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            model(batch)
            seen += len(batch)
    if seen == 0:
        raise ValueError("calibration saw no images: pass at least one batch of representative images")
    return seen


def convert(model: nn.Module, engine: str | None = None) -> nn.Module:
    """Swap observed float modules for int8 ones packed for ``engine`` (in place; eval mode).

    On x86, dilated depthwise convs are packed for oneDNN instead (see ``engine.py``: FBGEMM
    runs them ~100x slower than float).
    """
    engine = set_engine(engine)
    model.eval()
    with quiet(), warnings.catch_warnings():
        # Parts that saw no data (e.g. an unused branch) get default ranges; that is expected
        # when rebuilding a model whose real ranges are loaded right after.
        warnings.filterwarnings("ignore", message=r"must run observer before calling calculate_qparams")
        tq.convert(model, inplace=True)
        pack_dilated_depthwise_for_onednn(model, engine)
    return model


def quantize_ptq(model: nn.Module, batches: Iterable[Any], backend: str | None = None,
                 engine: str | None = None, max_batches: int | None = None) -> nn.Module:
    """prepare_ptq + calibrate + convert on a copy of a float ``model``."""
    model = copy.deepcopy(model)
    prepare_ptq(model, backend)
    calibrate(model, batches, max_batches)
    return convert(model, engine)


# --------------------------------------------------------------------------- QAT hooks

def prepare_qat(model: nn.Module, backend: str | None = None, qconfig: Any = None) -> nn.Module:
    """Fuse for QAT and insert fake quantizers (in place; model left in train mode)."""
    model.train()
    fuse_model(model, is_qat=True)
    _attach(model, qconfig or qat_qconfig(backend))
    with quiet():
        tq.prepare_qat(model, inplace=True)
    return model


def freeze_observers(model: nn.Module) -> nn.Module:
    """Stop updating activation/weight ranges (fake quantization stays on)."""
    model.apply(tq.disable_observer)
    return model


def enable_observers(model: nn.Module) -> nn.Module:
    """Resume updating ranges (e.g. after ``freeze_observers``)."""
    model.apply(tq.enable_observer)
    return model


def freeze_bn_stats(model: nn.Module) -> nn.Module:
    """Use the running BN statistics in fused QAT conv+BN layers instead of batch statistics."""
    model.apply(nniqat.freeze_bn_stats)
    return model


def set_fake_quant(model: nn.Module, enabled: bool) -> nn.Module:
    """Turn fake quantization on or off everywhere (off: the QAT model computes in float)."""
    model.apply(tq.enable_fake_quant if enabled else tq.disable_fake_quant)
    return model


def convert_qat(model: nn.Module, engine: str | None = None, inplace: bool = False) -> nn.Module:
    """Convert a QAT-trained model to int8 (on a copy unless ``inplace``), e.g. per-epoch eval."""
    if not inplace:
        model = copy.deepcopy(model)
    return convert(model, engine)


# Observer buffers that newer torch versions added; a QAT checkpoint saved by an older torch
# lacks them and the model's freshly built defaults are the right values.
_OPTIONAL_QUANT_STATE = (".activation_post_process.eps",)


def load_qat_state_dict(model: nn.Module, state_dict: dict[str, Any]) -> None:
    """Load a QAT-prepared checkpoint (weights + fake-quant/observer state) into a prepared model.

    Strict, except that observer buffers added by newer torch versions (``eps``) are taken
    from the model when the file lacks them.
    """
    own = model.state_dict()
    sd = dict(state_dict)
    for key, value in own.items():
        if key not in sd and key.endswith(_OPTIONAL_QUANT_STATE):
            sd[key] = value
    with quiet():
        model.load_state_dict(sd, strict=True)
