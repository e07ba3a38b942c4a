"""The one configuration loader of the product: a YAML or TOML file -> typed, validated config.

Every option is a dataclass field whose metadata carries its documentation, so the
Markdown reference in the README is rendered from the model itself (``render_reference``)
and cannot drift. Loading checks everything before any work starts and names the key
that is wrong (``unknown key tasks.detect.treshold; did you mean threshold?``).

Values may be ``${ENV_VAR}`` references (expanded at load time) so secrets such as S3
keys stay out of config files; ``storage`` values are never logged nor written to
reports or Parquet metadata (``Config.to_dict(redact=True)`` hides them).

Other jobs add their own sections with ``register_section(name, dataclass)``; a
registered section is parsed and validated like the built-in ones and read back with
``config.section(name)``.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import fsspec
import yaml

TASK_NAMES = ("classify", "detect", "segment")
PRECISIONS = ("fp32", "bf16", "int8")
CLASSIFY_BUILDERS = ("mobilenet_v3_large", "mobilenet_v3_small")
DETECT_BUILDERS = ("fasterrcnn_mobilenet_v3_large_320_fpn", "fasterrcnn_mobilenet_v3_large_fpn")
SEGMENT_BUILDERS = ("lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large")

_SECRET_WORDS = ("key", "secret", "token", "password", "credential", "session", "auth")
_MIB = 1 << 20


class ConfigError(ValueError):
    """A config value is missing, unknown or invalid; the message names the key."""

    def __init__(self, key: str, message: str, source: str | None = None):
        self.key = key
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{message}")


def opt(default: Any = None, doc: str = "", *, choices: tuple | None = None, minimum: float | None = None,
        exclusive_min: bool = False, secret: bool = False, factory: Any = None) -> Any:
    """A documented config field (``doc``, allowed ``choices``, ``minimum``, ``secret``)."""
    meta = {"doc": doc, "choices": choices, "minimum": minimum, "exclusive_min": exclusive_min,
            "secret": secret}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------- sections


@dataclass
class StorageConfig:
    """Where data lives: fsspec storage options (S3 endpoint, key, secret, ...)."""

    options: dict[str, Any] = opt(
        doc="fsspec storage options used for input, output, manifests and weights, e.g. "
            "`{endpoint_url: http://127.0.0.1:9000, key: ..., secret: ...}` for s3fs. Never logged; "
            "use `${ENV_VAR}` values to keep secrets out of the file.", secret=True, factory=dict)
    input_options: dict[str, Any] | None = opt(
        None, "Options for the input only (merged over `options`).", secret=True)
    output_options: dict[str, Any] | None = opt(
        None, "Options for the output only (merged over `options`).", secret=True)

    def for_input(self) -> dict[str, Any]:
        return {**self.options, **(self.input_options or {})}

    def for_output(self) -> dict[str, Any]:
        return {**self.options, **(self.output_options or {})}


@dataclass
class ClassifyConfig:
    """Image classification (ImageNet-1k top-k labels)."""

    enabled: bool = opt(True, "Run this task (the `--tasks` flag overrides it).")
    builder: str = opt("mobilenet_v3_large", "Model builder.", choices=CLASSIFY_BUILDERS)
    weights: str | None = opt(
        None, "Weights: a registry name (e.g. `MobileNet_V3_Large_Weights.IMAGENET1K_V2`) or any fsspec "
              "URI of a state_dict file. Empty = random weights (results are meaningless).")
    sha256: str | None = opt(None, "Expected sha256 (hex or prefix) of the weights file; checked on load.")
    precision: str = opt("fp32", "Arithmetic: fp32, bf16 (autocast, fast on AMX CPUs) or int8 "
                                 "(quantized; needs int8 weights or calibration).", choices=PRECISIONS)
    resize_size: int = opt(256, "Shorter side is resized to this (232 for Large IMAGENET1K_V2).", minimum=1)
    crop_size: int = opt(224, "Centre crop fed to the model.", minimum=1)
    top_k: int = opt(5, "Labels kept per image, best first.", minimum=1)
    labels: str | list[str] = opt("imagenet1k", "Label names: a list name (imagenet1k, coco91, voc21) "
                                                "or an explicit list indexed by label id.")
    num_classes: int | None = opt(None, "Model outputs; default = number of labels.", minimum=1)


@dataclass
class DetectConfig:
    """Object detection (Faster R-CNN); boxes come out in original-image pixels."""

    enabled: bool = opt(False, "Run this task (the `--tasks` flag overrides it).")
    builder: str = opt("fasterrcnn_mobilenet_v3_large_320_fpn",
                       "Model builder (the 320 low-res detector is about 6x cheaper).",
                       choices=DETECT_BUILDERS)
    weights: str | None = opt(None, "Weights: a registry name or fsspec URI (see tasks.classify.weights).")
    sha256: str | None = opt(None, "Expected sha256 (hex or prefix) of the weights file.")
    precision: str = opt("fp32", "fp32, bf16 or int8.", choices=PRECISIONS)
    min_size: int | None = opt(None, "Detector input: shorter side (builder default: 320 or 800).", minimum=1)
    max_size: int | None = opt(None, "Detector input: longer side cap (builder default: 640 or 1333).",
                               minimum=1)
    threshold: float = opt(0.05, "Minimum box score kept.", minimum=0.0)
    top_k: int = opt(100, "Maximum boxes per image, best first.", minimum=1)
    labels: str | list[str] = opt("coco91", "Label names (list name or explicit list).")
    num_classes: int | None = opt(None, "Model outputs including background; default = number of labels.",
                                  minimum=2)


@dataclass
class SegmentConfig:
    """Semantic segmentation; one COCO RLE mask per present class at original size."""

    enabled: bool = opt(False, "Run this task (the `--tasks` flag overrides it).")
    builder: str = opt("lraspp_mobilenet_v3_large", "Model builder.", choices=SEGMENT_BUILDERS)
    weights: str | None = opt(None, "Weights: a registry name or fsspec URI (see tasks.classify.weights).")
    sha256: str | None = opt(None, "Expected sha256 (hex or prefix) of the weights file.")
    precision: str = opt("fp32", "fp32, bf16 or int8.", choices=PRECISIONS)
    resize_size: int = opt(320, "Shorter side fed to the model (official eval: 520; 320 is the fast "
                                "low-res setting).", minimum=1)
    min_area: int = opt(0, "Classes covering fewer pixels (at original size) are dropped.", minimum=0)
    include_background: bool = opt(False, "Also emit a mask for label 0 (background).")
    labels: str | list[str] = opt("voc21", "Label names (list name or explicit list).")
    num_classes: int | None = opt(None, "Model outputs; default = number of labels.", minimum=2)


@dataclass
class TasksConfig:
    """The models run on every image (one decode feeds all enabled tasks)."""

    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    detect: DetectConfig = field(default_factory=DetectConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)

    def enabled(self) -> list[str]:
        return [name for name in TASK_NAMES if getattr(self, name).enabled]


@dataclass
class BatchConfig:
    """How images are grouped for the models (bounds memory by decoded bytes, not only rows)."""

    max_images: int = opt(16, "Images per model call at most.", minimum=1)
    max_decoded_bytes: int = opt(64 * _MIB, "Decoded RGB bytes per model call at most (a JPEG grows "
                                            "about 20x when decoded). One larger image still runs alone.",
                                 minimum=1)


@dataclass
class ActorsConfig:
    """Inference actor pool and read-task sizing (computed from the cluster when unset)."""

    num_cpus: float | None = opt(None, "CPUs per inference actor (= its torch threads). Default: 1, or "
                                       "what is left after one read task on a 1-CPU cluster.",
                                 minimum=0.0, exclusive_min=True)
    max_actors: int | None = opt(None, "Upper bound of the autoscaling actor pool. Default: as many as fit "
                                       "while leaving `read_num_cpus` for one read task.", minimum=1)
    read_num_cpus: float = opt(0.25, "CPUs reserved by each read+decode task (fractional so reads are "
                                     "never starved by the actors).", minimum=0.0, exclusive_min=True)
    max_read_tasks: int | None = opt(None, "Concurrent read+decode tasks at most. Default: cluster CPUs.",
                                     minimum=1)
    quant_engine: str | None = opt(None, "Quantized engine of int8 models in the actors (x86, fbgemm, "
                                         "onednn, qnnpack). Default: MNV3_QUANT_ENGINE on the actor's node, "
                                         "else its CPU's engine (x86 on x86-64, qnnpack on ARM).",
                                   choices=("x86", "fbgemm", "onednn", "qnnpack"))


@dataclass
class RunOptions:
    """Run behaviour: sharding, decode limits, stall detection, progress."""

    images_per_shard: int = opt(256, "Images per shard for inputs without natural shards (file prefixes, "
                                     "URI lists, Parquet).", minimum=1)
    image_column: str | None = opt(None, "Parquet inputs: the column holding image bytes (auto-detected "
                                         "when unset).")
    key_column: str | None = opt(None, "Parquet inputs: the column holding image keys (default: a key/id "
                                       "column, else row numbers).")
    max_images: int | None = opt(None, "Stop after this many images (pending shards are taken in order "
                                       "until the total reaches it; `--max-images`).", minimum=1)
    max_pixels: int = opt(89_478_485, "Decompression-bomb cap: images with more pixels are rejected "
                                      "(status decode_error).", minimum=1)
    draft_decode: bool = opt(True, "Downscale large JPEGs while decoding (PIL draft) when the source is at "
                                   "least twice the largest model input. Boxes and masks are still reported "
                                   "in original pixels.")
    no_progress_timeout_s: float = opt(600.0, "Fail the run with an error naming the stuck stage when no "
                                              "data moves for this long (Ray Data "
                                              "execution_no_progress_timeout_s).", minimum=0.0,
                                       exclusive_min=True)
    progress_interval_s: float = opt(5.0, "Seconds between live progress lines.", minimum=0.0)
    ray_progress_bars: bool = opt(False, "Show Ray Data's own progress bars as well.")
    seed: int = opt(0, "Seed for random weights (when no weights are configured) so every actor agrees.")


@dataclass
class Config:
    """The whole product's configuration. Sections: storage, tasks, batch, actors, run (+ registered)."""

    storage: StorageConfig = field(default_factory=StorageConfig)
    tasks: TasksConfig = field(default_factory=TasksConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    actors: ActorsConfig = field(default_factory=ActorsConfig)
    run: RunOptions = field(default_factory=RunOptions)
    extra: dict[str, Any] = field(default_factory=dict, metadata={"internal": True})

    def section(self, name: str) -> Any:
        """A section registered with ``register_section`` (its defaults if the file lacks it)."""
        if name not in _REGISTERED:
            raise KeyError(f"no config section {name!r} is registered; known: {sorted(_REGISTERED)}")
        if name not in self.extra:
            self.extra[name] = _REGISTERED[name]()
        return self.extra[name]

    def to_dict(self, redact: bool = True) -> dict[str, Any]:
        """Plain dict (for reports); with ``redact`` the storage section is hidden entirely."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            out[f.name] = _to_plain(getattr(self, f.name), redact)
        for name, value in self.extra.items():
            out[name] = _to_plain(value, redact)
        return out


_BUILTIN = {f.name for f in dataclasses.fields(Config) if f.name != "extra"}
_REGISTERED: dict[str, type] = {}


def _load_job_sections() -> None:
    """Import every subcommand module so the sections they register are known (one shared file
    can configure annotate, finetune, benchmark, ... and the reference lists them all)."""
    import importlib

    from jobs.cli import SUBCOMMANDS

    for name in SUBCOMMANDS:
        try:
            importlib.import_module(f"jobs.{name}")
        except ImportError:  # a broken optional job must not break config loading for the others
            continue


def register_section(name: str, cls: type) -> None:
    """Let another job add a top-level section (a dataclass of ``opt`` fields) to the config."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"config section {name!r} must be a dataclass, got {cls!r}")
    if name in _BUILTIN or (name in _REGISTERED and _REGISTERED[name] is not cls):
        raise ValueError(f"config section {name!r} is already defined")
    _REGISTERED[name] = cls


def _to_plain(value: Any, redact: bool) -> Any:
    if dataclasses.is_dataclass(value):
        out = {}
        for f in dataclasses.fields(value):
            v = getattr(value, f.name)
            if redact and f.metadata.get("secret") and v:
                out[f.name] = redact_options(v) if isinstance(v, Mapping) else "***"
            else:
                out[f.name] = _to_plain(v, redact)
        return out
    if isinstance(value, Mapping):
        return {k: _to_plain(v, redact) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v, redact) for v in value]
    return value


