"""Launchers: how the autoscaler gets a worker started somewhere.

Every launcher starts workers; stopping one is always the same drain command
sent to the worker itself over the control exchange, wherever it runs.

* :class:`LocalLauncher` spawns ``inferq worker`` processes on this host.
* :class:`AgentLauncher` asks an edge-node agent (``inferq agent``) to spawn
  one, on the node :func:`~inferq.runtime.variants.place` picks: free capacity,
  the model's required providers and ``require`` selector, then variant match,
  cache warmth and free room.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from inferq.broker.connection import BrokerConnection
from inferq.broker.control import agent_key, send, worker_key
from inferq.broker.topology import Topology
from inferq.runtime.catalog import read_model
from inferq.runtime.coordination import get_records, keys
from inferq.runtime.records import NodeRecord
from inferq.errors import NoCapacity
from inferq.runtime.device import read_facts
from inferq.runtime.process import ChildProcess
from inferq.runtime.variants import mismatch, place
from inferq.runtime.session import PROVIDER_NAMES
from inferq.settings import Settings

log = logging.getLogger("inferq.launcher")


@dataclass(frozen=True)
class Exit:
    """A worker this launcher started that has exited."""

    model: str
    version: str
    returncode: int
    last_line: str


class Launcher(Protocol):
    """Starts workers; :meth:`aclose` stops what it started itself."""

    async def spawn(self, model: str, version: str, requires: list[str], require: Mapping[str, str] | None = None) -> str: ...

    def reap(self) -> list[Exit]: ...

    async def aclose(self) -> None: ...


async def drain(connection: BrokerConnection, topology: Topology, worker_id: str) -> None:
    """Ask one worker to drain: finish in-flight jobs, hand back the rest, leave."""
    await send(connection, topology.control, worker_key(worker_id), {"command": "drain"})


class LocalLauncher:
    """Spawns worker processes on this host; reaps them, and drains them on close."""

    def __init__(self, settings: Settings, log_dir: Path) -> None:
        self._settings = settings
        self._log_dir = log_dir
        self._children: list[tuple[str, str, Path, ChildProcess]] = []

    @property
    def running(self) -> int:
        """Workers started here that have not exited."""
        return sum(1 for *_, c in self._children if c.returncode is None)

    def reap(self) -> list[Exit]:
        """Workers that exited since the last call, with their exit status and last log line."""
        gone = [entry for entry in self._children if entry[3].returncode is not None]
        self._children = [entry for entry in self._children if entry[3].returncode is None]
        return [Exit(model, version, child.returncode, _last_line(log_path)) for model, version, log_path, child in gone]

    async def spawn(self, model: str, version: str, requires: list[str], require: Mapping[str, str] | None = None) -> str:
        missing = set(requires) - set(node_providers())
        if missing:
            raise NoCapacity(f"this host's onnxruntime lacks {sorted(missing)} required by {model}")
        if require:  # a device selector: this host's facts must match it, as an agent's must
            facts = await asyncio.to_thread(read_facts, self._settings.agent.sysroot)
            why = mismatch(require, NodeRecord("localhost", tuple(node_providers()), facts=facts))
            if why:
                raise NoCapacity(f"this host does not meet the require of {model}: {why}")
        suffix = worker_suffix()
        log_path = worker_log_path(self._log_dir, model, version, suffix)
        child = await ChildProcess.start(f"worker {model}:{version}", worker_args(model, version, suffix),
                                         worker_env(self._settings), log_path)
        self._children.append((model, version, log_path, child))
        return f"pid:{child.pid}"

    async def aclose(self) -> None:
        for *_, child in self._children:
            await child.aclose()
        self._children.clear()


def node_providers() -> list[str]:
    """Short names of the execution providers this host's onnxruntime offers."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    return [short for short, name in PROVIDER_NAMES.items() if name in available]


def worker_suffix() -> str:
    """The random tail of a new worker's id, picked by its starter so that the log file can carry it too."""
    return uuid.uuid4().hex[:6]


def worker_args(model: str, version: str, suffix: str | None = None, variant: str = "") -> list[str]:
    """The ``inferq`` arguments that run a worker for ``model:version`` (its id ending in ``-<suffix>``, serving ``variant``)."""
    args = ["worker", "--model", model, "--version", version] + ["--variant", variant] * bool(variant)
    return [*args, "--id-suffix", suffix] if suffix else args


def worker_log_path(log_dir: Path, model: str, version: str, suffix: str) -> Path:
    """The log file of the worker whose id ends in ``-<suffix>``: ``worker-<model>-<version>-<suffix>.log``.

    The worker id, ``<node>-<model>-<version>-<pid>-<suffix>``, is known only once the
    process runs; the suffix is what id and file name share (the directory is made if needed).
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    return log_dir / f"worker-{model}-{version}-{suffix}.log"


def worker_env(settings: Settings) -> dict[str, str]:
    """Environment that makes a spawned worker load the same settings: namespace, repository, services, TLS."""
    env = settings.resolved().to_env()
    if settings.metrics.port:  # each child on a port of its own, advertised in its etcd record
        env["INFERQ_METRICS_PORT"] = "-1"
    return env


class AgentLauncher:
    """Sends spawn commands to edge-node agents, placing each worker on a node that fits."""

    def __init__(self, settings: Settings, connection: BrokerConnection, etcd: Any,
                 fence: Callable[[], int | None] = lambda: None) -> None:
        self._settings = settings
        self._connection = connection
        self._etcd = etcd
        self._fence = fence  # the leader's token, sent with each command (agents refuse an older one)
        self._topology = Topology(settings.namespace, settings.broker.replicas)

    async def spawn(self, model: str, version: str, requires: list[str], require: Mapping[str, str] | None = None) -> str:
        """Send a spawn command to the node :func:`~inferq.runtime.variants.place` picks (the model's ``require`` from its record)."""
        timeout = self._settings.etcd.timeout_s
        nodes = await get_records(self._etcd, keys(self._settings.namespace).nodes, NodeRecord.from_json, timeout)
        record, _ = await read_model(self._etcd, self._settings.namespace, model, timeout)
        placement = place(nodes, record, version, requires)
        command = {"command": "spawn", "model": model, "version": version, "request_id": uuid.uuid4().hex,
                   "fence": self._fence()}
        await send(self._connection, self._topology.control, agent_key(placement.node), command)
        log.info("asked agent %s to spawn %s:%s (%s)", placement.node, model, version,
                 f"variant {placement.variant}" if placement.variant else "default file")
        return f"agent:{placement.node}"

    def reap(self) -> list[Exit]:
        """Agents supervise their own workers (and report restarts in their node records)."""
        return []

    async def aclose(self) -> None:
        """Workers on agents belong to the agents; nothing to stop here."""


def _last_line(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - 4096))
            lines = [line for line in f.read().decode(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1][-300:] if lines else ""


