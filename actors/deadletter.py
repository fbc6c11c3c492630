"""The dead-letter reaper: turns dead-lettered jobs into final ledger events.

A job leaves its model queue dead-lettered when its TTL ran out before a
worker took it (``expired``) or when it was delivered ``x-delivery-limit``
times without an ack, i.e. it kept killing its worker (``failed``). Jobs a
worker rejected as malformed were already recorded as failed by that worker.
"""

from __future__ import annotations

import logging
from typing import Any

import aio_pika

from broker.connection import BrokerConnection, close_channel
from broker.ledger import LedgerWriter
from broker.replies import send_reply
from broker.messages import EXPIRED, FAILED, JOB_ID_RE, TENANT_HEADER, JobEvent, error_dict
from runtime.errors import BrokerError

log = logging.getLogger("inferq.deadletter")


def event_for(message: aio_pika.abc.AbstractIncomingMessage, queue_prefix: str) -> JobEvent | None:
    """The final event for a dead letter, or None if there is nothing to record."""
    headers = message.headers or {}
    reason = headers.get("x-first-death-reason")
    queue = str(headers.get("x-first-death-queue", ""))
    job_id = message.message_id
    if not job_id or not JOB_ID_RE.match(job_id) or not queue.startswith(queue_prefix):
        return None
    model, _, version = queue[len(queue_prefix):].partition(".")
    tenant = headers.get(TENANT_HEADER)
    common: dict[str, Any] = {"model": model, "version": version, "tenant": tenant if isinstance(tenant, str) else None}
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

    def __init__(self, connection: BrokerConnection, ledger: LedgerWriter, queue_prefix: str) -> None:
        self._connection = connection
        self._ledger = ledger
        self._prefix = queue_prefix
        self._channel: aio_pika.abc.AbstractChannel | None = None

    @classmethod
    async def start(cls, connection: BrokerConnection, queue: str, ledger: LedgerWriter, queue_prefix: str) -> DeadLetterReaper:
        self = cls(connection, ledger, queue_prefix)
        self._channel = await connection.channel(prefetch=100)
        # Declared (passively) and held on self: aio-pika restores only such queues after a reconnect.
        self._queue = await self._channel.declare_queue(queue, passive=True)
        await self._queue.consume(self._on_message)
        return self

    async def _on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        event = event_for(message, self._prefix)
        if event is not None:
            try:
                await self._ledger.write([event])
            except BrokerError as exc:
                log.warning("could not record dead letter %s (%s); it will be redelivered", message.message_id, exc)
                await message.nack(requeue=True)
                return
            log.info("job %s dead-lettered: %s", event.job_id, event.status)
            await send_reply(self._connection, message, event)
        await message.ack()

    async def aclose(self) -> None:
        """Stop consuming; idempotent."""
        channel, self._channel = self._channel, None
        await close_channel(channel, "dead-letter")
