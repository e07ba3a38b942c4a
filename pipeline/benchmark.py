"""Model-only throughput of every model in every precision mode, measured in one run.

Ratios taken in one run on the same cores are what we compare, never absolute times
across runs or machines. For each case (a model at an input size) and mode:

* ``fp32``: eager, contiguous NCHW (the parity-tested baseline);
* ``channels_last``: fp32 with NHWC memory format;
* ``bf16``: CPU autocast to bfloat16 with channels_last (fast with AMX / AVX512-BF16);
* ``int8``: post-training static quantization (calibrated on the benchmark input),
  eager ``torch.ao`` int8 kernels of the chosen engine.

Each row: warm-up calls, then the median of ``repeats`` timed calls; images/s per core,
the process's peak RSS while that mode was built and run, and the ratio to fp32 at the same
case and batch size. Images/s per core comes from one of two clocks:

* ``wall`` (default): images / wall seconds / threads, the plain throughput of a quiet machine;
* ``cpu``: images / CPU seconds of this process. On a machine shared with other jobs the wall
  clock counts the time the scheduler gave to others; CPU time does not, so per-core numbers
  and ratios stay meaningful under load (cache contention still adds some noise).

Both are recorded in every row. Report format (JSON): ``{"machine", "config", "rows"}``;
``rows`` is a list of dicts with a ``kind`` field: ``"model"`` rows come from ``CASES``
(``register_case`` adds more); other kinds come from row providers registered with
``register_rows(name, provider)`` (the annotate job's end-to-end rows) and chosen with
``run_benchmark(..., extra=[name])`` / ``--extra name``.
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

DEFAULT_MODES = ("fp32", "channels_last", "bf16", "int8")
MODES = DEFAULT_MODES


@dataclass(frozen=True)
class Case:
    """One benchmark row group: a model at an input size.

    ``build(**kw)`` returns the fp32 model (quantizable form); ``make_input(batch, quick)``
    returns what its forward takes. ``batched`` is False where the model's batch is a list
    of images processed one by one (detectors) or a single large image (segmenters).
    """

    name: str
    builder: str
    task: str
    size: tuple[int, int]
    build: Callable[..., nn.Module]
    batched: bool = True
    quick_size: tuple[int, int] = (64, 64)
    build_kwargs: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        return f"{self.builder} input {self.size[0]}x{self.size[1]}" + ("" if self.batched else " (batch 1)")

    def input_size(self, quick: bool) -> tuple[int, int]:
        return self.quick_size if quick else self.size

    def make_input(self, batch: int, quick: bool) -> Any:
        h, w = self.input_size(quick)
        gen = torch.Generator().manual_seed(0)
        if self.task == "detection":
            return [torch.rand(3, h, w, generator=gen) for _ in range(batch)]
        x = torch.rand(batch, 3, h, w, generator=gen)
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        return (x - mean) / std


def _quantizable(builder: str) -> Callable[..., nn.Module]:
    def build(**kw: Any) -> nn.Module:
        from mnv3.quantization.registry import build_quantizable

        return build_quantizable(builder, **kw)
    return build


CASES: dict[str, Case] = {}


def register_case(case: Case) -> None:
    """Add (or replace) a benchmark case."""
    CASES[case.name] = case


for _b in ("mobilenet_v3_large", "mobilenet_v3_small"):
    register_case(Case(_b, _b, "classification", (224, 224), _quantizable(_b), True, (64, 64)))
for _b, _short in (("fasterrcnn_mobilenet_v3_large_fpn", "frcnn_fpn"),
                   ("fasterrcnn_mobilenet_v3_large_320_fpn", "frcnn_320_fpn")):
    register_case(Case(f"{_short}@640x480", _b, "detection", (480, 640), _quantizable(_b), False, (96, 128)))
for _b, _short in (("lraspp_mobilenet_v3_large", "lraspp"), ("deeplabv3_mobilenet_v3_large", "deeplabv3")):
    for _s in (520, 320):
        register_case(Case(f"{_short}@{_s}", _b, "segmentation", (_s, _s), _quantizable(_b), False, (64, 64)))


def select_cases(names: list[str] | None) -> list[Case]:
    """Cases by case name or builder name (all cases of that builder); all when ``names`` is empty."""
    if not names:
        return list(CASES.values())
    out: list[Case] = []
    for name in names:
        hits = [c for c in CASES.values() if name in (c.name, c.builder)]
        if not hits:
            raise ValueError(f"unknown benchmark model {name!r}; choose case or builder names from "
                             f"{sorted(CASES)}")
        out += [c for c in hits if c not in out]
    return out


CLOCKS = ("wall", "cpu")


@dataclass
class BenchmarkConfig:
    """What to measure and how; ``quick`` shrinks inputs, batches and repeats for smoke tests."""

    modes: list[str] = field(default_factory=lambda: list(DEFAULT_MODES))
    threads: int = 1
    batch_sizes: list[int] = field(default_factory=lambda: [1, 16])
    repeats: int = 5
    warmup: int = 2
    quick: bool = False
    clock: str = "wall"

    def __post_init__(self) -> None:
        bad = [m for m in self.modes if m not in MODES]
        if bad:
            raise ValueError(f"unknown modes {bad}; choose from {list(MODES)}")
        if self.clock not in CLOCKS:
            raise ValueError(f"unknown clock {self.clock!r}; choose from {list(CLOCKS)}")
        if self.threads < 1 or self.repeats < 1 or self.warmup < 0 or not self.batch_sizes \
                or min(self.batch_sizes) < 1:
            raise ValueError("threads, repeats and batch sizes must be >= 1 and warmup >= 0")
        if self.quick:
            self.repeats = min(self.repeats, 2)
            self.warmup = min(self.warmup, 1)
            self.batch_sizes = [min(b, 2) for b in self.batch_sizes]


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux), so the next peak is per mode."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (VmHWM; ru_maxrss elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024.0 * 1024.0) if platform.system() == "Darwin" else rss / 1024.0


def _to_channels_last(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def prepare_mode(case: Case, mode: str, quick: bool) -> tuple[nn.Module, Callable[[Any], Any]]:
    """(model, call) for a mode; ``call(input)`` runs one forward under the mode's settings."""
    model = case.build(**case.build_kwargs).eval()
    if mode == "int8":
        from mnv3.quantization.ptq import calibrate, convert, prepare_ptq

        prepare_ptq(model)
        calibrate(model, [case.make_input(1, quick)])
        convert(model)
    elif mode in ("channels_last", "bf16"):
        model = model.to(memory_format=torch.channels_last)

    def call(x: Any) -> Any:
        with torch.inference_mode():
            if mode == "bf16":
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return model(_to_channels_last(x))
            if mode == "channels_last":
                return model(_to_channels_last(x))
            return model(x)
    return model, call