def redact_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Storage options with every credential-like value replaced by ``***`` (keys kept)."""
    out: dict[str, Any] = {}
    for k, v in options.items():
        if isinstance(v, Mapping):
            out[k] = redact_options(v)
        elif any(word in str(k).lower() for word in _SECRET_WORDS):
            out[k] = "***"
        else:
            out[k] = v
    return out


# --------------------------------------------------------------------------- parsing


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else f"; known keys: {', '.join(sorted(choices))}"


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _expand_env(value: str, key: str, source: str | None) -> str:
    def sub(match: re.Match) -> str:
        name = match.group(1)
        if name not in os.environ:
            raise ConfigError(key, f"{key} refers to environment variable {name}, which is not set", source)
        return os.environ[name]

    return _ENV_REF.sub(sub, value)


def _expand_env_deep(value: Any, key: str, source: str | None) -> Any:
    if isinstance(value, str):
        return _expand_env(value, key, source)
    if isinstance(value, Mapping):
        return {k: _expand_env_deep(v, f"{key}.{k}", source) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env_deep(v, key, source) for v in value]
    return value


def _coerce(value: Any, tp: Any, key: str, source: str | None) -> Any:
    """Check ``value`` against type ``tp`` (int -> float allowed); raises ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for alt in typing.get_args(tp):
            try:
                return _coerce(value, alt, key, source)
            except ConfigError:
                continue
        raise ConfigError(key, f"{key} must be {_type_name(tp)}, got {type(value).__name__} {value!r}",
                          source)
    if tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return _expand_env(value, key, source)
    elif origin is list:
        if isinstance(value, (list, tuple)):
            (inner,) = typing.get_args(tp)
            return [_coerce(v, inner, f"{key}[{i}]", source) for i, v in enumerate(value)]
    elif origin is dict or tp is dict:
        if isinstance(value, Mapping):
            return _expand_env_deep(dict(value), key, source)
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, Mapping):
            return _build(tp, value, key, source)
    else:  # pragma: no cover - a field type this loader does not know is a programming error
        raise TypeError(f"config field {key} has unsupported type {tp!r}")
    raise ConfigError(key, f"{key} must be {_type_name(tp)}, got {type(value).__name__} {value!r}", source)


