"""Typed settings: defaults here, a TOML file over them, ``INFERQ_*`` variables last.

A field ``port`` of section ``[edge]`` is overridden by ``INFERQ_EDGE_PORT``;
top-level fields by ``INFERQ_<FIELD>`` (``INFERQ_MODEL_REPOSITORY``). One
:class:`Settings` object is built by the CLI and passed down explicitly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import sys
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from inferq.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (JetPack 6 on Jetson): the same parser, from PyPI
    import tomli as tomllib

ENV_PREFIX = "INFERQ_"


def mask_url(url: str) -> str:
    """Return ``url`` with its password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


@dataclass(frozen=True)
class BrokerSettings:
    """How to reach RabbitMQ. ``amqps://`` URLs use TLS (see README).

    ``urls`` lists the nodes of a cluster: a connection goes to the first that
    answers and, when it is lost, on to the next (see broker/connection.py).
    Left empty, ``url`` alone is used. ``replicas`` (when above 0) is the
    replica count every quorum queue and stream is declared with; 0 leaves it
    to RabbitMQ (every node of the cluster when the queue is declared). Every
    process of a namespace must use the same value: RabbitMQ refuses to declare
    a queue again with a different one.
    """

    url: str = "amqp://guest:guest@127.0.0.1:5672/"
    urls: tuple[str, ...] = ()
    replicas: int = 0
    connect_timeout_s: float = 5.0
    publish_timeout_s: float = 10.0
    heartbeat_s: int = 30
    reconnect_interval_s: float = 1.0
    # Ledger writes coalesce events into one stream message up to this many bytes ...
    ledger_batch_bytes: int = 4 * 1024 * 1024
    # ... and refuse a single event over the broker's max_message_size (16 MiB on RabbitMQ 4.x, 128 MiB on 3.x).
    max_message_bytes: int = 16 * 1024 * 1024
    reconnect_max_interval_s: float = 5.0  # the backoff's ceiling once every URL has failed in a row

    def __post_init__(self) -> None:
        if self.replicas < 0:
            raise ConfigError(f"broker.replicas must be 0 (RabbitMQ decides) or more, not {self.replicas}")
        for url in self.addresses:
            if urlsplit(url).scheme not in ("amqp", "amqps"):
                raise ConfigError(f"broker URL {mask_url(url)!r} must start with amqp:// or amqps://")

    @property
    def addresses(self) -> tuple[str, ...]:
        """The URLs to try, in order: ``urls``, or ``url`` alone."""
        return self.urls or (self.url,)

    def __repr__(self) -> str:
        urls = [mask_url(u) for u in self.addresses]
        return f"BrokerSettings(urls={urls!r}, replicas={self.replicas}, connect_timeout_s={self.connect_timeout_s})"


@dataclass(frozen=True)
class EtcdSettings:
    """How to reach etcd and how long membership leases live.

    ``endpoints`` lists the members of a cluster as ``host:port``; a client
    moves to the next one when its member fails (runtime/coordination.py).
    Left empty, ``host`` and ``port`` name the one member.
    """

    host: str = "127.0.0.1"
    port: int = 2379
    endpoints: tuple[str, ...] = ()
    username: str = ""
    password: str = ""
    timeout_s: float = 5.0
    lease_ttl_s: int = 10
    ca_file: str = ""  # TLS: the CA that signed etcd's server certificate
    cert_file: str = ""  # TLS client certificate and key (etcd --client-cert-auth)
    key_file: str = ""

    def __post_init__(self) -> None:
        self.members  # noqa: B018 (parses every endpoint: a bad one is a ConfigError at load time)

    @property
    def members(self) -> tuple[tuple[str, int], ...]:
        """``(host, port)`` of every member to try, in order."""
        if not self.endpoints:
            return ((self.host, self.port),)
        return tuple(parse_endpoint(e) for e in self.endpoints)

    def __repr__(self) -> str:
        pw = "***" if self.password else ""
        where = ",".join(f"{h}:{p}" for h, p in self.members)
        return f"EtcdSettings(endpoints={where!r}, username={self.username!r}, password={pw!r})"


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """``(host, port)`` of an etcd endpoint written ``host:port`` (``[v6]:port``; an ``http://`` prefix is allowed)."""
    text = endpoint.strip()
    if text.startswith(("http://", "https://")):
        text = text.split("://", 1)[1]
    try:
        parts = urlsplit(f"//{text.rstrip('/')}")
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise ConfigError(f"etcd endpoint {endpoint!r} is not host:port ({exc})") from exc
    if not host or port is None or parts.path or parts.username:
        raise ConfigError(f"etcd endpoint {endpoint!r} must be host:port, e.g. 10.0.0.5:2379")
    return host, port


