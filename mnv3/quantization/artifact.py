"""Save and load an int8 model as one self-describing file.

The file is a ``torch.save`` of ``{"format", "version", "metadata", "state_dict"}``: the
converted (int8) state_dict plus plain-data metadata (task, builder and its arguments,
qconfig backend, engine, quantization mode, calibration details, accuracy-gate numbers).
Loading rebuilds the same quantizable model, prepares and converts it the same way, then
loads the int8 state, all with ``torch.load(weights_only=True)``: no pickled code runs.
Callers pass binary file objects, so this module does not care where the bytes live.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings
from typing import IO, Any

import torch
from torch import nn

from mnv3.quantization.engine import choose_engine
from mnv3.quantization.ptq import convert, prepare_ptq, prepare_qat
from mnv3.quantization.registry import build_quantizable, task_of
from mnv3.quantization.torch_ao import quiet

FORMAT = "mnv3-int8"
VERSION = 1
MODES = ("ptq", "qat")
REQUIRED = ("builder", "builder_kwargs", "backend", "engine", "mode")


class ArtifactError(ValueError):
    """The file is not a usable int8 artifact (wrong format, version or contents)."""


def _check_plain(value: Any, where: str) -> None:
    if value is None or type(value) in (bool, int, float, str):  # exact types: no str subclasses
        return
    if type(value) in (list, tuple):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    if type(value) is dict:
        for k, v in value.items():
            if type(k) is not str:
                raise ArtifactError(f"metadata key {where}.{k!r} must be a string")
            _check_plain(v, f"{where}.{k}")
        return
    raise ArtifactError(f"metadata {where} is a {type(value).__name__}; only str/int/float/bool/None, "
                        "lists and dicts can be stored (weights-only loading)")


def save_int8_artifact(fileobj: IO[bytes], model: nn.Module, metadata: dict[str, Any]) -> None:
    """Write a converted int8 ``model`` and its ``metadata`` to a binary file object.

    ``metadata`` must hold ``builder``, ``builder_kwargs``, ``backend``, ``engine`` and
    ``mode`` ("ptq" or "qat"): what ``load_int8_artifact`` needs to rebuild the model.
    ``task`` is filled in from the builder.
    """
    missing = [k for k in REQUIRED if k not in metadata]
    if missing:
        raise ArtifactError(f"artifact metadata lacks {missing}; required: {list(REQUIRED)}")
    if metadata["mode"] not in MODES:
        raise ArtifactError(f"metadata mode must be one of {list(MODES)}, got {metadata['mode']!r}")
    meta = copy.deepcopy(dict(metadata))
    meta.setdefault("task", task_of(meta["builder"]))
    meta["torch_version"] = str(torch.__version__)
    _check_plain(meta, "metadata")
    payload = {"format": FORMAT, "version": VERSION, "metadata": meta, "state_dict": model.state_dict()}
    buf = io.BytesIO()
    torch.save(payload, buf)
    fileobj.write(buf.getvalue())


def read_int8_artifact(fileobj: IO[bytes]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metadata, int8 state_dict) from an artifact file object, without building the model."""
    data = fileobj.read()
    try:
        with quiet(), warnings.catch_warnings():
            # torch's own quantized-tensor unpickling still touches TypedStorage.
            warnings.filterwarnings("ignore", message=r"TypedStorage is deprecated")
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ArtifactError(f"not an int8 model artifact ({len(data)} bytes; torch.load: {first})") from exc
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ArtifactError(f"not an int8 model artifact: expected format {FORMAT!r}; a plain checkpoint "
                            "(state_dict) loads with the model builders' weights= argument instead")
    if obj.get("version") != VERSION:
        raise ArtifactError(f"int8 artifact version {obj.get('version')!r} is not supported (this code reads "
                            f"version {VERSION}); re-run `mnv3-pipeline quantize` with this version")
    return obj["metadata"], obj["state_dict"]


def rebuild(metadata: dict[str, Any], engine: str | None = None) -> nn.Module:
    """An empty converted model with the artifact's structure (int8 state not loaded yet)."""
    model = build_quantizable(metadata["builder"], **metadata.get("builder_kwargs", {}))
    if metadata["mode"] == "qat":
        prepare_qat(model, metadata["backend"])
    else:
        prepare_ptq(model, metadata["backend"])
    return convert(model, engine)


def load_int8_artifact(fileobj: IO[bytes], engine: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the int8 model saved in ``fileobj``; returns (model in eval mode, metadata).

    The model is converted for ``engine`` (default: the engine it was made with if this
    torch has it, else this CPU's engine), which becomes torch's active quantized engine.
    """
    metadata, state_dict = read_int8_artifact(fileobj)
    if engine is None:
        saved = metadata.get("engine")
        try:
            engine = choose_engine(saved)
        except ValueError:
            engine = choose_engine()
    model = rebuild(metadata, engine)
    try:
        with quiet():
            model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise ArtifactError(f"int8 artifact does not fit its builder {metadata['builder']!r} with "
                            f"{metadata.get('builder_kwargs')}: {str(exc).splitlines()[0]}") from exc
    metadata = dict(metadata, engine_loaded=engine)
    return model.eval(), metadata
