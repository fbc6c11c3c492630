"""Typed settings: defaults here, a TOML file over them, ``INFERQ_*`` variables last.

A field ``port`` of section ``[edge]`` is overridden by ``INFERQ_EDGE_PORT``;
top-level fields by ``INFERQ_<FIELD>`` (``INFERQ_MODEL_REPOSITORY``). One
:class:`Settings` object is built by the CLI and passed down explicitly.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from runtime.errors import ConfigError

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
    """How to reach RabbitMQ. ``amqps://`` URLs use TLS (see README)."""

    url: str = "amqp://guest:guest@127.0.0.1:5672/"
    connect_timeout_s: float = 5.0
    publish_timeout_s: float = 10.0
    heartbeat_s: int = 30
    reconnect_interval_s: float = 1.0

    def __repr__(self) -> str:
        return f"BrokerSettings(url={mask_url(self.url)!r}, connect_timeout_s={self.connect_timeout_s})"


@dataclass(frozen=True)
class EtcdSettings:
    """How to reach etcd and how long membership leases live."""

    host: str = "127.0.0.1"
    port: int = 2379
    username: str = ""
    password: str = ""
    timeout_s: float = 5.0
    lease_ttl_s: int = 10
    ca_file: str = ""  # TLS: the CA that signed etcd's server certificate
    cert_file: str = ""  # TLS client certificate and key (etcd --client-cert-auth)
    key_file: str = ""

    def __repr__(self) -> str:
        pw = "***" if self.password else ""
        return f"EtcdSettings(host={self.host!r}, port={self.port}, username={self.username!r}, password={pw!r})"


@dataclass(frozen=True)
class JobSettings:
    """Job lifetime: the ledger keeps events this long; jobs may set a shorter TTL."""

    ttl_s: float = 3600.0


@dataclass(frozen=True)
class EdgeSettings:
    """The HTTP edge."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = 64 * 1024 * 1024
    max_jobs_in_memory: int = 100_000
    max_wait_s: float = 60.0
    sync_timeout_s: float = 60.0
    auth: bool = False
    api_keys_file: str = ""
    rate_per_s: float = 0.0  # submissions per second per tenant (0: unlimited) for keys that set none
    burst: int = 0


@dataclass(frozen=True)
class AutoscalerSettings:
    """The autoscaler's loop and the default scaling policy of every model."""

    interval_s: float = 0.5  # a tick is a few etcd reads and one passive declare per model version
    launcher: str = "local"
    models: str = ""  # comma-separated model names to scale; empty: every model
    min_workers: int = 0
    max_workers: int = 4
    target_backlog_per_worker: int = 64
    scale_up_stabilization_s: float = 0.0
    scale_down_stabilization_s: float = 30.0
    idle_before_zero_s: float = 60.0

    def policy(self) -> typing.Any:
        """The default :class:`~actors.policy.ScalingPolicy`."""
        from actors.policy import ScalingPolicy

        names = {f.name for f in dataclasses.fields(ScalingPolicy)}
        return ScalingPolicy(**{k: v for k, v in dataclasses.asdict(self).items() if k in names}).checked()


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


def _coerce(hint: type, value: typing.Any, name: str) -> typing.Any:
    try:
        if hint is bool and isinstance(value, str):
            return value.strip().lower() in {"1", "true", "yes", "on"}
        return hint(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"setting {name}={value!r} is not a valid {hint.__name__}") from exc
