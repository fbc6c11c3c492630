"""A robust RabbitMQ connection with a confirming publisher.

Errors of aio-pika/aiormq are translated here into :mod:`runtime.errors`.
"""

from __future__ import annotations

import asyncio
import logging

import aio_pika
import aiormq

from runtime.errors import BrokerRejected, BrokerUnavailable, Unroutable
from runtime.settings import BrokerSettings, mask_url

log = logging.getLogger("inferq.broker")

_UNAVAILABLE = (
    OSError,
    TimeoutError,
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
    aiormq.exceptions.ChannelClosed,
    aio_pika.exceptions.ChannelClosed,
)


def foreign_cancel(exc: BaseException) -> bool:
    """Whether a CancelledError came from aiormq failing a pending frame (connection lost), not from cancelling us."""
    task = asyncio.current_task()
    return isinstance(exc, asyncio.CancelledError) and task is not None and not task.cancelling()


async def close_channel(channel: aio_pika.abc.AbstractChannel | None, what: str) -> None:
    """Close a channel if it is open; a broker already gone is fine (its work is redelivered anyway)."""
    if channel is None or channel.is_closed:
        return
    try:
        await asyncio.wait_for(channel.close(), 5)
    except (*_UNAVAILABLE, aio_pika.exceptions.AMQPError, RuntimeError, asyncio.CancelledError) as exc:
        if isinstance(exc, asyncio.CancelledError) and not foreign_cancel(exc):
            raise
        log.debug("closing the %s channel: %r", what, exc)


