"""The AMQP router: unpinned jobs published to ``<model>`` go through the same traffic split as HTTP jobs.

While a model has a traffic split or a shadow, the autoscaler binds ``<model>`` to
the model's router queue ``<ns>.model.<model>`` (without one, straight to the default
version's queue, as before the registry). Every edge consumes the router queues
(competing consumers) and, per job:

1. chooses the version with :class:`~inferq.edge.routing.Routing` (route key: header
   ``x-inferq-route-key``, else the job id), the same choice any edge would make;
2. republishes a copy to that version's queue, carrying the alias (so the worker's events name it
   too), and waits for the broker's confirm;
3. records the ``queued`` event with the alias and the version (confirmed), mirrors
   it to the shadow version if it falls in the shadow's share;
4. only then acks. A crash before the ack means the job is routed again: the same
   version (deterministic) gets a second copy with the same job id, and the first
   final state wins, as for any redelivery.

A job that cannot be routed (its model removed, no servable version) ends
``failed`` with ``version_removed``, recorded and replied to; a job whose TTL ran
out ends ``expired``. A full version queue holds the job here (backpressure) and
retries the publish.

Router queues are consumed on a connection of their own (as workers consume
theirs): a consume that the broker fails takes down only that connection, not the
edge's publishing one. A model first seen is consumed only after SETTLE_S:
RabbitMQ 3.10 can crash the connection on a consume of a quorum queue whose
replica set is still starting.
"""

from __future__ import annotations

import asyncio
import logging
import time

import aio_pika

from inferq.broker.connection import BrokerConnection, close_channel, tolerant
from inferq.broker.handback import republish
from inferq.broker.ledger import LedgerWriter
from inferq.broker.messages import (
    ALIAS_HEADER, EXPIRED, FAILED, QUEUED, ROUTE_KEY_HEADER, TENANT_HEADER, JobEvent, check_job_id, error_dict,
)
from inferq.broker.replies import send_reply
from inferq.broker.stages import ROUTE_HEADER
from inferq.broker.topology import Topology
from inferq.edge.jobs import pipeline_route
from inferq.edge.models import ModelDirectory
from inferq.edge.routing import Routing
from inferq.edge.shadow import ShadowMirror
from inferq.runtime.records import ModelRecord
from inferq.errors import BrokerError, BrokerRejected, BrokerUnavailable, CodecError, InvalidInput, ModelUnavailable, Unroutable

log = logging.getLogger("inferq.edge.router")

Delivery = aio_pika.abc.AbstractIncomingMessage
PREFETCH = 64
FULL_RETRY_S = 1.0
SETTLE_S = 1.0  # a new model's router queue is consumed this long after it was first seen
RETRY_S = 10.0  # a router queue that could not be consumed is tried again after this


