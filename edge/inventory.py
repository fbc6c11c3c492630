"""Live facts about models: their workers (etcd membership) and queue depth (RabbitMQ)."""

from __future__ import annotations

import aetcd

from inferq.broker.connection import BrokerConnection
from inferq.broker.topology import Topology
from inferq.errors import CoordinationError
from inferq.runtime.coordination import get_records, keys
from inferq.runtime.records import Decision, NodeRecord, WorkerRecord


class Inventory:
    """Reads membership and queue depth on demand."""

    def __init__(self, client: aetcd.Client, connection: BrokerConnection, topology: Topology, timeout_s: float) -> None:
        self._client = client
        self._connection = connection
        self._topology = topology
        self._timeout = timeout_s

    async def workers(self, model: str | None = None, strict: bool = False) -> list[WorkerRecord]:
        """Membership records, optionally of one model; empty if etcd is unreachable (CoordinationError if ``strict``)."""
        try:
            records = await get_records(self._client, keys(self._topology.namespace).workers, WorkerRecord.from_json, self._timeout)
        except CoordinationError:
            if strict:
                raise
            return []
        return [r for r in records.values() if model is None or r.model == model]

    async def decisions(self, strict: bool = False) -> dict[str, Decision]:
        """The autoscaler's last decision per ``<model>.<version>``; empty if etcd is unreachable (or raise, if ``strict``)."""
        try:
            return await get_records(self._client, keys(self._topology.namespace).decisions, Decision.from_json, self._timeout)
        except CoordinationError:
            if strict:
                raise
            return {}

    async def nodes(self) -> list[NodeRecord]:
        """The edge-node agents' records; CoordinationError if etcd does not answer."""
        records = await get_records(self._client, keys(self._topology.namespace).nodes, NodeRecord.from_json, self._timeout)
        return sorted(records.values(), key=lambda n: n.node)

    @property
    def broker_connected(self) -> bool:
        """Whether the broker connection is up now (a missing queue is not an outage)."""
        return self._connection.connected

    async def dead_letters(self) -> int | None:
        """Messages in the namespace's dead-letter queue not yet reaped into the ledger, or None if unknown."""
        counts = await self._connection.queue_counts(self._topology.dead)
        return counts[0] if counts else None

    async def decision(self, model: str, version: str) -> Decision | None:
        """The autoscaler's last decision for one model version; CoordinationError if etcd does not answer."""
        found = await get_records(self._client, keys(self._topology.namespace).decisions, Decision.from_json, self._timeout)
        return found.get(f"{model}.{version}")

    async def queue_facts(self, model: str, version: str) -> tuple[int, int] | None:
        """(ready jobs in both priority queues, consumers of the normal one), or None if unknown."""
        normal = await self._connection.queue_counts(self._topology.model_queue(model, version))
        high = await self._connection.queue_counts(self._topology.high_queue(model, version))
        return (normal[0] + (high[0] if high else 0), normal[1]) if normal else None

    async def queue_depth(self, model: str, version: str) -> int | None:
        """Jobs waiting in a version's queues, both priorities (ready, not yet delivered), or None if unknown."""
        normal = await self._connection.queue_counts(self._topology.model_queue(model, version))
        high = await self._connection.queue_counts(self._topology.high_queue(model, version))
        return normal[0] + (high[0] if high else 0) if normal else None
