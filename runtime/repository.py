"""The model repository: ``<repo>/<model>/<version>/model.onnx`` (+ ``<repo>/<model>/config.toml``).

Input and output names, dtypes and shapes come from the ONNX file itself; the
highest version is the default. ``config.toml`` holds batching, providers and
queue limits (see README, "Model configuration").
"""

from __future__ import annotations

import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (JetPack 6)
    import tomli as tomllib

from inferq.broker.topology import VERSION_RE, QueueLimits, check_model_name
from inferq.errors import ConfigError, UnknownModel
from inferq.runtime.variants import VariantConfig, check_selector, parse_variants

log = logging.getLogger("inferq.repository")

DEFAULT_PROVIDERS = ("tensorrt", "cuda", "cpu")


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output; ``None`` in ``shape`` is a dynamic dim, a ``None`` shape an unknown rank."""

    name: str
    dtype: str
    shape: tuple[int | None, ...] | None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": None if self.shape is None else list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorSpec:
        return cls(d["name"], d["dtype"], None if d["shape"] is None else tuple(d["shape"]))


@dataclass(frozen=True)
class BatchingConfig:
    max_batch_size: int = 32
    max_queue_delay_ms: float = 2.0


@dataclass(frozen=True)
class RetryConfig:
    """Which inference errors are worth another attempt, and how often."""

    max_attempts: int = 3
    backoff_s: float = 0.5
    transient_errors: tuple[str, ...] = ("out of memory", "CUDA", "cuDNN", "TensorRT", "resource exhausted", "bad_alloc")

    def is_transient(self, message: str) -> bool:
        """Whether an error message matches one of ``transient_errors`` (case-insensitive substrings)."""
        lowered = message.lower()
        return any(pattern.lower() in lowered for pattern in self.transient_errors)


@dataclass(frozen=True)
class ModelConfig:
    """Per-model settings from ``config.toml``."""

    batching: BatchingConfig = field(default_factory=BatchingConfig)
    providers: tuple[str, ...] = DEFAULT_PROVIDERS
    provider_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    intra_op_threads: int = 0
    allow_spinning: bool = False
    allow_nan: bool = True
    run_timeout_s: float = 60.0  # one session run; past it ORT is told to stop and the job fails
    # Runs predicted shorter than this (EWMA per batch row) run on the worker's event loop, not in its
    # session thread: the hop costs 1-2.6 ms, far more than a tiny model computes. 0: always the thread.
    inline_run_ms: float = 0.2
    require_providers: tuple[str, ...] = ()
    require: dict[str, str] = field(default_factory=dict)  # a device selector every node running it must match
    variants: dict[str, VariantConfig] = field(default_factory=dict)  # [variants.NAME]: a file per device selector
    queue: QueueLimits = field(default_factory=QueueLimits)
    retry: RetryConfig = field(default_factory=RetryConfig)
    scaling: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> ModelConfig:
        """Read ``config.toml``; absent means defaults."""
        if not path.exists():
            return cls()
        try:
            return cls.from_dict(tomllib.loads(path.read_text()), str(path))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"bad model config {path}: {exc}") from exc

    @classmethod
    def parse(cls, text: str, what: str = "model config") -> ModelConfig:
        """A ``config.toml`` given as text (a push's ``--config``)."""
        try:
            return cls.from_dict(tomllib.loads(text), what)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"bad {what}: {exc}") from exc

    @classmethod
    def from_dict(cls, raw: dict[str, Any], what: str = "model config") -> ModelConfig:
        """The inverse of :meth:`to_dict` (also what ``config.toml`` parses to); ConfigError on unknown keys."""
        raw = dict(raw)
        try:
            return cls(
                batching=BatchingConfig(**raw.pop("batching", {})),
                providers=tuple(raw.pop("providers", DEFAULT_PROVIDERS)),
                queue=QueueLimits(**raw.pop("queue", {})),
                require_providers=tuple(raw.pop("require_providers", ())),
                require=check_selector(raw.pop("require", {}), f"{what}: require", empty_ok=True),
                variants=parse_variants(raw.pop("variants", {})),
                retry=_retry(raw.pop("retry", {})),
                **raw,
            )
        except TypeError as exc:
            raise ConfigError(f"bad {what}: {exc}") from exc
        except ConfigError as exc:
            raise ConfigError(f"bad {what}: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["variants"] = {name: v.to_dict() for name, v in self.variants.items()}  # the TOML shape, which from_dict reads
        return doc


def _retry(raw: dict[str, Any]) -> RetryConfig:
    if "transient_errors" in raw:
        raw = dict(raw, transient_errors=tuple(raw["transient_errors"]))
    return RetryConfig(**raw)


@dataclass(frozen=True)
class ModelVersion:
    """One servable version: its file and its signature."""

    model: str
    version: str
    path: Path | None  # None on an edge, which has only the signature
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    opset: int = 0  # the default ONNX domain's opset (0: unknown)


@dataclass(frozen=True)
class ModelEntry:
    """A model with all its versions and its config."""

    name: str
    versions: dict[str, ModelVersion]
    config: ModelConfig

    @property
    def default_version(self) -> str:
        return max(self.versions, key=int)

    def version(self, version: str | None) -> ModelVersion:
        """The given version, or the default one."""
        v = version or self.default_version
        if v not in self.versions:
            raise UnknownModel(f"model {self.name!r} has no version {v!r} (has {sorted(self.versions, key=int)})")
        return self.versions[v]


def scan(root: Path) -> dict[str, ModelEntry]:
    """Read every model under ``root``."""
    if not root.is_dir():
        raise ConfigError(f"model repository {root} is not a directory")
    models = {}
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        entry = load_model(root, model_dir.name)
        if entry.versions:
            models[entry.name] = entry
    return models


def load_model(root: Path, name: str) -> ModelEntry:
    """Read one model directory."""
    check_model_name(name)
    model_dir = root / name
    if not model_dir.is_dir():
        raise UnknownModel(f"model {name!r} is not in repository {root}")
    versions = {}
    for vdir in model_dir.iterdir():
        if vdir.is_dir() and VERSION_RE.match(vdir.name) and (vdir / "model.onnx").exists():
            versions[vdir.name] = read_signature(name, vdir.name, vdir / "model.onnx")
    return ModelEntry(name, versions, ModelConfig.load(model_dir / "config.toml"))


def read_signature(model: str, version: str, path: Path) -> ModelVersion:
    """Read inputs and outputs from the ONNX graph, refusing external data outside its directory."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises bare DecodeError/ValueError variants; all mean "bad file"
        raise ConfigError(f"{path} is not a readable ONNX model: {exc}") from exc
    _check_external_data(proto, path.parent)
    initializers = {i.name for i in proto.graph.initializer}

    def spec(value: Any) -> TensorSpec:
        t = value.type.tensor_type
        if not t.HasField("shape"):
            return TensorSpec(value.name, _dtype_name(t.elem_type), None)
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
        return TensorSpec(value.name, _dtype_name(t.elem_type), dims)

    inputs = tuple(spec(v) for v in proto.graph.input if v.name not in initializers)
    outputs = tuple(spec(v) for v in proto.graph.output)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    return ModelVersion(model, version, path, inputs, outputs, opset)


def external_files(path: Path) -> list[str]:
    """The external data files ``model.onnx`` refers to, relative to its directory (checked to stay inside it)."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises bare DecodeError/ValueError variants; all mean "bad file"
        raise ConfigError(f"{path} is not a readable ONNX model: {exc}") from exc
    _check_external_data(proto, path.parent)
    names = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    return sorted(names)


def _dtype_name(elem_type: int) -> str:
    from onnx.helper import tensor_dtype_to_np_dtype

    try:
        return tensor_dtype_to_np_dtype(elem_type).name
    except (KeyError, ValueError, TypeError):  # a type numpy has no name for (bfloat16, float8 ...)
        return f"onnx:{elem_type}"


def _check_external_data(proto: Any, directory: Path) -> None:
    base = directory.resolve()
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                target = (base / entry.value).resolve()
                if not target.is_relative_to(base):
                    raise ConfigError(f"model in {directory} points at external data outside its directory: {entry.value!r}")
