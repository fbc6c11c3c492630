"""Retiring a removed version: its queued jobs end ``failed: version_removed``, then its queues go.

Run by the acting autoscaler for each removal record, once no worker of the
version is left (they were told to drain, and their in-flight and prefetched
jobs were finished or handed back to the queue). In this order:

1. the retry queue: every job waiting out a backoff is failed, then the queue is
   deleted (only workers publish to it, and none is left; one that comes back from
   its backoff before the unbinding goes to the queues retired next);
2. the version's priority exchange ``<ns>.route.<model>.<version>`` is unbound from
   ``<model>.<version>`` (and ``<model>``), so nothing new is routed to the
   version (a publisher gets "unroutable" instead);
3. its high-priority queue, then its normal queue: every job in each is failed, then
   the queue is deleted; then the version's two exchanges are deleted;
4. for a removed model, its router queue the same way.

Each failure is a ``failed`` event with code ``version_removed``, confirmed in the
ledger before the job is acked; ``reply_to`` gets the result. RabbitMQ's quorum
queues cannot be deleted "only if empty", so a job published by queue name between
the last read and the delete would go with the queue: the delete's count of such
jobs is logged as an error (unbinding first and waiting for the workers make it a
narrow window that only a stale edge could hit).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import aio_pika
import aiormq

from inferq.broker.connection import BrokerConnection, close_channel
from inferq.broker.ledger import LedgerWriter
from inferq.broker.messages import FAILED, TENANT_HEADER, JobEvent, check_job_id, error_dict
from inferq.broker.replies import send_reply
from inferq.broker.topology import Topology
from inferq.errors import BrokerUnavailable, CodecError
from inferq.runtime.records import RemovalRecord

log = logging.getLogger("inferq.removal")

GET_TIMEOUT_S = 5.0


async def retire(connection: BrokerConnection, topology: Topology, ledger: LedgerWriter, removal: RemovalRecord) -> int:
    """Fail every queued job of a removed version (or model) and delete its queues; return how many failed."""
    model, version = removal.model, removal.version
    failed = 0
    if version:
        normal, high, retry = topology.queues_of(model, version)
        failed += await _retire_queue(connection, ledger, retry, removal, [])
        route = topology.route_exchange(model, version)
        await _unroute(connection, route, topology.requests, [topology.routing_key(model, version), model])
        for name in (high, normal):  # high first, the order workers drain them in
            failed += await _retire_queue(connection, ledger, name, removal, [])
        await _delete_exchanges(connection, [route, f"{route}.normal"])
    if removal.model_removed:
        failed += await _retire_queue(connection, ledger, topology.router_queue(model), removal, [model], topology.requests)
    return failed


@contextlib.asynccontextmanager
async def _channel(connection: BrokerConnection, what: str) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    """A channel for one step of a removal; AMQP errors become :class:`BrokerUnavailable` (the round is retried)."""
    channel = await connection.channel()
    try:
        yield channel
    except (aiormq.exceptions.AMQPError, OSError, RuntimeError) as exc:
        raise BrokerUnavailable(f"{what} failed: {exc!r}") from exc
    finally:
        await close_channel(channel, "removal")


async def _unroute(connection: BrokerConnection, route: str, requests: str, keys: list[str]) -> None:
    """Unbind the version's priority exchange from the requests exchange: nothing new reaches its queues."""
    async with _channel(connection, f"unrouting {route}") as channel:
        try:
            exchange = await channel.get_exchange(route, ensure=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return  # already gone (an earlier round), or a version from before priority lanes
        for key in keys:
            await exchange.unbind(requests, routing_key=key)


async def _delete_exchanges(connection: BrokerConnection, names: list[str]) -> None:
    """Delete a retired version's exchanges (a missing one is fine: deletes are idempotent in RabbitMQ)."""
    async with _channel(connection, f"deleting {names}") as channel:
        for name in names:
            await channel.exchange_delete(name)


async def _retire_queue(connection: BrokerConnection, ledger: LedgerWriter, name: str, removal: RemovalRecord,
                        unbind: list[str], exchange: str = "") -> int:
    async with _channel(connection, f"retiring {name}") as channel:
        try:
            queue = await channel.declare_queue(name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return 0  # already gone (an earlier round, or never declared)
        for key in unbind:
            await queue.unbind(exchange, routing_key=key)
        failed = await _fail_all(connection, ledger, queue, removal)
        ok = await queue.delete(if_unused=False, if_empty=False)
        lost = getattr(ok, "message_count", 0) or 0
        if lost:
            log.error("%d job(s) reached %s after it was emptied and went with it", lost, name)
        log.info("retired %s: %d queued job(s) failed with version_removed", name, failed)
        return failed


async def _fail_all(connection: BrokerConnection, ledger: LedgerWriter, queue: aio_pika.abc.AbstractQueue,
                    removal: RemovalRecord) -> int:
    failed = 0
    reason = (f"version {removal.version} of model {removal.model!r} was removed" if removal.version
              else f"model {removal.model!r} was removed") + (f": {removal.reason}" if removal.reason else "")
    while (message := await queue.get(no_ack=False, fail=False, timeout=GET_TIMEOUT_S)) is not None:
        try:
            job_id = check_job_id(message.message_id)
        except CodecError:
            log.warning("dropping a message without a valid job id from %s", queue.name)
            await message.ack()
            continue
        tenant = (message.headers or {}).get(TENANT_HEADER)
        event = JobEvent(job_id, FAILED, removal.model, removal.version, tenant=tenant if isinstance(tenant, str) else None,
                         error=error_dict("version_removed", reason))
        await ledger.write([event])  # raises BrokerError: the message is not acked and comes back
        await send_reply(connection, message, event)
        await message.ack()
        failed += 1
    return failed