@dataclass(frozen=True)
class JobSettings:
    """Job lifetime: the ledger keeps events this long; jobs may set a shorter TTL."""

    ttl_s: float = 3600.0
    # A job whose outputs are larger fails with output_too_large; a result must also fit one ledger message
    # (broker.max_message_bytes), whichever is smaller.
    max_result_bytes: int = 64 * 1024 * 1024
    # What one pipeline stage may pass on to the next (the tensors travel in the next stage's job message):
    # a job whose intermediate tensors are larger fails with intermediate_too_large, naming the stage.
    max_intermediate_bytes: int = 8 * 1024 * 1024
    # Outputs up to this size are kept in each edge's memory; larger ones are read back from the ledger
    # stream when a client asks (edge/results.py), so a job costs an edge a few hundred bytes, not its result.
    inline_result_bytes: int = 64 * 1024
    # The ledger stream is retained by age (ttl_s) and by bytes, whichever is reached first: RabbitMQ drops
    # whole segments, oldest first, so its disk holds at most ledger_max_bytes + one segment. 0 declares
    # no such argument (streams an older inferq declared; bound them with a RabbitMQ policy instead).
    ledger_max_bytes: int = 2 * 1024 ** 3
    ledger_segment_bytes: int = 64 * 1024 * 1024
    # A worker whose results the ledger cannot take (broker away) keeps them on disk, under
    # <state_dir>/spool/<model>/<version>, up to this many bytes per model version; past it, it hands the jobs back.
    spool_max_bytes: int = 1024 ** 3

    def __post_init__(self) -> None:
        if min(self.inline_result_bytes, self.ledger_max_bytes, self.ledger_segment_bytes, self.spool_max_bytes) < 0:
            raise ConfigError("jobs.inline_result_bytes, jobs.ledger_max_bytes, jobs.ledger_segment_bytes and "
                              "jobs.spool_max_bytes must be >= 0")


MAX_AUTO_EDGE_PROCESSES = 4  # past a few, the broker and etcd, not the edge's Python, are what a machine runs out of


