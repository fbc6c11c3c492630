"""Typed records for everything that crosses a process boundary through etcd.

Each record is a frozen dataclass with ``to_json``/``from_json``. ``from_json``
raises :class:`~inferq.errors.CodecError` on a malformed document (not a
``KeyError`` three modules away) and ignores fields it does not know, so a
newer process can add fields during a rolling upgrade::

    /<ns>/workers/<id>                    WorkerRecord  (lease-backed, written by the worker)
    /<ns>/nodes/<node>                    NodeRecord    (lease-backed, written by the agent)
    /<ns>/models/<model>                  ModelRecord   (the registry: versions, aliases, traffic, shadow)
    /<ns>/history/<model>/<seq>           HistoryEntry  (appended in the same transaction as each change)
    /<ns>/removals/<model>/<version>      RemovalRecord (a removed version whose queues are being retired)
    /<ns>/policies/<model>                ScalingPolicy overrides (inferq.settings)
    /<ns>/autoscaler/decisions/<m>.<v>    Decision      (written by the acting autoscaler)
    /<ns>/brokerusers/<user>              BrokerUserRecord (written by ``inferq tenant create --amqp``)
    /<ns>/meters/<tenant>                 MeterRecord   (the tenant's AMQP token bucket, shared by workers)
"""

from __future__ import annotations

import dataclasses
import enum
import json
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from inferq.errors import CodecError
from inferq.runtime.device import DeviceFacts
from inferq.runtime.repository import ModelVersion, TensorSpec

R = TypeVar("R")


def load_json(raw: bytes | str, what: str) -> dict[str, Any]:
    """A JSON object, or CodecError."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CodecError(f"{what} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise CodecError(f"{what} must be a JSON object, got {type(doc).__name__}")
    return doc


def build(cls: type[R], doc: Mapping[str, Any], what: str, **nested: Callable[[Any], Any]) -> R:
    """``cls`` from the known fields of ``doc``, scalars type-checked; ``nested`` converts fields that are records."""
    hints = typing.get_type_hints(cls)
    values = {k: v for k, v in doc.items() if k in hints and not k.startswith("_")}
    try:
        for name, value in values.items():
            if name in nested:
                values[name] = nested[name](value)
            else:
                values[name] = _scalar(name, value, hints[name])
        return cls(**values)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise CodecError(f"malformed {what}: {exc}") from exc


def _scalar(name: str, value: Any, hint: Any) -> Any:
    expected = {int: (int,), float: (int, float), str: (str,), bool: (bool,)}.get(hint)
    if expected is None:
        return value
    if not isinstance(value, expected) or (hint is not bool and isinstance(value, bool)):
        raise TypeError(f"{name} must be {hint.__name__}, got {type(value).__name__}")
    return float(value) if hint is float else value


class WorkerState(str, enum.Enum):
    """A worker's life: warming (loading, first inference), ready (consuming), draining (leaving)."""

    WARMING = "warming"
    READY = "ready"
    DRAINING = "draining"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class WorkerStats:
    """A worker's own counters, as published in its record."""

    jobs: int = 0
    failed: int = 0
    batches: int = 0
    max_batch: int = 0
    mean_batch: float = 0.0
    inflight: int = 0

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> WorkerStats:
        return build(cls, doc, "worker stats")


@dataclass(frozen=True)
class WorkerRecord:
    """One worker's membership record."""

    worker_id: str
    model: str
    version: str
    node: str = ""
    pid: int = 0
    providers: tuple[str, ...] = ()
    state: WorkerState = WorkerState.READY
    started_at: float = 0.0
    queue: str = ""
    stats: WorkerStats = field(default_factory=WorkerStats)
    warmed: bool = False  # its warm-up inference (a sample built from the signature) succeeded
    warmup_error: str = ""  # why the warm-up inference failed, if it did
    metrics: str = ""  # host:port of its /metrics ("" when off): GET /v1/metrics/targets lists it
    variant: str = ""  # the device variant of its version it runs ("": the default model.onnx)
    # When its warming began (unix seconds): loading the model, building a TensorRT engine, the warm-up run.
    # 0 when not warming, and in records of workers older than this field.
    warming_since: float = 0.0

    def to_json(self) -> str:
        doc = dataclasses.asdict(self)
        doc["state"] = self.state.value
        return json.dumps(doc)

    def warming_s(self, now: float) -> float | None:
        """How long it has been warming at ``now`` (unix seconds); None if it is not warming."""
        if self.state is not WorkerState.WARMING:
            return None
        return round(max(0.0, now - self.warming_since), 1) if self.warming_since else None

    @property
    def coming(self) -> bool:
        """Warming: not serving yet, but started and on its way (the autoscaler counts it as there)."""
        return self.state is WorkerState.WARMING

    @classmethod
    def from_json(cls, raw: bytes | str) -> WorkerRecord:
        return build(cls, load_json(raw, "worker record"), "worker record",
                     providers=tuple, state=WorkerState, stats=WorkerStats.from_dict)

    @property
    def serving(self) -> bool:
        """Ready and consuming (not warming, not draining)."""
        return self.state is WorkerState.READY

    @property
    def healthy(self) -> bool:
        """Serving, and its warm-up inference succeeded: what lets a version's traffic gate open."""
        return self.serving and self.warmed