def _check_field(f: dataclasses.Field, value: Any, key: str, source: str | None) -> None:
    choices = f.metadata.get("choices")
    if choices and value is not None and value not in choices:
        raise ConfigError(key, f"{key} must be one of {', '.join(map(str, choices))}; got {value!r}"
                          f"{_suggest(str(value), list(choices)) if isinstance(value, str) else ''}", source)
    minimum = f.metadata.get("minimum")
    if minimum is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < minimum or (f.metadata.get("exclusive_min") and value == minimum):
            op = ">" if f.metadata.get("exclusive_min") else ">="
            raise ConfigError(key, f"{key} must be {op} {minimum}, got {value!r}", source)


def _build(cls: type, data: Mapping[str, Any], prefix: str, source: str | None) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            raise ConfigError(key, f"unknown key {key}{_suggest(str(name), list(fields))}", source)
        value = _coerce(value, hints[name], key, source)
        _check_field(fields[name], value, key, source)
        kwargs[name] = value
    return cls(**kwargs)


def _validate(cfg: Config, source: str | None) -> Config:
    """Checks that involve more than one key."""
    if not cfg.tasks.enabled():
        raise ConfigError("tasks", "no task is enabled: set tasks.<classify|detect|segment>.enabled = true "
                                   "or pass --tasks", source)
    for name in TASK_NAMES:
        task = getattr(cfg.tasks, name)
        if isinstance(task.labels, str):
            from mnv3.categories import get_categories

            try:
                get_categories(task.labels)
            except KeyError as e:
                raise ConfigError(f"tasks.{name}.labels", f"tasks.{name}.labels: {e.args[0]}",
                                  source) from None
        elif not task.labels:
            raise ConfigError(f"tasks.{name}.labels", f"tasks.{name}.labels is an empty list", source)
    c = cfg.tasks.classify
    if c.crop_size > c.resize_size:
        raise ConfigError("tasks.classify.crop_size", f"tasks.classify.crop_size ({c.crop_size}) is larger "
                          f"than tasks.classify.resize_size ({c.resize_size})", source)
    d = cfg.tasks.detect
    if d.min_size and d.max_size and d.min_size > d.max_size:
        raise ConfigError("tasks.detect.min_size", f"tasks.detect.min_size ({d.min_size}) is larger than "
                          f"tasks.detect.max_size ({d.max_size})", source)
    return cfg


