"""A robust RabbitMQ connection with a confirming publisher.

Errors of aio-pika/aiormq are translated here into :mod:`inferq.errors`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import aio_pika
import aiormq

from inferq.broker.cancellation import cancel_requested
from inferq.broker.failover import FailoverConnection, connect_first
from inferq.errors import BrokerRejected, BrokerUnavailable, Unroutable
from inferq.settings import BrokerSettings, mask_url

log = logging.getLogger("inferq.broker")

# "The broker is away": everything aio-pika/aiormq raise when the connection or a
# channel is gone or going. aio-pika raises a bare RuntimeError ("Connection was not
# opened", "... closed") while it reconnects, and ChannelInvalidStateError is one too.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    RuntimeError,
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.AMQPChannelError,
)


def foreign_cancel(exc: BaseException) -> bool:
    """Whether a CancelledError came from aiormq failing a pending frame (connection lost), not from cancelling us."""
    task = asyncio.current_task()
    return isinstance(exc, asyncio.CancelledError) and task is not None and cancel_requested(task) is False


@contextlib.asynccontextmanager
async def unavailable_as_error(what: str) -> AsyncIterator[None]:
    """Re-raise a lost connection as BrokerUnavailable.

    aiormq fails pending frames with a CancelledError when the connection
    drops; only a cancellation of our own task is a real one and propagates.
    """
    try:
        yield
    except asyncio.CancelledError as exc:
        if not foreign_cancel(exc):
            raise
        raise BrokerUnavailable(f"{what}: lost with the connection") from exc
    except CONNECTION_ERRORS as exc:
        raise BrokerUnavailable(f"{what} failed: {exc!r}") from exc


@contextlib.asynccontextmanager
async def tolerant(what: str, level: int = logging.DEBUG) -> AsyncIterator[None]:
    """Swallow a lost connection (logged at ``level``): for work the broker redoes anyway (closing, settling)."""
    try:
        async with unavailable_as_error(what):
            yield
    except BrokerUnavailable as exc:
        log.log(level, "%s", exc)


async def close_channel(channel: aio_pika.abc.AbstractChannel | None, what: str) -> None:
    """Close a channel if it is open; a broker already gone is fine (its work is redelivered anyway)."""
    if channel is None or channel.is_closed:
        return
    async with tolerant(f"closing the {what} channel"):
        await asyncio.wait_for(channel.close(), 5)


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
        return f"<BrokerConnection {self.name} {self.url} {self.state}>"

    @property
    def url(self) -> str:
        """The node in use (password masked); with ``broker.urls``, it changes on failover."""
        if isinstance(self._connection, FailoverConnection):
            return self._connection.current_url
        return mask_url(self.settings.addresses[0])

    @classmethod
    async def open(cls, settings: BrokerSettings, name: str) -> BrokerConnection:
        """Connect to the first of ``settings.addresses`` that answers (each try bounded by
        ``connect_timeout_s``) and open the publishing channel; on a later loss, fail over to the next."""
        self = cls(settings, name)
        timeout = settings.connect_timeout_s
        try:
            self._connection = await connect_first(
                settings.addresses, name, timeout=timeout, heartbeat_s=settings.heartbeat_s,
                reconnect_interval_s=settings.reconnect_interval_s, reconnect_ceiling_s=settings.reconnect_max_interval_s,
            )
            self._publisher = await asyncio.wait_for(self._connection.channel(publisher_confirms=True, on_return_raises=True), timeout)
        except CONNECTION_ERRORS as exc:
            await self.aclose()
            where = ", ".join(mask_url(u) for u in settings.addresses)
            raise BrokerUnavailable(f"cannot connect to RabbitMQ at {where}: {exc!r}") from exc
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
        if self._connection is None:
            raise BrokerUnavailable(f"{self.name} is closed")
        async with unavailable_as_error("opening a channel"):
            channel = await asyncio.wait_for(self._connection.channel(), self.settings.connect_timeout_s)
            if prefetch:
                await channel.set_qos(prefetch_count=prefetch)
        return channel

    async def raw_channel(self, prefetch: int) -> aiormq.abc.AbstractChannel:
        """A plain aiormq channel on the current connection, which nothing reopens after a reconnect.

        For a consumer that must choose where to resume (a stream tail):
        aio-pika's robust restore would consume again with the first arguments.
        """
        transport = self._connection.transport if self._connection is not None else None
        if transport is None or not self.connected:
            raise BrokerUnavailable("not connected to RabbitMQ (reconnecting)")
        async with unavailable_as_error("opening a channel"):
            channel = await asyncio.wait_for(transport.connection.channel(publisher_confirms=False),
                                             self.settings.connect_timeout_s)
            try:
                await asyncio.wait_for(channel.basic_qos(prefetch_count=prefetch), self.settings.connect_timeout_s)
            except BaseException:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(channel.close(), self.settings.connect_timeout_s)
                raise
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
            async with unavailable_as_error("counting a queue"):
                raw = await channel.get_underlay_channel()
                ok = await asyncio.wait_for(raw.queue_declare(queue, passive=True), self.settings.connect_timeout_s)
            return ok.message_count, ok.consumer_count
        except BrokerUnavailable:  # a missing queue closes the channel (NOT_FOUND) as well
            return None
        finally:
            await close_channel(channel, "queue-count")

    @property
    def publisher(self) -> aio_pika.abc.AbstractChannel:
        """The confirming channel (for declarations too)."""
        if self._publisher is None:
            raise BrokerUnavailable(f"{self.name} is closed")
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
            async with unavailable_as_error(f"publish to {routing_key!r}"):
                await self._ensure_publisher()
                target = await self._exchange(exchange)
                await asyncio.wait_for(target.publish(message, routing_key, mandatory=mandatory), timeout)
        except aiormq.exceptions.PublishError as exc:
            raise Unroutable(f"no queue is bound for {exchange!r} / {routing_key!r}") from exc
        except aiormq.exceptions.DeliveryError as exc:
            raise BrokerRejected(f"the broker refused the message for {routing_key!r} (queue full?)") from exc

    async def send(self, message: aio_pika.abc.AbstractMessage, routing_key: str) -> None:
        """Publish on the default exchange without waiting for a confirm (best-effort messages: replies)."""
        if not self.connected:
            raise BrokerUnavailable("not connected to RabbitMQ (reconnecting)")
        async with unavailable_as_error(f"send to {routing_key!r}"):
            if self._sender is None or self._sender.is_closed:
                self._sender = await asyncio.wait_for(self._connection.channel(publisher_confirms=False), self.settings.connect_timeout_s)
            await asyncio.wait_for(self._sender.default_exchange.publish(message, routing_key, mandatory=False), self.settings.publish_timeout_s)

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
            async with tolerant(f"closing {self.name}"):
                await asyncio.wait_for(connection.close(), self.settings.connect_timeout_s)

