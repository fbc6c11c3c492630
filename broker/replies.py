"""Results to ``reply_to``: best effort, since the job ledger always has them.

Sent without waiting for a publisher confirm: a reply is only a shortcut to the
result, and waiting would hold the job's ack (and the client) back.
"""

from __future__ import annotations

import logging

import aio_pika

from inferq.broker.codec import packb
from inferq.broker.connection import BrokerConnection
from inferq.broker.messages import CONTENT_TYPE, JobEvent
from inferq.errors import BrokerError

log = logging.getLogger("inferq.replies")


async def send_reply(connection: BrokerConnection, request: aio_pika.abc.AbstractIncomingMessage, event: JobEvent) -> None:
    """Publish ``event``'s result to the request's ``reply_to`` with its ``correlation_id``, if it asked for one."""
    if not request.reply_to:
        return
    message = aio_pika.Message(packb(event.result()), content_type=CONTENT_TYPE, correlation_id=request.correlation_id, message_id=event.job_id)
    try:
        await connection.send(message, request.reply_to)
    except BrokerError as exc:
        log.info("reply for %s not delivered: %s", event.job_id, exc)