def from_dict(data: Mapping[str, Any] | None, source: str | None = None) -> Config:
    """Build and validate a Config from a parsed mapping (``source`` names the file in errors)."""
    _load_job_sections()
    data = dict(data or {})
    if not isinstance(data, Mapping):
        raise ConfigError("", f"the config must be a mapping of sections, got {type(data).__name__}", source)
    builtin = {k: v for k, v in data.items() if k in _BUILTIN}
    extra = {}
    for name, value in data.items():
        if name in _BUILTIN:
            continue
        if name not in _REGISTERED:
            raise ConfigError(name, f"unknown key {name}{_suggest(str(name), [*_BUILTIN, *_REGISTERED])}",
                              source)
        if not isinstance(value, Mapping):
            raise ConfigError(name, f"{name} must be a mapping, got {type(value).__name__}", source)
        extra[name] = _build(_REGISTERED[name], value, name, source)
    cfg = _build(Config, builtin, "", source)
    cfg.extra = extra
    return _validate(cfg, source)


def parse_text(text: str, fmt: str, source: str | None = None) -> dict[str, Any]:
    """Parse YAML or TOML text into a mapping (syntax errors become ConfigError)."""
    try:
        data = tomllib.loads(text) if fmt == "toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        raise ConfigError("", f"cannot parse the config as {fmt.upper()}: {e}", source) from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError("", f"the config must be a mapping of sections, got {type(data).__name__}", source)
    return dict(data)