@dataclass(frozen=True)
class NodeRecord:
    """An edge-node agent: what it offers and how busy it is."""

    node: str
    providers: tuple[str, ...] = ()
    capacity: int = 1
    workers: int = 0
    pid: int = 0
    started_at: float = 0.0
    restarts: int = 0  # worker restarts after a crash since the agent started
    last_exit: str = ""  # the last worker exit, e.g. "worker mlp:1 #2: killed by SIGKILL"
    facts: DeviceFacts = field(default_factory=DeviceFacts)  # what the node is: Jetson L4T/SoC/arch, or CPU
    cached: tuple[str, ...] = ()  # SHA-256 of each version in its model cache (placement prefers warm nodes)
    disconnected_since: float = 0.0  # when its last loss of the broker or etcd began (0: none yet)
    reconnected_at: float = 0.0  # when that outage ended
    metrics: str = ""  # host:port of the agent's /metrics ("" when off): GET /v1/metrics/targets lists it

    @property
    def free(self) -> int:
        return self.capacity - self.workers

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str) -> NodeRecord:
        return build(cls, load_json(raw, "node record"), "node record", providers=tuple, cached=tuple,
                     facts=DeviceFacts.from_dict)


@dataclass(frozen=True)
class FileRecord:
    """One file of a version's artifact besides ``model.onnx`` (ONNX external data), by content."""

    name: str
    sha256: str
    size: int

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> FileRecord:
        return build(cls, doc, "artifact file")


@dataclass(frozen=True)
class VariantRecord:
    """A device variant of a version (an INT8 or FP16 file for a Jetson): its selector and content.

    ``sha256``/``size`` are those of its ONNX file, served as ``model.onnx`` of the variant;
    ``files`` its external data. Its signature is the version's (refused at push otherwise).
    """

    name: str
    selector: Mapping[str, str]
    sha256: str
    size: int
    file: str = ""  # its name in the version directory (model-int8.onnx)
    files: tuple[FileRecord, ...] = ()

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> VariantRecord:
        files = lambda items: tuple(FileRecord.from_dict(d) for d in items)  # noqa: E731
        selector = lambda d: {str(k): str(v) for k, v in dict(d).items()}  # noqa: E731
        return build(cls, doc, "model variant", selector=selector, files=files)


@dataclass(frozen=True)
class VersionRecord:
    """One immutable version: its signature and the content of its artifact.

    ``sha256``/``size`` are those of ``model.onnx``; ``files`` are its external data
    files. A record written before the registry has no ``sha256``; the next sync fills it in.
    """

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    sha256: str = ""
    size: int = 0
    opset: int = 0
    created_at: float = 0.0
    created_by: str = ""
    files: tuple[FileRecord, ...] = ()
    variants: tuple[VariantRecord, ...] = ()  # device variants, in the config's declaration order

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> VersionRecord:
        specs = lambda items: tuple(TensorSpec.from_dict(d) for d in items)  # noqa: E731
        files = lambda items: tuple(FileRecord.from_dict(d) for d in items)  # noqa: E731
        variants = lambda items: tuple(VariantRecord.from_dict(d) for d in items)  # noqa: E731
        return build(cls, doc, "model version", inputs=specs, outputs=specs, files=files, variants=variants)

    def to_dict(self) -> dict[str, Any]:
        doc = dataclasses.asdict(self)
        doc["inputs"] = [s.to_dict() for s in self.inputs]
        doc["outputs"] = [s.to_dict() for s in self.outputs]
        doc["variants"] = [dict(dataclasses.asdict(v), selector=dict(v.selector)) for v in self.variants]
        return doc

    def variant(self, name: str) -> VariantRecord:
        """The variant called ``name``; NotFound naming the ones there are."""
        from inferq.errors import NotFound

        for variant in self.variants:
            if variant.name == name:
                return variant
        raise NotFound(f"no variant {name!r} (has {[v.name for v in self.variants] or 'none'})")

    def same_signature(self, other: VersionRecord) -> bool:
        """Whether jobs for one version fit the other: the same inputs and outputs (names, dtypes, shapes)."""
        return (self.inputs, self.outputs) == (other.inputs, other.outputs)

    def same_content(self, other: VersionRecord) -> bool:
        """Whether both are the same bytes (what makes a repeated push a no-op)."""
        return (self.sha256, self.size, self.files, self.variants) == (other.sha256, other.size, other.files, other.variants)