class BrokerConnection:
    """One robust connection; reconnects on its own, publishes with confirms.

    Build it with :meth:`open`; close it with :meth:`aclose` (idempotent).
    """

    def __init__(self, settings: BrokerSettings, name: str) -> None:
        self.settings = settings
        self.name = name
        self.state = "new"
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None
        self._publisher: aio_pika.abc.AbstractChannel | None = None
        self._exchanges: dict[str, aio_pika.abc.AbstractExchange] = {}
        self._reopen_lock = asyncio.Lock()
        self._sender: aio_pika.abc.AbstractChannel | None = None

    def __repr__(self) -> str:
        return f"<BrokerConnection {self.name} {mask_url(self.settings.url)} {self.state}>"

    @classmethod
    async def open(cls, settings: BrokerSettings, name: str) -> BrokerConnection:
        """Connect (bounded by ``connect_timeout_s``) and open the publishing channel."""
        self = cls(settings, name)
        timeout = settings.connect_timeout_s
        try:
            self._connection = await asyncio.wait_for(
                aio_pika.connect_robust(
                    settings.url,
                    timeout=timeout,
                    reconnect_interval=settings.reconnect_interval_s,
                    heartbeat=settings.heartbeat_s,
                    client_properties={"connection_name": name},
                ),
                timeout,
            )
            self._publisher = await asyncio.wait_for(self._connection.channel(publisher_confirms=True, on_return_raises=True), timeout)
        except _UNAVAILABLE as exc:
            await self.aclose()
            raise BrokerUnavailable(f"cannot connect to RabbitMQ at {mask_url(settings.url)}: {exc!r}") from exc
        self.state = "open"
        return self

    async def __aenter__(self) -> BrokerConnection:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @property
    def connected(self) -> bool:
        """Whether the underlying connection is up right now."""
        return self._connection is not None and not self._connection.is_closed and self._connection.connected.is_set()

    async def channel(self, prefetch: int | None = None) -> aio_pika.abc.AbstractChannel:
        """A new (robust) channel, e.g. for one consumer."""
        assert self._connection is not None, "connection is closed"
        try:
            channel = await asyncio.wait_for(self._connection.channel(), self.settings.connect_timeout_s)
            if prefetch:
                await channel.set_qos(prefetch_count=prefetch)
        except (*_UNAVAILABLE, RuntimeError) as exc:  # RuntimeError: "Connection was not opened" mid-reconnect
            raise BrokerUnavailable(f"cannot open a channel: {exc!r}") from exc
        return channel

    async def queue_counts(self, queue: str) -> tuple[int, int] | None:
        """(ready messages, consumers) of ``queue``, read fresh; None if it does not exist or the broker is away.

        A raw passive declare on a throwaway channel: aio-pika's cached queue
        objects can report stale counts, and a missing queue closes the channel.
        """
        try:
            channel = await self.channel()
        except BrokerUnavailable:
            return None
        try:
            async with asyncio.timeout(self.settings.connect_timeout_s):
                raw = await channel.get_underlay_channel()
                ok = await raw.queue_declare(queue, passive=True)
            return ok.message_count, ok.consumer_count
        except (*_UNAVAILABLE, aiormq.exceptions.AMQPError, RuntimeError, asyncio.CancelledError) as exc:
            if isinstance(exc, asyncio.CancelledError) and not foreign_cancel(exc):
                raise
            return None
        finally:
            await close_channel(channel, "queue-count")

    @property
    def publisher(self) -> aio_pika.abc.AbstractChannel:
        """The confirming channel (for declarations too)."""
        assert self._publisher is not None, "connection is closed"
        return self._publisher

    async def publish(
        self,
        message: aio_pika.abc.AbstractMessage,
        routing_key: str,
        exchange: str = "",
        *,
        mandatory: bool = False,
        timeout: float | None = None,
    ) -> None:
        """Publish and wait for the broker's confirm; raise a BrokerError if it does not come."""
        timeout = timeout or self.settings.publish_timeout_s
        if not self.connected:
            # Fail fast while reconnecting: a caller should answer 503 now, not after the timeout.
            raise BrokerUnavailable("not connected to RabbitMQ (reconnecting)")
        try:
            await self._ensure_publisher()
            target = await self._exchange(exchange)
            await asyncio.wait_for(target.publish(message, routing_key, mandatory=mandatory), timeout)
        except aiormq.exceptions.PublishError as exc:
            raise Unroutable(f"no queue is bound for {exchange!r} / {routing_key!r}") from exc
        except aiormq.exceptions.DeliveryError as exc:
            raise BrokerRejected(f"the broker refused the message for {routing_key!r} (queue full?)") from exc
        except (*_UNAVAILABLE, RuntimeError) as exc:  # aio-pika raises RuntimeError("... closed") mid-reconnect
            raise BrokerUnavailable(f"publish to {routing_key!r} failed: {exc!r}") from exc
        except asyncio.CancelledError as exc:
            # aiormq cancels pending confirms when the connection drops; only a
            # cancellation of our own task is a real one.
            if not foreign_cancel(exc):
                raise
            raise BrokerUnavailable(f"publish to {routing_key!r} lost with the connection") from exc

    async def send(self, message: aio_pika.abc.AbstractMessage, routing_key: str) -> None:
        """Publish on the default exchange without waiting for a confirm (best-effort messages: replies)."""
        if not self.connected:
            raise BrokerUnavailable("not connected to RabbitMQ (reconnecting)")
        try:
            if self._sender is None or self._sender.is_closed:
                self._sender = await asyncio.wait_for(self._connection.channel(publisher_confirms=False), self.settings.connect_timeout_s)
            await self._sender.default_exchange.publish(message, routing_key, mandatory=False)
        except (*_UNAVAILABLE, RuntimeError, aiormq.exceptions.AMQPError, asyncio.CancelledError) as exc:
            if isinstance(exc, asyncio.CancelledError) and not foreign_cancel(exc):
                raise
            raise BrokerUnavailable(f"send to {routing_key!r} failed: {exc!r}") from exc

    async def _ensure_publisher(self) -> None:
        # aio-pika does not always reopen a confirming channel that had publishes
        # in flight when the connection dropped; open a fresh one then.
        if self._publisher is not None and not self._publisher.is_closed:
            return
        async with self._reopen_lock:
            if self._publisher is None or self._publisher.is_closed:
                log.info("%s: reopening the publishing channel", self.name)
                self._publisher = await asyncio.wait_for(
                    self._connection.channel(publisher_confirms=True, on_return_raises=True), self.settings.connect_timeout_s
                )
                self._exchanges.clear()

    async def _exchange(self, name: str) -> aio_pika.abc.AbstractExchange:
        if name == "":
            return self.publisher.default_exchange
        exchange = self._exchanges.get(name)
        if exchange is None:
            exchange = await self.publisher.get_exchange(name, ensure=False)
            self._exchanges[name] = exchange
        return exchange

    async def aclose(self) -> None:
        """Close the connection; safe to call twice."""
        if self.state == "closed":
            return
        self.state = "closed"
        connection, self._connection, self._publisher = self._connection, None, None
        if connection is not None:
            try:
                await asyncio.wait_for(connection.close(), self.settings.connect_timeout_s)
            except _UNAVAILABLE as exc:
                log.debug("closing %s: %r", self.name, exc)
