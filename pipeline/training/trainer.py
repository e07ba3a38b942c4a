"""Driver side of fine-tuning: a Ray Train TorchTrainer run, then export, history and plot.

Run names carry the UTC date and time (``finetune-detect-20261129-031500``), so a nightly job
always starts a new run and never "resumes" last night's finished one. ``resume=NAME`` continues
that run from its last checkpoint (Ray Train V2 resumes a run whose ``RunConfig(name,
storage_path)`` already holds checkpoints); ``resume="auto"`` continues the newest *unfinished*
run of the task under the output URL (one with checkpoints but no export yet) and starts a new
run when there is none, so re-running an interrupted job picks up where it stopped. A worker
failure restarts the worker group from the last checkpoint (``FailureConfig``).

Layout under the output URL (local path or S3)::

    <output>/<run name>/checkpoint_*/state.pt     Ray Train checkpoints (last two kept)
    <output>/<run name>/history.json              one entry per epoch: loss, lr, val_* metrics
    <output>/<run name>/history.png               the curves
    <output>/<run name>/export/<builder>-<sha8>.pth + .json   the model and its sidecar
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline import storage
from pipeline.training import export, plot

EXPORT_DIR = "export"


@dataclass
class FinetuneResult:
    """What a fine-tuning run produced."""

    run_name: str
    run_url: str
    weights_uri: str
    sidecar_uri: str
    metrics: dict[str, Any]
    history: list[dict] = field(default_factory=list)
    history_uri: str = ""
    plot_uri: str = ""
    train_seconds: float = 0.0
    steps: int = 0
    resumes: list[int] = field(default_factory=list)  # epochs after which the run was restored


def new_run_name(task: str, now: dt.datetime | None = None) -> str:
    """``finetune-<task>-YYYYmmdd-HHMMSS`` in UTC."""
    now = now or dt.datetime.now(dt.UTC)
    return f"finetune-{task}-{now:%Y%m%d-%H%M%S}"


def ray_storage(output_url: str, storage_options: Mapping[str, Any] | None) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for RunConfig: local paths made absolute; S3 with
    explicit options (endpoint, keys) through a pyarrow S3FileSystem; other URLs as they are."""
    if "://" not in output_url or output_url.startswith("file://"):
        return os.path.abspath(output_url.removeprefix("file://")), None
    scheme, rest = output_url.split("://", 1)
    if scheme in ("s3", "s3a") and storage_options:
        from pyarrow import fs as pafs

        o = dict(storage_options)
        endpoint = o.get("endpoint_url") or (o.get("client_kwargs") or {}).get("endpoint_url")
        kwargs: dict[str, Any] = {}
        if o.get("key"):
            kwargs["access_key"] = o["key"]
            kwargs["secret_key"] = o.get("secret")
        if o.get("token"):
            kwargs["session_token"] = o["token"]
        if endpoint:
            kwargs["endpoint_override"] = endpoint
            kwargs["scheme"] = "http" if endpoint.startswith("http://") else "https"
        region = o.get("region") or (o.get("client_kwargs") or {}).get("region_name")
        if region:
            kwargs["region"] = region
        return rest.rstrip("/"), pafs.S3FileSystem(**kwargs)
    return output_url, None


RESUME_AUTO = "auto"


def _run_exists(output_url: str, name: str, options: Mapping[str, Any] | None) -> bool:
    fs, root = storage.open_fs(output_url, options)
    return bool(fs.glob(storage.join(root, name, "checkpoint_*")))


def unfinished_run(output_url: str, task: str, options: Mapping[str, Any] | None = None) -> str | None:
    """The newest run of ``task`` under ``output_url`` that has checkpoints but no export (an
    interrupted run), or None. Names sort by their UTC timestamp."""
    fs, root = storage.open_fs(output_url, options)
    if not fs.exists(root):
        return None
    prefix = f"finetune-{task}-"
    names = sorted(
        (p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)), reverse=True
    )
    for name in names:
        if not name.startswith(prefix):
            continue
        if fs.glob(storage.join(root, name, "checkpoint_*")) and not fs.exists(
            storage.join(root, name, EXPORT_DIR)
        ):
            return name
    return None


def choose_run_name(
    output_url: str, task: str, resume: str | None, options: Mapping[str, Any] | None = None
) -> tuple[str, bool]:
    """(run name, whether it continues an existing run) for ``resume`` = None, "auto" or a name."""
    if resume == RESUME_AUTO:
        found = unfinished_run(output_url, task, options)
        return (found, True) if found else (new_run_name(task), False)
    if resume:
        if not _run_exists(output_url, resume, options):
            raise FileNotFoundError(
                f"cannot resume run {resume!r}: {storage.join(output_url, resume)} holds no "
                "checkpoint; check --output and the run name (printed when a run starts), or "
                f"use --resume {RESUME_AUTO}"
            )
        return resume, True
    return new_run_name(task), False