@dataclass(frozen=True)
class RollbackRule:
    """When to take a canary's traffic away: its failure rate or p95 too far above stable's over a window.

    ``error_rate`` and ``p95_ms`` are the largest excess over stable's that is tolerated
    (``p95_ms`` 0 = latency not checked); nothing is decided before ``min_jobs`` of the
    canary's jobs finished within ``window_s``.
    """

    error_rate: float = 0.05
    p95_ms: float = 0.0
    window_s: float = 60.0
    min_jobs: int = 50

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> RollbackRule:
        return build(cls, doc, "auto-rollback rule")


@dataclass(frozen=True)
class AliasRecord:
    """A mutable name for a version.

    ``previous`` is where ``rollback`` goes. ``held_at``: after a move, unpinned traffic
    stays on that version until ``version`` has a warmed-up worker (a rollback is never held).
    """

    version: str
    previous: str = ""
    held_at: str = ""
    moved_at: float = 0.0
    moved_by: str = ""
    auto_rollback: RollbackRule | None = None
    auto_rollbacks: int = 0  # times the rule took this alias's traffic away
    last_auto_rollback: str = ""  # why, the last time

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> AliasRecord:
        rule = lambda d: None if d is None else RollbackRule.from_dict(d)  # noqa: E731
        return build(cls, doc, "alias", auto_rollback=rule)


@dataclass(frozen=True)
class ShadowRecord:
    """Mirror ``percent`` of a model's unpinned jobs to ``version``; shadow results are recorded, never returned."""

    version: str
    percent: float

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> ShadowRecord:
        return build(cls, doc, "shadow")


@dataclass(frozen=True)
class StageRecord:
    """One stage of a pipeline: a model version, and where each of its inputs comes from.

    ``inputs`` maps the stage model's input names to tensor names: the pipeline's
    inputs or an earlier stage's outputs (a split keeps names, a chain of different
    models renames). ``outputs`` are the stage model's outputs that go on.
    """

    model: str
    version: str
    inputs: Mapping[str, str]
    outputs: tuple[str, ...]

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> StageRecord:
        return build(cls, doc, "pipeline stage", inputs=lambda d: {str(k): str(v) for k, v in dict(d).items()}, outputs=tuple)


MODEL, PIPELINE = "model", "pipeline"