@dataclass(frozen=True)
class EdgeSettings:
    """The HTTP edge (and its v2 gRPC endpoint)."""

    host: str = "127.0.0.1"
    port: int = 8000
    grpc_port: int = 8001  # KServe v2 / Triton gRPC, Triton's default port; 0 turns it off
    max_body_bytes: int = 64 * 1024 * 1024
    max_jobs_in_memory: int = 100_000
    # The projection's own byte budget (see README "Limits"): job states at a fixed estimate each, plus the
    # outputs kept inline; past it inline outputs are dropped oldest first (read back on demand), then jobs.
    max_projection_bytes: int = 256 * 1024 * 1024
    result_cache_bytes: int = 64 * 1024 * 1024  # results read back from the ledger, least recently used out
    # Ledger messages the edge's tail may hold unprocessed; its memory is this many times the message size
    # (up to broker.ledger_batch_bytes, or one result's event), so it is small where results are large.
    ledger_prefetch: int = 64
    max_wait_s: float = 60.0
    sync_timeout_s: float = 60.0
    auth: bool = False
    api_keys_file: str = ""
    rate_per_s: float = 0.0  # submissions per second per tenant (0: unlimited) for keys that set none
    burst: int = 0
    # Edge processes sharing the port (SO_REUSEPORT), each with its own projection of the same ledger.
    # 0: one for `inferq edge`, one per two cores (at most MAX_AUTO_EDGE_PROCESSES) for `inferq up`.
    processes: int = 0
    events_heartbeat_s: float = 15.0  # the comment line of a job's event stream (GET /v1/jobs/{id}/events)
    agent_wheel: str = ""  # the inferq wheel served at /v1/agent/inferq.whl to installing edge nodes

    def __post_init__(self) -> None:
        if self.processes < 0:
            raise ConfigError(f"edge.processes must be 0 (automatic) or more, not {self.processes}")

    def auto_processes(self) -> int:
        """``processes``, or when 0 one per two cores, at least 1 and at most :data:`MAX_AUTO_EDGE_PROCESSES`
        (what ``inferq up`` runs).

        Not one per core: each edge process reads the whole ledger for its own projection,
        and ``inferq up`` puts the workers and the broker on the same cores. On 2 cores a
        second edge process cut mlp's jobs/s from 919 to 551 and doubled the CPU per job
        (benchmarks/results/edge-processes-run.json).
        """
        return self.processes or max(1, min((os.cpu_count() or 1) // 2, MAX_AUTO_EDGE_PROCESSES))


@dataclass(frozen=True)
class AgentSettings:
    """The edge-node agent (``inferq agent``): what it may run and where it keeps models.

    ``providers`` are the execution providers it may claim, each proven at start by
    a tiny model whose output must match the CPU's (empty: every one onnxruntime
    lists). ``sysroot`` is where device facts are read (tests point it at fixture
    trees of a Jetson). The model cache, ``<state_dir>/artifacts``, is kept under
    ``cache_gb`` by evicting the least recently used versions no worker uses.
    """

    capacity: int = 2
    cache_gb: float = 20.0
    sysroot: str = "/"
    providers: tuple[str, ...] = ()
    connect_max_s: float = 30.0  # the ceiling of the backoff between tries to reach the broker while it is away
    fetch_attempts: int = 5  # downloads of an artifact (resumed, verified) before a spawn is given up


@dataclass(frozen=True)
class MetricsSettings:
    """Prometheus ``/metrics`` of workers, autoscalers and agents (the edge serves it on its HTTP port).

    ``port``: 0 = off, -1 = any free port (what launchers give the workers they start,
    so several on one host never collide; the port is advertised in the worker's etcd
    record for ``GET /v1/metrics/targets``), else that port. ``advertise_host`` is the
    address Prometheus reaches (default: ``host``). ``refresh_s`` is how often the edge
    refreshes the broker and etcd facts it serves (a scrape never waits on either).
    ``otlp_endpoint``: where the edge sends each finished job's OpenTelemetry spans (edge/spans.py).
    """

    host: str = "127.0.0.1"
    port: int = 0
    advertise_host: str = ""
    refresh_s: float = 2.0
    otlp_endpoint: str = ""  # the edge exports finished jobs' spans here over OTLP/HTTP (needs inferq[otel]); "" = off


@dataclass(frozen=True)
class WebhookSettings:
    """Webhooks (see edge/webhooks.py): the signing secret, the SSRF exceptions and the delivery limits.

    ``secret`` is ``whsec_<base64>`` (Standard Webhooks); tenants have their own
    (``inferq tenant webhook-secret``) when auth is on. ``allow_hosts`` lists host
    names and CIDRs that may be private, loopback or link-local (tests, in-house receivers).
    """

    secret: str = ""
    allow_hosts: tuple[str, ...] = ()
    timeout_s: float = 10.0  # one delivery attempt, connect to last byte
    max_age_s: float = 86_400.0  # retries stop this long after the event
    max_body_bytes: int = 256 * 1024  # above it, a document comes without outputs
    per_host: int = 4  # deliveries at once to one host
    per_tenant: int = 8  # deliveries at once for one tenant
    prefetch: int = 64  # deliveries one sender holds
    claim_s: float = 30.0  # an edge that claimed an event and died before queueing it is replaced after this long

    def __repr__(self) -> str:
        return f"WebhookSettings(secret={'***' if self.secret else ''!r}, allow_hosts={self.allow_hosts!r})"


@dataclass(frozen=True)
class TenancySettings:
    """Tenants' and edge nodes' RabbitMQ users: the management API that makes them, as an administrator.

    ``node_users``: what a join (``POST /v1/agent/join``) gives a node to reach the broker.
    ``auto``: a broker user of its own (``<ns>.node.<node>``, deleted by ``inferq agent revoke``),
    or, when ``management_url`` is empty or cannot be reached, the shared credentials of
    ``broker.url`` with a warning; ``require``: its own user or no join (503); ``off``: shared.
    ``service_user`` is the cluster's service user as an edge node knows it (its own
    ``broker.url`` logs in as its node user); the join writes it.
    """

    management_url: str = "http://guest:guest@127.0.0.1:15672/"
    node_users: str = "auto"
    service_user: str = ""

    def __post_init__(self) -> None:
        if self.node_users not in ("auto", "require", "off"):
            raise ConfigError(f"tenancy.node_users must be auto, require or off, not {self.node_users!r}")

    def __repr__(self) -> str:
        return f"TenancySettings(management_url={mask_url(self.management_url)!r})"


@dataclass(frozen=True)
class RegistrySettings:
    """The model registry: where artifacts are stored and where workers without the files fetch them.

    ``store`` is "" (the model repository directory, content-addressed under ``.blobs``)
    or ``s3://bucket/prefix`` (``pip install 'inferq[s3]'``; credentials from the usual
    AWS variables, ``s3_endpoint_url`` for MinIO and the like). ``artifacts_url`` is the
    edge workers fetch from when a version's files are not on their disk (default: the
    edge of these settings), with ``api_key`` (role ``node``) when the edge has auth on.
    """

    store: str = ""
    s3_endpoint_url: str = ""
    artifacts_url: str = ""
    api_key: str = ""
    max_artifact_bytes: int = 16 * 1024 ** 3
    fetch_timeout_s: float = 60.0  # connect and each read of an artifact download

    def __repr__(self) -> str:
        key = "***" if self.api_key else ""
        return f"RegistrySettings(store={self.store!r}, artifacts_url={self.artifacts_url!r}, api_key={key!r})"


@dataclass(frozen=True)
class ScalingPolicy:
    """Per-model scaling settings: defaults here, model config ``[scaling]``, then ``/<ns>/policies/<model>`` in etcd.

    An override is untrusted input (an operator's JSON): :meth:`merged` refuses
    unknown fields, non-numbers, NaN, infinities and negative windows with a
    ConfigError, so the caller keeps the previous policy instead.
    """

    min_workers: int = 0
    max_workers: int = 4
    target_backlog_per_worker: int = 64
    scale_up_stabilization_s: float = 0.0
    scale_down_stabilization_s: float = 30.0
    idle_before_zero_s: float = 60.0

    def merged(self, overrides: Mapping[str, typing.Any] | None) -> ScalingPolicy:
        """This policy with ``overrides`` applied; anything invalid raises ConfigError."""
        if not overrides:
            return self
        if not isinstance(overrides, Mapping):
            raise ConfigError(f"a scaling policy must be a map, got {type(overrides).__name__}")
        names = {f.name for f in dataclasses.fields(ScalingPolicy)}
        unknown = set(overrides) - names
        if unknown:
            raise ConfigError(f"unknown scaling field(s) {sorted(unknown)}")
        hints = typing.get_type_hints(ScalingPolicy)
        values = {k: _policy_number(k, v, hints[k]) for k, v in overrides.items()}
        return dataclasses.replace(self, **values).checked()

    def checked(self) -> ScalingPolicy:
        """Self, if its values make sense together; else ConfigError."""
        if not 0 <= self.min_workers <= self.max_workers or self.target_backlog_per_worker < 1:
            raise ConfigError(f"scaling policy needs 0 <= min_workers <= max_workers and target >= 1: {self}")
        for name in ("scale_up_stabilization_s", "scale_down_stabilization_s", "idle_before_zero_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"scaling policy {name} must be a finite number >= 0, got {value!r}")
        return self

    def policy(self) -> ScalingPolicy:
        """Just the policy fields (a subclass carries more)."""
        names = [f.name for f in dataclasses.fields(ScalingPolicy)]
        return ScalingPolicy(**{n: getattr(self, n) for n in names}).checked()

    def to_json(self) -> str:
        """The override document form."""
        return json.dumps({f.name: getattr(self, f.name) for f in dataclasses.fields(ScalingPolicy)})


def _policy_number(name: str, value: typing.Any, hint: type) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"scaling field {name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"scaling field {name} must be finite, got {value!r}")
    if hint is int:
        if value != int(value):
            raise ConfigError(f"scaling field {name} must be a whole number, got {value!r}")
        return int(value)
    return float(value)


@dataclass(frozen=True)
class AutoscalerSettings(ScalingPolicy):
    """The autoscaler's loop, plus the default scaling policy of every model (the inherited fields)."""

    interval_s: float = 0.5  # a tick is a few etcd reads and one passive declare per model version
    # local: child processes; agent: edge-node agents; kubernetes: the replicas of each model's Deployment;
    # none: decisions only (for KEDA, which reads them at GET /v1/models/{model}/scaling).
    launcher: str = "local"
    models: str = ""  # comma-separated model names to scale; empty: every model
    kube_deployment: str = "inferq-worker-{model}"  # the kubernetes launcher's Deployment of a model ({model}, {version})
    kube_service_account: str = "/var/run/secrets/kubernetes.io/serviceaccount"  # token, ca.crt, namespace


@dataclass(frozen=True)
class Settings:
    """Everything a process needs, passed explicitly."""

    namespace: str = "inferq"
    model_repository: Path = Path("models")
    state_dir: Path = Path(".state")
    node: str = field(default_factory=socket.gethostname)
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    etcd: EtcdSettings = field(default_factory=EtcdSettings)
    jobs: JobSettings = field(default_factory=JobSettings)
    edge: EdgeSettings = field(default_factory=EdgeSettings)
    autoscaler: AutoscalerSettings = field(default_factory=AutoscalerSettings)
    tenancy: TenancySettings = field(default_factory=TenancySettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    registry: RegistrySettings = field(default_factory=RegistrySettings)
    agent: AgentSettings = field(default_factory=AgentSettings)
    webhooks: WebhookSettings = field(default_factory=WebhookSettings)

    @property
    def auth_enabled(self) -> bool:
        """Tenants are enforced: API keys at the edges and broker identities at the workers (one switch, ``edge.auth``)."""
        return self.edge.auth

    @classmethod
    def load(cls, path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
        """Build settings from defaults, then the TOML file at ``path``, then ``env``."""
        env = os.environ if env is None else env
        data: dict[str, typing.Any] = {}
        path = path or env.get(ENV_PREFIX + "CONFIG")
        if path:
            try:
                data = tomllib.loads(Path(path).read_text())
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise ConfigError(f"cannot read config {path}: {exc}") from exc
        return _build(cls, data, env, ENV_PREFIX)

    def to_env(self) -> dict[str, str]:
        """The ``INFERQ_*`` variables that make a child load exactly these settings: the inverse of :meth:`load`.

        Everything travels, etcd TLS and credentials included, so a worker that
        the autoscaler or an agent starts talks to the same services as its parent.
        """
        return _to_env(self, ENV_PREFIX)

    def resolved(self) -> Settings:
        """These settings with absolute paths, for a child that may run elsewhere."""
        return dataclasses.replace(self, model_repository=self.model_repository.resolve(), state_dir=self.state_dir.resolve())


def _build(cls: type, data: Mapping[str, typing.Any], env: Mapping[str, str], prefix: str) -> typing.Any:
    hints = typing.get_type_hints(cls)
    unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ConfigError(f"unknown setting(s) {sorted(unknown)} for {cls.__name__}")
    kwargs: dict[str, typing.Any] = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        env_name = prefix + f.name.upper()
        if dataclasses.is_dataclass(hint):
            kwargs[f.name] = _build(hint, data.get(f.name, {}), env, env_name + "_")
        elif env_name in env:
            kwargs[f.name] = _coerce(hint, env[env_name], env_name)
        elif f.name in data:
            kwargs[f.name] = _coerce(hint, data[f.name], f.name)
    return cls(**kwargs)


def _to_env(obj: typing.Any, prefix: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for f in dataclasses.fields(obj):
        value, name = getattr(obj, f.name), prefix + f.name.upper()
        if dataclasses.is_dataclass(value):
            env.update(_to_env(value, name + "_"))
        elif isinstance(value, bool):
            env[name] = "true" if value else "false"
        elif isinstance(value, tuple):
            if any("," in str(v) for v in value):  # the list travels comma-separated
                raise ConfigError(f"{name}: an item holds a comma; percent-encode it (%2C) in the URL")
            env[name] = ",".join(str(v) for v in value)
        elif isinstance(value, float):
            env[name] = repr(value)
        else:
            env[name] = str(value)
    return env


def _coerce(hint: typing.Any, value: typing.Any, name: str) -> typing.Any:
    try:
        if typing.get_origin(hint) is tuple:
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(str(v).strip() for v in items if str(v).strip())
        if hint is bool and isinstance(value, str):
            return value.strip().lower() in {"1", "true", "yes", "on"}
        if hint is bool and not isinstance(value, bool):
            raise TypeError(f"{value!r} is not a boolean")
        return hint(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"setting {name}={value!r} is not a valid {getattr(hint, '__name__', hint)}") from exc