class UnpinnedRouter:
    """Consumes every known model's router queue. Build with :meth:`open`; :meth:`aclose` stops it."""

    def __init__(self, connection: BrokerConnection, consuming: BrokerConnection, topology: Topology,
                 directory: ModelDirectory, routing: Routing, ledger: LedgerWriter, shadows: ShadowMirror) -> None:
        self._connection = connection
        self._consuming = consuming
        self._topology = topology
        self._directory = directory
        self._routing = routing
        self._ledger = ledger
        self._shadows = shadows
        self._consumers: dict[str, aio_pika.abc.AbstractChannel] = {}
        self._not_before: dict[str, float] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.routed = 0

    @classmethod
    async def open(cls, connection: BrokerConnection, consuming: BrokerConnection, topology: Topology,
                   directory: ModelDirectory, routing: Routing, ledger: LedgerWriter, shadows: ShadowMirror) -> UnpinnedRouter:
        """Start consuming the router queues of the models the directory knows, and follow it as it changes.

        ``connection`` publishes (confirmed); ``consuming`` carries the router queues' consumers.
        """
        self = cls(connection, consuming, topology, directory, routing, ledger, shadows)
        directory.on_refresh(self._wake.set)
        self._wake.set()
        self._task = asyncio.create_task(self._follow(), name="unpinned-router")
        return self

    async def _follow(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), SETTLE_S)
            except TimeoutError:
                pass
            self._wake.clear()
            await self._sync()

    async def _sync(self) -> None:
        wanted, now = set(self._directory.names()), time.monotonic()
        for model in sorted(set(self._consumers) - wanted):
            await close_channel(self._consumers.pop(model), f"router {model}")
        self._not_before = {m: t for m, t in self._not_before.items() if m in wanted}
        for model in sorted(wanted - set(self._consumers)):
            if now < self._not_before.setdefault(model, now + SETTLE_S):
                continue
            try:
                self._consumers[model] = await self._consume(model)
            except (BrokerError, aio_pika.exceptions.AMQPError, RuntimeError) as exc:
                self._not_before[model] = now + RETRY_S  # its router queue may not exist (a namespace from before)
                log.debug("not routing %s yet: %r", model, exc)

    async def _consume(self, model: str) -> aio_pika.abc.AbstractChannel:
        # One channel per model: a missing queue closes only its own channel.
        channel = await self._consuming.channel(prefetch=PREFETCH)
        try:
            queue = await channel.declare_queue(self._topology.router_queue(model), passive=True)
            await queue.consume(lambda message: self._on_message(model, message))
        except BaseException:
            await close_channel(channel, f"router {model}")
            raise
        return channel

    async def _on_message(self, model: str, message: Delivery) -> None:
        try:
            job_id = check_job_id(message.message_id)
        except CodecError:
            log.warning("rejecting an unpinned job for %s without a valid message_id", model)
            await message.reject(requeue=False)
            return
        try:
            await self._route(model, job_id, message)
        except BrokerUnavailable as exc:
            log.info("routing job %s interrupted (%s); it will be routed again", job_id, exc)
            async with tolerant("handing a job back to its router queue"):  # a dead channel returns it anyway
                await message.nack(requeue=True)

    async def _route(self, model: str, job_id: str, message: Delivery) -> None:
        tenant = _tenant(message)
        key = (message.headers or {}).get(ROUTE_KEY_HEADER)
        for attempt in range(2):
            try:
                record = await self._directory.record(model)
                routed = self._routing.choose(record, None, None, key if isinstance(key, str) and key else job_id)
            except (InvalidInput, ModelUnavailable) as exc:  # UnknownModel is an InvalidInput: the model was removed
                error = error_dict("version_removed", str(exc))
                await self._end(message, JobEvent(job_id, FAILED, model, "", tenant=tenant, error=error))
                return
            queue, extra = self._target(record, routed.route.version)
            extra[ALIAS_HEADER] = routed.route.alias  # "" replaces an alias a publisher set
            try:
                sent = await self._publish(message, queue, job_id, extra)
                break
            except Unroutable:  # the version's queue is gone: it is being removed; look again
                await self._directory.refresh()
        else:
            error = error_dict("version_removed", f"version {routed.route.version} of {model!r} was removed")
            await self._end(message, JobEvent(job_id, FAILED, model, routed.route.version, tenant=tenant, error=error))
            return
        if not sent:
            await self._end(message, JobEvent(job_id, EXPIRED, model, routed.route.version, tenant=tenant,
                                              error=error_dict("expired", "job was not started within its TTL")))
            return
        event = JobEvent(job_id, QUEUED, model, routed.route.version, tenant=tenant, alias=routed.route.alias or None)
        try:
            await self._ledger.write([event])
        except BrokerError as exc:  # the job is in its version's queue: the worker's events record it anyway
            log.warning("queued event of routed job %s not recorded (%s)", job_id, exc)
        if routed.shadow is not None:
            await self._shadows.mirror_delivery(message, job_id, model, routed.shadow)
        self.routed += 1
        await message.ack()

    def _target(self, record: ModelRecord, version: str) -> tuple[str, dict[str, str]]:
        """The queue a job goes to and the headers it gets: a pipeline's go to its first stage with their route."""
        route = pipeline_route(record, None)
        if route is None:
            return self._topology.model_queue(record.name, version), {}
        return self._topology.model_queue(route.hop.model, route.hop.version), {ROUTE_HEADER: route.to_json()}

    async def _publish(self, message: Delivery, queue: str, job_id: str, headers: dict[str, str]) -> bool:
        """Copy the job to ``queue``; False if its TTL ran out. A full queue is retried (the job waits here)."""
        while True:
            try:
                return await republish(self._connection, message, queue, headers)
            except BrokerRejected:
                log.info("queue %s is full; job %s waits in the router", queue, job_id)
                await asyncio.sleep(FULL_RETRY_S)

    async def _end(self, message: Delivery, event: JobEvent) -> None:
        try:
            await self._ledger.write([event])
        except BrokerError as exc:
            log.warning("could not record job %s (%s); it will be routed again", event.job_id, exc)
            await message.nack(requeue=True)
            return
        await send_reply(self._connection, message, event)
        await message.ack()

    async def aclose(self) -> None:
        """Stop routing; unacked jobs go back to their router queues. Idempotent."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        channels, self._consumers = self._consumers, {}
        # All at once: each close is bounded (5 s), and a slow broker must not multiply that by the number of models.
        await asyncio.gather(*(close_channel(c, f"router {m}") for m, c in channels.items()))


def _tenant(message: Delivery) -> str | None:
    tenant = (message.headers or {}).get(TENANT_HEADER)
    return tenant if isinstance(tenant, str) else None