def time_calls(call: Callable[[Any], Any], x: Any, warmup: int,
               repeats: int) -> tuple[list[float], list[float]]:
    """(wall seconds, process CPU seconds) per call for ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        call(x)
    wall, cpu = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        call(x)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return wall, cpu


def machine_info(threads: int) -> dict[str, Any]:
    """What the numbers were measured on."""
    from mnv3.quantization.engine import choose_engine

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        engine = choose_engine()
    except (ValueError, RuntimeError):
        engine = None
    return {"cpu": cpu, "machine": platform.machine(), "cpus": os.cpu_count(), "threads": threads,
            "torch": str(torch.__version__), "quantized_engine": engine,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "python": platform.python_version()}


RowProvider = Callable[["BenchmarkConfig", Callable[[str], None]], list[dict[str, Any]]]
ROW_PROVIDERS: dict[str, RowProvider] = {}


def register_rows(name: str, provider: RowProvider) -> None:
    """Add a source of extra report rows (e.g. the annotate job's end-to-end throughput).

    ``provider(cfg, log)`` runs under ``cfg.threads`` torch threads and returns rows: dicts
    with at least ``kind`` (e.g. "end_to_end"), ``model``, ``mode``, ``batch`` and
    ``images_per_s_per_core``; ``input``, ``images_per_s``, ``peak_rss_mb`` and any other
    plain-data fields are optional. ``vs_fp32`` is filled in against the row of the same
    kind, model and batch whose mode is "fp32", when there is one.
    """
    ROW_PROVIDERS[name] = provider


def run_benchmark(cases: list[Case], cfg: BenchmarkConfig, log: Callable[[str], None] = print,
                  extra: list[str] | None = None) -> dict[str, Any]:
    """Measure every (case, mode, batch), then run the ``extra`` row providers; returns the report."""
    unknown = [name for name in extra or [] if name not in ROW_PROVIDERS]
    if unknown:
        raise ValueError(f"unknown extra benchmark rows {unknown}; registered: {sorted(ROW_PROVIDERS)}")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    rows: list[dict[str, Any]] = []
    try:
        for case in cases:
            batches = cfg.batch_sizes if case.batched else [1]
            for mode in cfg.modes:
                gc.collect()
                reset_peak_rss()
                try:
                    model, call = prepare_mode(case, mode, cfg.quick)
                except Exception as exc:  # a mode a model cannot run in is a row, not a crash
                    for b in batches:
                        rows.append(_row(case, mode, b, cfg, error=f"{type(exc).__name__}: {exc}"))
                    log(f"benchmark: {case.name} {mode}: skipped ({type(exc).__name__}: {exc})")
                    continue
                for b in batches:
                    x = case.make_input(b, cfg.quick)
                    try:
                        wall, cpu = time_calls(call, x, cfg.warmup, cfg.repeats)
                    except Exception as exc:
                        rows.append(_row(case, mode, b, cfg, error=f"{type(exc).__name__}: {exc}"))
                        log(f"benchmark: {case.name} {mode} b{b}: failed ({exc})")
                        continue
                    row = _row(case, mode, b, cfg, wall=wall, cpu=cpu)
                    rows.append(row)
                    log(f"benchmark: {case.name:18s} {mode:13s} b{b:<3d} {row['images_per_s_per_core']:8.2f} "
                        f"img/s/core ({cfg.clock} clock)")
                del model, call
        for name in extra or []:
            log(f"benchmark: rows from {name}")
            rows += [dict(r) for r in ROW_PROVIDERS[name](cfg, log)]
    finally:
        torch.set_num_threads(previous_threads)
    _add_ratios(rows)
    return {"machine": machine_info(cfg.threads), "config": {
        "modes": cfg.modes, "threads": cfg.threads, "batch_sizes": cfg.batch_sizes, "repeats": cfg.repeats,
        "warmup": cfg.warmup, "quick": cfg.quick, "clock": cfg.clock, "extra": list(extra or [])},
        "rows": rows}


def _row(case: Case, mode: str, batch: int, cfg: BenchmarkConfig, wall: list[float] | None = None,
         cpu: list[float] | None = None, error: str | None = None) -> dict[str, Any]:
    h, w = case.input_size(cfg.quick)
    row: dict[str, Any] = {"kind": "model", "model": case.name, "builder": case.builder, "task": case.task,
                           "mode": mode, "batch": batch, "input": f"{h}x{w}", "threads": cfg.threads,
                           "clock": cfg.clock, "error": error}
    if wall and cpu:
        med, cpu_med = statistics.median(wall), statistics.median(cpu)
        per_core = batch / cpu_med if cfg.clock == "cpu" else batch / med / cfg.threads
        row.update(seconds_median=med, seconds_all=wall, cpu_seconds_median=cpu_med, cpu_seconds_all=cpu,
                   images_per_s=batch / med, images_per_s_per_core=per_core,
                   peak_rss_mb=round(peak_rss_mb(), 1))
    return row


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """``vs_fp32``: images/s per core over the fp32 row of the same kind, model and batch."""
    def key(r: dict[str, Any]) -> tuple[Any, ...]:
        return r.get("kind", "model"), r.get("model"), r.get("batch")

    base = {key(r): r["images_per_s_per_core"] for r in rows
            if r.get("mode") == "fp32" and r.get("images_per_s_per_core")}
    for r in rows:
        r.setdefault("kind", "model")
        ref = base.get(key(r))
        rate = r.get("images_per_s_per_core")
        r["vs_fp32"] = round(rate / ref, 3) if ref and rate else None


def format_table(report: dict[str, Any]) -> str:
    """The report as a fixed-width text table (one line per row)."""
    m = report["machine"]
    clock = report.get("config", {}).get("clock", "wall")
    lines = [f"# {m['cpu']} ({m['machine']}, {m['cpu_capability']}), torch {m['torch']}, "
             f"{m['threads']} thread(s), int8 engine {m['quantized_engine']}, {clock} clock",
             f"{'kind':10s} {'model':20s} {'input':9s} {'mode':13s} {'batch':>5s} {'img/s/core':>11s} "
             f"{'vs fp32':>8s} {'peak RSS MB':>11s}"]
    for r in report["rows"]:
        head = (f"{r.get('kind', 'model'):10s} {r['model']:20s} {r.get('input', '-'):9s} {r['mode']:13s} "
                f"{r['batch']:5d}")
        if r.get("error"):
            lines.append(f"{head}  skipped: {r['error'][:70]}")
            continue
        ratio = f"{r['vs_fp32']:.2f}x" if r.get("vs_fp32") else "-"
        rss = f"{r['peak_rss_mb']:11.0f}" if r.get("peak_rss_mb") else f"{'-':>11s}"
        lines.append(f"{head} {r['images_per_s_per_core']:11.2f} {ratio:>8s} {rss}")
    return "\n".join(lines)


_COLOURS = {"fp32": (90, 90, 90), "channels_last": (70, 130, 180), "bf16": (230, 140, 40),
            "int8": (60, 170, 90)}


def plot_png(report: dict[str, Any], width: int = 900) -> bytes:
    """A horizontal bar chart (PIL only) of each row's speed-up over fp32; returns PNG bytes."""
    import io

    from PIL import Image, ImageDraw

    rows = [r for r in report["rows"] if r.get("vs_fp32")]
    bar_h, label_w, top = 16, 330, 30
    height = top + bar_h * max(len(rows), 1) + 20
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    m = report["machine"]
    draw.text((8, 8), f"speed-up vs fp32 eager - {m['cpu']}, {m['threads']} thread(s)", fill="black")
    top_ratio = max([r["vs_fp32"] for r in rows] + [1.0])
    scale = (width - label_w - 70) / top_ratio
    for i, r in enumerate(rows):
        y = top + i * bar_h
        kind = "" if r.get("kind", "model") == "model" else f"[{r['kind']}] "
        draw.text((8, y + 2), f"{kind}{r['model']} b{r['batch']} {r['mode']}", fill="black")
        x1 = label_w + int(r["vs_fp32"] * scale)
        draw.rectangle([label_w, y + 2, x1, y + bar_h - 2], fill=_COLOURS.get(r["mode"], (120, 120, 120)))
        draw.text((x1 + 4, y + 2), f"{r['vs_fp32']:.2f}x", fill="black")
    x_one = label_w + int(scale)
    draw.line([x_one, top, x_one, height - 10], fill=(200, 0, 0))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
