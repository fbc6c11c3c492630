"""Launchers: how the autoscaler gets a worker started somewhere.

Every launcher starts workers; stopping one is always the same drain command
sent to the worker itself over the control exchange, wherever it runs.

* :class:`LocalLauncher` spawns ``inferq worker`` processes on this host.
* :class:`AgentLauncher` asks an edge-node agent (``inferq agent``) to spawn
  one, choosing a node whose providers cover what the model requires.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Any, Protocol

from broker.connection import BrokerConnection
from broker.control import agent_key, send, worker_key
from broker.topology import Topology
from runtime.coordination import get_json_prefix, keys
from runtime.errors import InferqError
from runtime.process import ChildProcess
from runtime.session import PROVIDER_NAMES
from runtime.settings import Settings

log = logging.getLogger("inferq.launcher")


class NoCapacity(InferqError):
    code = "no_capacity"


class Launcher(Protocol):
    """Starts workers; :meth:`aclose` stops what it started itself."""

    async def spawn(self, model: str, version: str, requires: list[str]) -> str: ...

    async def aclose(self) -> None: ...


async def drain(connection: BrokerConnection, topology: Topology, worker_id: str) -> None:
    """Ask one worker to drain: finish in-flight jobs, hand back the rest, leave."""
    await send(connection, topology.control, worker_key(worker_id), {"command": "drain"})


class LocalLauncher:
    """Spawns worker processes on this host; reaps them, and drains them on close."""

    def __init__(self, settings: Settings, log_dir: Path) -> None:
        self._settings = settings
        self._log_dir = log_dir
        self._children: list[ChildProcess] = []

    @property
    def running(self) -> int:
        """Workers started here that have not exited."""
        return sum(1 for c in self._children if c.returncode is None)

    async def spawn(self, model: str, version: str, requires: list[str]) -> str:
        missing = set(requires) - set(node_providers())
        if missing:
            raise NoCapacity(f"this host's onnxruntime lacks {sorted(missing)} required by {model}")
        self._children = [c for c in self._children if c.returncode is None]
        self._log_dir.mkdir(parents=True, exist_ok=True)
        name = f"worker {model}:{version}"
        child = await ChildProcess.start(
            name, ["worker", "--model", model, "--version", version], worker_env(self._settings),
            self._log_dir / f"worker-{model}-{version}-{uuid.uuid4().hex[:6]}.log",
        )
        self._children.append(child)
        return f"pid:{child.pid}"

    async def aclose(self) -> None:
        for child in self._children:
            await child.aclose()
        self._children.clear()


def node_providers() -> list[str]:
    """Short names of the execution providers this host's onnxruntime offers."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    return [short for short, name in PROVIDER_NAMES.items() if name in available]


def worker_env(settings: Settings) -> dict[str, str]:
    """Environment that makes a spawned worker use the same namespace, repository and services."""
    return {
        "INFERQ_NAMESPACE": settings.namespace,
        "INFERQ_NODE": settings.node,
        "INFERQ_MODEL_REPOSITORY": str(Path(settings.model_repository).resolve()),
        "INFERQ_STATE_DIR": str(Path(settings.state_dir).resolve()),
        "INFERQ_BROKER_URL": settings.broker.url,
        "INFERQ_ETCD_HOST": settings.etcd.host,
        "INFERQ_ETCD_PORT": str(settings.etcd.port),
        "INFERQ_ETCD_LEASE_TTL_S": str(settings.etcd.lease_ttl_s),
        "INFERQ_JOBS_TTL_S": str(settings.jobs.ttl_s),
    }


class AgentLauncher:
    """Sends spawn commands to edge-node agents, placing each worker on a node that fits."""

    def __init__(self, settings: Settings, connection: BrokerConnection, etcd: Any) -> None:
        self._settings = settings
        self._connection = connection
        self._etcd = etcd
        self._topology = Topology(settings.namespace)

    async def spawn(self, model: str, version: str, requires: list[str]) -> str:
        nodes = await get_json_prefix(self._etcd, keys(self._settings.namespace).nodes, self._settings.etcd.timeout_s)
        node = place(nodes, requires)
        command = {"command": "spawn", "model": model, "version": version, "request_id": uuid.uuid4().hex}
        await send(self._connection, self._topology.control, agent_key(node), command)
        log.info("asked agent %s to spawn %s:%s", node, model, version)
        return f"agent:{node}"

    async def aclose(self) -> None:
        """Workers on agents belong to the agents; nothing to stop here."""


def place(nodes: dict[str, dict[str, Any]], requires: list[str]) -> str:
    """The node with the most free capacity among those offering every required provider."""
    fitting = [
        (n.get("capacity", 1) - n.get("workers", 0), name)
        for name, n in nodes.items()
        if set(requires) <= set(n.get("providers", [])) and n.get("capacity", 1) > n.get("workers", 0)
    ]
    if not fitting:
        raise NoCapacity(f"no edge node offers {requires or 'any provider'} with free capacity (nodes: {sorted(nodes)})")
    return max(fitting)[1]
