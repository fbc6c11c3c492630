"""The edge-node agent: runs on a node (a server, a Jetson) and starts workers when told.

It registers ``/<ns>/nodes/<node>`` (lease-backed) with the providers this
node's onnxruntime offers and its capacity, and listens on the control
exchange at ``agent.<node>`` for ``spawn`` commands (see README, "Control
commands"). Workers it started are drained when it stops.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import replace
from typing import Any

from actors.launcher import LocalLauncher, node_providers
from broker.connection import BrokerConnection
from broker.control import ControlListener, agent_key
from broker.topology import Topology
from runtime.actor import Actor
from runtime.coordination import keys, open_etcd
from runtime.errors import CoordinationError, InferqError
from runtime.membership import MembershipLease
from runtime.settings import Settings

log = logging.getLogger("inferq.agent")


class Agent(Actor):
    """One node's agent."""

    def __init__(self, settings: Settings, node: str, capacity: int) -> None:
        super().__init__(f"agent:{node}")
        self.settings = settings
        self.node = node
        self.capacity = capacity
        self.topology = Topology(settings.namespace)
        self.launcher = LocalLauncher(replace(settings, node=node), settings.state_dir / "logs")
        self._connection: BrokerConnection | None = None
        self._control: ControlListener | None = None
        self._etcd: Any = None
        self._lease: MembershipLease | None = None

    async def on_start(self) -> None:
        s = self.settings
        self._connection = await BrokerConnection.open(s.broker, self.name)
        await self.topology.declare_shared(self._connection.publisher, s.jobs.ttl_s)
        self._control = await ControlListener.start(self._connection, self.topology.control, [agent_key(self.node)], self._on_command)
        self._etcd = open_etcd(s.etcd)
        record = {"node": self.node, "providers": node_providers(), "capacity": self.capacity,
                  "workers": 0, "pid": os.getpid(), "started_at": time.time()}
        self._lease = await MembershipLease.acquire(self._etcd, keys(s.namespace).node(self.node), record, s.etcd.lease_ttl_s, s.etcd.timeout_s)
        self.spawn(self._report(), "report")

    async def _report(self) -> None:
        reported = 0
        while True:
            await asyncio.sleep(2.0)
            if self.launcher.running != reported:
                reported = await self._publish_count()

    async def _publish_count(self) -> int:
        count = self.launcher.running
        try:
            await self._lease.update(workers=count)
        except CoordinationError as exc:
            log.warning("could not update the node record: %s", exc)
        return count

    async def _on_command(self, command: dict[str, Any]) -> None:
        if command["command"] != "spawn":
            log.warning("unknown agent command %r", command["command"])
            return
        model, version = command.get("model"), command.get("version")
        if not isinstance(model, str) or not isinstance(version, str) or self.launcher.running >= self.capacity:
            log.warning("refusing spawn command %r (capacity %d, running %d)", command, self.capacity, self.launcher.running)
            return
        try:
            await self.launcher.spawn(model, version, [])
        except (InferqError, OSError) as exc:
            log.error("spawn of %s:%s failed: %r", model, version, exc)
            return
        await self._publish_count()

    async def on_drain(self) -> None:
        """Take no more spawn commands: one arriving while the workers drain would outlive the agent."""
        if self._control is not None:
            await self._control.aclose()

    async def on_close(self) -> None:
        await self.launcher.aclose()
        for closer in (self._control, self._lease):
            if closer is not None:
                await closer.aclose()
        if self._connection is not None:
            await self._connection.aclose()
        if self._etcd is not None:
            await self._etcd.close()