def load(path: str | os.PathLike[str] | None = None, overrides: Mapping[str, Any] | None = None,
         storage_options: Mapping[str, Any] | None = None,
         defaults: Mapping[str, Any] | None = None) -> Config:
    """Load ``path`` (YAML ``.yaml``/``.yml`` or TOML ``.toml``; any fsspec URL), apply dotted
    ``overrides`` (e.g. ``{"tasks.detect.threshold": 0.5}``), validate and return the Config.

    ``defaults`` are dotted keys applied only where neither the file nor ``overrides`` set the
    key (e.g. what a fine-tuned model's export sidecar says; explicit settings win).
    With no path the defaults are used. Raises ConfigError (naming the key) on any problem.
    """
    source = str(path) if path is not None else None
    data: dict[str, Any] = {}
    if path is not None:
        fmt = "toml" if source.lower().endswith(".toml") else "yaml"
        try:
            with fsspec.open(source, "rt", encoding="utf-8", **dict(storage_options or {})) as f:
                text = f.read()
        except (OSError, ValueError, ImportError) as e:
            raise ConfigError("", f"cannot read config file: {type(e).__name__}: {e}", source) from None
        data = parse_text(text, fmt, source)
    for key, value in (overrides or {}).items():
        set_dotted(data, key, value)
    for key, value in (defaults or {}).items():
        if not has_dotted(data, key):
            set_dotted(data, key, value)
    return from_dict(data, source)