@dataclass(frozen=True)
class ModelRecord:
    """A model in the registry: versions, aliases, traffic split, shadow, and its config (no files).

    ``default_version`` is where an unpinned job goes without a traffic split: the
    ``stable`` alias, else the highest version ("" once every version is removed).
    ``traffic`` maps aliases to integer percents summing to 100 (empty: no split).
    ``config`` is the model's ``config.toml`` as a map (a worker without the
    repository builds its ModelConfig from it).
    """

    name: str
    default_version: str
    versions: Mapping[str, VersionRecord]
    max_batch_size: int = 32
    max_queue_delay_ms: float = 2.0
    allow_nan: bool = True
    providers: tuple[str, ...] = ()
    require_providers: tuple[str, ...] = ()
    require: Mapping[str, str] = field(default_factory=dict)  # a device selector every node running it must match
    scaling: Mapping[str, Any] = field(default_factory=dict)
    aliases: Mapping[str, AliasRecord] = field(default_factory=dict)
    traffic: Mapping[str, int] = field(default_factory=dict)
    shadow: ShadowRecord | None = None
    config: Mapping[str, Any] = field(default_factory=dict)
    removed: tuple[str, ...] = ()  # versions removed once: their numbers are never used again
    kind: str = MODEL  # "pipeline": no artifact of its own; its jobs run through ``stages`` in order
    stages: tuple[StageRecord, ...] = ()

    @property
    def pipeline(self) -> bool:
        """Whether this is a pipeline record (its jobs flow through its stages; no worker serves it)."""
        return self.kind == PIPELINE

    def signature(self, version: str) -> ModelVersion:
        """A servable signature of ``version`` (no file path: an edge has no model files)."""
        v = self.versions[version]
        return ModelVersion(self.name, version, path=None, inputs=v.inputs, outputs=v.outputs)  # type: ignore[arg-type]

    @property
    def routed(self) -> bool:
        """Whether unpinned jobs need routing beyond "the default version": a traffic split or a shadow."""
        return bool(self.traffic) or self.shadow is not None

    def to_json(self) -> str:
        doc = dataclasses.asdict(self)
        doc["versions"] = {k: v.to_dict() for k, v in self.versions.items()}
        doc["aliases"] = {k: dataclasses.asdict(v) for k, v in self.aliases.items()}
        doc["stages"] = [dict(dataclasses.asdict(st), inputs=dict(st.inputs)) for st in self.stages]
        return json.dumps(doc)

    @classmethod
    def from_json(cls, raw: bytes | str) -> ModelRecord:
        def versions(doc: Any) -> dict[str, VersionRecord]:
            return {str(k): VersionRecord.from_dict(v) for k, v in dict(doc).items()}

        def aliases(doc: Any) -> dict[str, AliasRecord]:
            return {str(k): AliasRecord.from_dict(v) for k, v in dict(doc).items()}

        def traffic(doc: Any) -> dict[str, int]:
            return {str(k): _scalar("traffic weight", v, int) for k, v in dict(doc).items()}

        shadow = lambda d: None if d is None else ShadowRecord.from_dict(d)  # noqa: E731
        record = build(cls, load_json(raw, "model record"), "model record", versions=versions, aliases=aliases,
                       traffic=traffic, shadow=shadow, providers=tuple, require_providers=tuple, require=dict, scaling=dict, config=dict,
                       removed=tuple, stages=lambda items: tuple(StageRecord.from_dict(d) for d in items))
        if record.kind not in (MODEL, PIPELINE):
            raise CodecError(f"model record {record.name!r}: unknown kind {record.kind!r}")
        if record.versions and record.default_version not in record.versions:
            raise CodecError(f"model record {record.name!r}: default version {record.default_version!r} is not among its versions")
        return record


class HistoryAction(str, enum.Enum):
    """What a registry change did."""

    PUSH = "push"
    ALIAS = "alias"
    ROLLBACK = "rollback"
    UNALIAS = "unalias"
    TRAFFIC = "traffic"
    SHADOW = "shadow"
    REMOVE = "remove"
    RELEASE = "release"  # a held alias move took effect: its version became ready
    AUTO_ROLLBACK = "auto_rollback"
    RETIRED = "retired"  # a removed version's queues are gone and its queued jobs failed

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class HistoryEntry:
    """One registry change: who, when, what moved from where to where, why, and the inputs of a decision."""

    model: str
    action: HistoryAction
    at: float
    who: str
    target: str = ""  # the alias, version or "traffic"/"shadow" the change applies to
    from_value: str = ""
    to_value: str = ""
    why: str = ""
    inputs: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        doc = dataclasses.asdict(self)
        doc["action"] = self.action.value
        return json.dumps(doc)

    @classmethod
    def from_json(cls, raw: bytes | str) -> HistoryEntry:
        return build(cls, load_json(raw, "history entry"), "history entry", action=HistoryAction, inputs=dict)


@dataclass(frozen=True)
class RemovalRecord:
    """A removed version whose queued jobs are still to be failed (``version_removed``) and its queues deleted."""

    model: str
    version: str
    requested_at: float
    by: str = ""
    reason: str = ""
    model_removed: bool = False  # the whole model went: its router queue goes too

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str) -> RemovalRecord:
        return build(cls, load_json(raw, "removal record"), "removal record")


@dataclass(frozen=True)
class Decision:
    """One scaling recommendation with the inputs that produced it."""

    model: str
    version: str
    backlog: int
    current: int
    desired: int
    reason: str
    consumers: int = 0  # consumers on the queue, as RabbitMQ counts them (a cross-check of membership)
    leader: str = ""
    at: float = 0.0

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str) -> Decision:
        return build(cls, load_json(raw, "scaling decision"), "scaling decision")


@dataclass(frozen=True)
class BrokerUserRecord:
    """A tenant's RabbitMQ user: the tenant its AMQP jobs belong to, and the rate they are metered at."""

    user: str
    tenant: str
    rate_per_s: float = 0.0  # 0: not metered
    burst: int = 0
    created_at: float = 0.0

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str) -> BrokerUserRecord:
        return build(cls, load_json(raw, "broker user record"), "broker user record")


@dataclass(frozen=True)
class MeterRecord:
    """A tenant's token bucket for AMQP jobs: ``tokens`` left at unix time ``at``."""

    tokens: float
    at: float

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str) -> MeterRecord:
        return build(cls, load_json(raw, "meter record"), "meter record")
