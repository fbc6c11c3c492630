"""Live facts about models: their workers (etcd membership) and queue depth (RabbitMQ)."""

from __future__ import annotations

from typing import Any

import aetcd

from broker.connection import BrokerConnection
from broker.topology import Topology
from runtime.coordination import get_json_prefix, keys
from runtime.errors import CoordinationError


class Inventory:
    """Reads membership and queue depth on demand."""

    def __init__(self, client: aetcd.Client, connection: BrokerConnection, topology: Topology, timeout_s: float) -> None:
        self._client = client
        self._connection = connection
        self._topology = topology
        self._timeout = timeout_s

    async def workers(self, model: str | None = None) -> list[dict[str, Any]]:
        """Membership records, optionally of one model; empty if etcd is unreachable."""
        try:
            records = await get_json_prefix(self._client, keys(self._topology.namespace).workers, self._timeout)
        except CoordinationError:
            return []
        return [r for r in records.values() if model is None or r.get("model") == model]

    async def decisions(self) -> dict[str, dict[str, Any]]:
        """The autoscaler's last decision per ``<model>.<version>``; empty if etcd is unreachable."""
        try:
            return await get_json_prefix(self._client, keys(self._topology.namespace).decisions, self._timeout)
        except CoordinationError:
            return {}

    async def queue_depth(self, model: str, version: str) -> int | None:
        """Jobs waiting in a version's queue (ready, not yet delivered), or None if unknown."""
        counts = await self._connection.queue_counts(self._topology.model_queue(model, version))
        return counts[0] if counts else None