def fit(
    settings: Mapping[str, Any],
    *,
    resume: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    output_storage_options: Mapping[str, Any] | None = None,
    test_hooks: Mapping[str, Any] | None = None,
) -> FinetuneResult:
    """Train with Ray Train on ``settings["workers"]`` CPU workers, then export the model.

    ``settings``: the plain-value training settings read by ``pipeline.training.loop``.
    ``resume``: an existing run name to continue, or "auto" (the newest unfinished run of the
    task, else a new run). ``test_hooks``: ``_fail_at_steps`` (a list of global steps) and
    ``_fail_marker`` (a path prefix) make rank 0 exit hard once at each of those steps (used by
    the tests to kill a worker).
    """
    import ray
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.training.loop import STATE_FILE, train_loop

    task = settings["task"]
    out_opts = dict(output_storage_options if output_storage_options is not None else storage_options or {})
    output = settings["output"]
    name, continues = choose_run_name(output, task, resume, out_opts)
    if not ray.is_initialized():
        from pipeline.ray_quiet import LOCAL_RUNTIME_ENV

        # A submitted job (RAY_ADDRESS set) keeps the runtime env it was submitted with.
        local = None if os.environ.get("RAY_ADDRESS") else LOCAL_RUNTIME_ENV
        ray.init(include_dashboard=False, num_cpus=settings.get("ray_num_cpus"), runtime_env=local)
    storage_path, storage_fs = ray_storage(output, out_opts)
    loop_cfg = {**settings, "storage_options": dict(storage_options or {}), **dict(test_hooks or {})}
    print(
        f"[finetune] {'continuing' if continues else 'starting'} run {name}: {settings['workers']} "
        f"worker(s) x {settings['cpus_per_worker']} CPU, output {storage.join(output, name)}",
        flush=True,
    )
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_cfg,
        scaling_config=ScalingConfig(
            num_workers=settings["workers"],
            use_gpu=False,
            resources_per_worker={"CPU": settings["cpus_per_worker"]},
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=settings["max_failures"]),
        ),
    )
    hint = (f"re-run with resume={name!r} (--resume {name}) or resume='auto' to continue from its "
            "last checkpoint")
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:  # V2 raises worker/controller failures from fit()
        raise RuntimeError(f"fine-tuning run {name} failed: {e}; {hint}") from e
    if result.error is not None:
        raise RuntimeError(f"fine-tuning run {name} failed: {result.error}; {hint}") from result.error
    if result.checkpoint is None:
        raise RuntimeError(f"fine-tuning run {name} produced no checkpoint (no epoch finished)")
    with result.checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=False)
    return _export(settings, name, state, out_opts)


def _params(settings: Mapping[str, Any]) -> dict[str, Any]:
    task = settings["task"]
    if task == "detect":
        return {"min_size": settings.get("min_size"), "max_size": settings.get("max_size")}
    if task == "segment":
        return {"resize_size": settings["resize_size"]}
    return {"resize_size": settings["resize_size"], "crop_size": settings["crop_size"]}


def _export(
    settings: Mapping[str, Any], name: str, state: dict, out_opts: Mapping[str, Any]
) -> FinetuneResult:
    output = settings["output"]
    run_url = storage.join(output, name)
    fs, root = storage.open_fs(run_url, out_opts)
    history = state["history"]
    history_path, plot_path = storage.join(root, "history.json"), storage.join(root, "history.png")
    storage.write_bytes_atomic(fs, history_path, json.dumps(history, indent=2).encode())
    storage.write_bytes_atomic(fs, plot_path, plot.plot_history(history))
    exp = state["export"]
    sd = exp["state_dict"] if exp["state_dict"] is not None else state["model"]
    quant = None
    precision = "fp32"
    if settings.get("qat"):
        precision = "int8"
        quant = {
            "method": "qat",
            "backend": settings.get("qat_backend"),
            "load": "mnv3.quantization.<builder>(weights=URI, quantize=True, num_classes=N)",
        }
    lineage = {
        "run_name": name,
        "run_url": run_url,
        "init": state["init"],
        "train": settings["train"],
        "val": settings.get("val"),
        "epochs_done": state["epoch"] + 1,
        "steps": state["step"],
        "train_seconds": round(state["train_seconds"], 1),
        "workers": settings["workers"],
        "weights_variant": exp["kind"],
        "seed": settings["seed"],
        "settings": {k: v for k, v in settings.items() if k not in ("storage_options",)},
    }
    weights_uri, sidecar = export.export_model(
        storage.join(run_url, EXPORT_DIR),
        task=settings["task"],
        builder=settings["builder"],
        state_dict=sd,
        labels=state["labels"],
        categories=state["categories"],
        params=_params(settings),
        metrics=exp["metrics"],
        lineage=lineage,
        precision=precision,
        quantization=quant,
        storage_options=out_opts,
    )
    print(f"[finetune] exported {weights_uri} (metrics {exp['metrics']})", flush=True)
    return FinetuneResult(
        name,
        run_url,
        weights_uri,
        sidecar,
        dict(exp["metrics"]),
        history,
        storage.join(run_url, "history.json"),
        storage.join(run_url, "history.png"),
        state["train_seconds"],
        state["step"],
        list(state.get("resumes", [])),
    )
