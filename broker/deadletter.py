"""The dead-letter reaper: turns dead-lettered jobs into final ledger events.

A job leaves its model queue dead-lettered when its TTL ran out before a
worker took it (``expired``) or when it was delivered ``x-delivery-limit``
times without an ack, i.e. it kept killing its worker (``failed``). Jobs a
worker rejected as malformed were already recorded as failed by that worker.
With auth on, the job's tenant and whether its ``reply_to`` may be answered
come from ``identify`` (:class:`inferq.runtime.tenancy.Tenancy`), as for a
job a worker takes: a header is not trusted here either.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika

from inferq.broker.acks import ack, settle
from inferq.broker.connection import BrokerConnection, close_channel
from inferq.broker.ledger import LedgerWriter
from inferq.broker.identity import Verdict
from inferq.broker.replies import send_reply
from inferq.broker.messages import EXPIRED, FAILED, JOB_ID_RE, TENANT_HEADER, JobEvent, error_dict, webhook_from_headers
from inferq.errors import BrokerError

log = logging.getLogger("inferq.deadletter")

BACKOFF_MAX_S = 30.0


Identify = Callable[[aio_pika.abc.AbstractIncomingMessage], Awaitable[Verdict]]
LATER_S = 1.0  # a dead letter whose publisher cannot be checked now waits this long before it comes back


def event_for(message: aio_pika.abc.AbstractIncomingMessage, queue_prefix: str, verdict: Verdict | None = None) -> JobEvent | None:
    """The final event for a dead letter, or None if there is nothing to record.

    Without a ``verdict`` (no tenancy) the tenant is the header's, as before auth.
    """
    headers = message.headers or {}
    reason = headers.get("x-first-death-reason")
    queue = str(headers.get("x-first-death-queue", ""))
    job_id = message.message_id
    if not job_id or not JOB_ID_RE.match(job_id) or not queue.startswith(queue_prefix):
        return None
    model, _, version = queue[len(queue_prefix):].partition(".")
    tenant = verdict.tenant if verdict is not None else headers.get(TENANT_HEADER)
    common: dict[str, Any] = {"model": model, "version": version, "tenant": tenant if isinstance(tenant, str) else None,
                              "webhook": webhook_from_headers(headers)}
    if reason == "expired":
        return JobEvent(job_id, EXPIRED, error=error_dict("expired", "job was not started within its TTL"), **common)
    if reason == "delivery_limit":
        return JobEvent(
            job_id, FAILED,
            error=error_dict("delivery_limit", "job was delivered the maximum number of times without finishing (it crashed or stalled its workers)"),
            **common,
        )
    return None


class DeadLetterReaper:
    """Consumes the dead-letter queue and writes final events. Build with :meth:`start`."""

    def __init__(self, connection: BrokerConnection, ledger: LedgerWriter, queue_prefix: str, identify: Identify | None) -> None:
        self._connection = connection
        self._ledger = ledger
        self._prefix = queue_prefix
        self._identify = identify
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._failures = 0  # consecutive failed ledger writes: each dead letter then waits before going back

    @classmethod
    async def open(cls, connection: BrokerConnection, queue: str, ledger: LedgerWriter, queue_prefix: str,
                   identify: Identify | None = None) -> DeadLetterReaper:
        self = cls(connection, ledger, queue_prefix, identify)
        self._channel = await connection.channel(prefetch=100)
        # Declared (passively) and held on self: aio-pika restores only such queues after a reconnect.
        self._queue = await self._channel.declare_queue(queue, passive=True)
        await self._queue.consume(self._on_message)
        return self

    async def _on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        if event_for(message, self._prefix) is None:  # nothing to record (a rejected job was recorded already)
            await ack(message)
            return
        verdict = await self._identify(message) if self._identify is not None else None
        if verdict is not None and verdict.later:
            await asyncio.sleep(LATER_S)  # etcd is away: not at once, or it would come straight back
            await settle(message, requeue=True)
            return
        event = event_for(message, self._prefix, verdict)
        try:
            await self._ledger.write([event])
        except BrokerError as exc:
            # The dead-letter queue has no delivery limit: back off instead of spinning on a ledger that
            # keeps refusing (a deleted stream is Unroutable forever), holding the message meanwhile.
            self._failures += 1
            delay = min(BACKOFF_MAX_S, 0.5 * 2 ** (self._failures - 1))
            log.warning("could not record dead letter %s (%s); retrying in %.1fs", message.message_id, exc, delay)
            await asyncio.sleep(delay)
            await settle(message, requeue=True)
            return
        self._failures = 0
        log.info("job %s dead-lettered: %s", event.job_id, event.status)
        if verdict is None or verdict.reply:
            await send_reply(self._connection, message, event)
        await ack(message)

    async def aclose(self) -> None:
        """Stop consuming; idempotent."""
        channel, self._channel = self._channel, None
        await close_channel(channel, "dead-letter")