def has_dotted(data: Mapping[str, Any], key: str) -> bool:
    """True when ``data`` sets the dotted ``key`` (``has_dotted(d, "tasks.detect.threshold")``)."""
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """``set_dotted(d, "tasks.detect.threshold", 0.5)`` -> d["tasks"]["detect"]["threshold"] = 0.5."""
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(key, f"{'.'.join(parts[:i + 1])} is not a section, cannot set {key}")
        node = child
    node[parts[-1]] = value


def parse_assignment(text: str) -> tuple[str, Any]:
    """``"tasks.detect.threshold=0.5"`` -> ("tasks.detect.threshold", 0.5); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(text, f"--set expects KEY=VALUE (e.g. tasks.detect.threshold=0.5), got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


# --------------------------------------------------------------------------- reference


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return ""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int) and value >= _MIB and value % _MIB == 0:
        return f"{value} ({value // _MIB} MiB)"
    return f"`{value}`" if not isinstance(value, (dict, list)) or value else "`{}`" if value == {} else "`[]`"


def _section_rows(cls: type, prefix: str, lines: list[str]) -> None:
    hints = typing.get_type_hints(cls)
    nested = []
    rows = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        key = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(hints[f.name]):
            nested.append((hints[f.name], key))
            continue
        doc = f.metadata.get("doc", "")
        if f.metadata.get("choices"):
            doc += f" One of: {', '.join(f.metadata['choices'])}."
        type_text = _type_name(hints[f.name]).replace(" | ", " or ")
        rows.append(f"| `{key}` | {type_text} | {_default_text(f)} | {doc} |")
    if rows:
        lines += [f"### `{prefix}`", "", (cls.__doc__ or "").strip(), "",
                  "| key | type | default | meaning |", "|---|---|---|---|", *rows, ""]
    for tp, key in nested:
        _section_rows(tp, key, lines)


def render_reference() -> str:
    """The Markdown reference of every config key (type, default, meaning), from the model itself."""
    _load_job_sections()
    lines = ["## Configuration reference", "",
             "A YAML or TOML file passed with `--config`; every key is optional. Flags override the file, "
             "and `--set KEY=VALUE` overrides any key. `${ENV_VAR}` in a value is replaced by the "
             "environment variable. Unknown keys and bad values fail before any work starts.", ""]
    for f in dataclasses.fields(Config):
        if f.metadata.get("internal"):
            continue
        _section_rows(typing.get_type_hints(Config)[f.name], f.name, lines)
    for name, cls in sorted(_REGISTERED.items()):
        _section_rows(cls, name, lines)
    return "\n".join(lines).rstrip() + "\n"


def example_yaml() -> str:
    """A commented example config with every built-in default (for docs and ``--print-config``)."""
    return yaml.safe_dump(Config().to_dict(redact=False), sort_keys=False)


if __name__ == "__main__":  # python -m jobs.config > docs/config_reference.md
    # Render from the importable module: run as a script this file is ``__main__``, a second copy
    # of the module, and other jobs register their sections in ``jobs.config``, not here.
    from jobs import config as _importable

    print(_importable.render_reference(), end="")


__all__ = ["Config", "ConfigError", "load", "from_dict", "register_section", "render_reference",
           "redact_options", "parse_assignment", "set_dotted"]
