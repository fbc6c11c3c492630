"""Giving a job back to a queue without charging it a delivery: republish a copy, then ack the original.

RabbitMQ 3.10 counts every nack or lost channel in ``x-delivery-count``. A worker
that hands back jobs it never started (a drain, a lost ledger write, a retry
waiting out its backoff) publishes a confirmed copy and acks the original
instead, so the copy starts with a clean count. The copy keeps everything the
job needs: its id, reply address, tenant and submit time, the rest of its TTL,
and the inferq headers below, which carry what the worker knows about it::

    x-inferq-starts     starts that ended without the worker dying (for ``attempts``)
    x-inferq-retries    transient-error retries so far (bounded by ``[retry] max_attempts``)
    x-inferq-suspect    it was in a worker that died: run it alone and count its start
    x-inferq-publisher  the original publisher, when that was not inferq: the copy is
                        published under the service user's ``user_id`` and judged as the
                        original was (:mod:`inferq.broker.identity`)

If the copy cannot be published (the broker is away), the original is nacked:
the job is redelivered, just counted, which is what the backstop limit is for.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import aio_pika

from inferq.broker.connection import BrokerConnection
from inferq.broker.identity import broker_user, carried
from inferq.broker.messages import SUBMITTED_HEADER, TTL_HEADER, job_ttl, submitted_at

# What RabbitMQ adds on delivery or dead-lettering: never copied, the copy is a new message.
_BROKER_HEADERS = ("x-delivery-count", "x-death", "x-first-death-exchange", "x-first-death-queue", "x-first-death-reason",
                   "x-last-death-exchange", "x-last-death-queue", "x-last-death-reason")


def remaining_ttl(delivery: aio_pika.abc.AbstractIncomingMessage, now: float | None = None) -> float | None:
    """What is left of the job's TTL (counted from its submission), None if it has none."""
    ttl = job_ttl(delivery)
    if ttl is None:
        return None
    submitted, _ = submitted_at(delivery)
    if submitted is None:
        return ttl
    return submitted + ttl - (time.time() if now is None else now)


def copy_of(delivery: aio_pika.abc.AbstractIncomingMessage, headers: Mapping[str, Any], expiration: float | None,
            service_user: str | None = None) -> aio_pika.Message:
    """A persistent copy of ``delivery`` with ``headers`` merged in and the given TTL in seconds.

    ``service_user`` is the user that publishes the copy (its ``user_id``); the
    copy names the original publisher when that was someone else.
    """
    merged = {k: v for k, v in (delivery.headers or {}).items() if k not in _BROKER_HEADERS}
    merged.update(carried(delivery, service_user))
    merged.update(headers)
    ttl = job_ttl(delivery)
    if ttl is not None:  # RabbitMQ drops the expiration of a dead-lettered message: the header keeps it
        merged[TTL_HEADER] = int(ttl * 1000)
    if SUBMITTED_HEADER not in merged and delivery.timestamp is not None:
        merged[SUBMITTED_HEADER] = int(delivery.timestamp.timestamp() * 1_000_000)
    return aio_pika.Message(
        delivery.body, headers=merged, content_type=delivery.content_type, message_id=delivery.message_id,
        correlation_id=delivery.correlation_id, reply_to=delivery.reply_to, priority=delivery.priority,
        timestamp=delivery.timestamp, expiration=expiration, delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        type=delivery.type, user_id=service_user,
    )


async def republish(connection: BrokerConnection, delivery: aio_pika.abc.AbstractIncomingMessage, queue: str,
                    headers: Mapping[str, Any], delay_s: float | None = None) -> bool:
    """Publish a copy to ``queue`` (confirmed); False if the job's TTL ran out, so there is nothing to send.

    With ``delay_s`` the copy's TTL is the delay: ``queue`` is then a retry queue
    that dead-letters it back when it expires. Raises BrokerError if not confirmed.
    """
    left = remaining_ttl(delivery)
    if left is not None and left <= 0:
        return False
    expiration = delay_s if delay_s is not None else left
    copy = copy_of(delivery, headers, expiration, broker_user(connection.settings.url))
    await connection.publish(copy, queue, mandatory=True)
    return True
