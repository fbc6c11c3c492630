"""Commands to actors over the control exchange (``<ns>.control``, topic).

Routing keys: ``worker.<worker-id>`` (``drain``), ``agent.<node>`` (``spawn``). Bodies are msgpack maps with a ``command`` field;
see README, "Control commands".
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika

from inferq.broker.acks import ack, settle
from inferq.broker.codec import packb, unpackb
from inferq.broker.connection import BrokerConnection, close_channel
from inferq.broker.messages import CONTENT_TYPE
from inferq.errors import CodecError

log = logging.getLogger("inferq.control")

Handler = Callable[[dict[str, Any]], Awaitable[None]]


def worker_key(worker_id: str) -> str:
    return f"worker.{worker_id}"


def agent_key(node: str) -> str:
    return f"agent.{node}"


async def send(connection: BrokerConnection, exchange: str, routing_key: str, command: dict[str, Any]) -> None:
    """Publish one command and wait for the broker's confirm (raises Unroutable if nobody listens)."""
    message = aio_pika.Message(packb(command), content_type=CONTENT_TYPE)
    await connection.publish(message, routing_key, exchange, mandatory=True)


class ControlListener:
    """An exclusive queue bound to ``routing_keys``; hands each command to ``handler``."""

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self._channel: aio_pika.abc.AbstractChannel | None = None

    @classmethod
    async def open(cls, connection: BrokerConnection, exchange: str, routing_keys: list[str], handler: Handler) -> ControlListener:
        self = cls(handler)
        self._channel = await connection.channel(prefetch=10)
        ex = await self._channel.get_exchange(exchange, ensure=False)
        # Held on self: aio-pika restores only queues (and bindings) still referenced after a reconnect.
        self._exchange = ex
        self._queue = await self._channel.declare_queue(exclusive=True, auto_delete=True)
        for key in routing_keys:
            await self._queue.bind(ex, routing_key=key)
        await self._queue.consume(self._on_message)
        return self

    async def _on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        try:
            command = unpackb(message.body)
            if not isinstance(command, dict) or not isinstance(command.get("command"), str):
                raise CodecError("a control command must be a map with a 'command' string")
        except CodecError as exc:
            log.warning("ignoring a malformed control message: %s", exc)
            await settle(message, requeue=False)
            return
        await ack(message)
        await self._handler(command)

    async def aclose(self) -> None:
        """Stop listening; idempotent."""
        channel, self._channel = self._channel, None
        await close_channel(channel, "control")
