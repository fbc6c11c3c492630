"""The job ledger: every job event goes to a RabbitMQ stream, read by every edge.

:class:`LedgerWriter` coalesces the events of concurrent writers into one
confirmed stream message, so per-job broker overhead stays low under load while
a lone write still goes out at once. :class:`LedgerTail` reads the stream
from its start (the retention window) and hands event lists to a callback.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable

import aio_pika

from broker.connection import BrokerConnection, close_channel
from broker.messages import JobEvent, pack_events, unpack_events
from runtime.errors import BrokerError, BrokerUnavailable, CodecError

log = logging.getLogger("inferq.ledger")

MAX_EVENTS_PER_MESSAGE = 512
MAX_IN_FLIGHT = 4
MARKER_HEADER = "x-inferq-marker"


class LedgerWriter:
    """Confirmed, coalescing writes to one stream. Use as ``async with``."""

    def __init__(self, connection: BrokerConnection, stream: str) -> None:
        self._connection = connection
        self._stream = stream
        self._pending: list[tuple[list[JobEvent], asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.messages_written = 0

    async def __aenter__(self) -> LedgerWriter:
        self._task = asyncio.create_task(self._flush_forever(), name=f"ledger-writer:{self._stream}")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def write(self, events: list[JobEvent]) -> None:
        """Return once the broker has confirmed ``events``; raise BrokerError if not."""
        if not events:
            return
        if self._task is None or self._task.done():
            raise BrokerUnavailable("ledger writer is closed")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((events, future))
        self._wake.set()
        await future

    async def _flush_forever(self) -> None:
        # Up to MAX_IN_FLIGHT messages await their confirm at once; writes that arrive
        # meanwhile are coalesced into the next message.
        in_flight: set[asyncio.Task[None]] = set()
        slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._pending:
                    await slots.acquire()
                    task = asyncio.create_task(self._flush(self._take()))
                    in_flight.add(task)
                    task.add_done_callback(lambda t: (in_flight.discard(t), slots.release()))
        finally:
            for task in in_flight:
                task.cancel()
            await asyncio.gather(*in_flight, return_exceptions=True)

    def _take(self) -> list[tuple[list[JobEvent], asyncio.Future[None]]]:
        taken, count = [], 0
        while self._pending and (not taken or count + len(self._pending[0][0]) <= MAX_EVENTS_PER_MESSAGE):
            item = self._pending.pop(0)
            taken.append(item)
            count += len(item[0])
        return taken

    async def _flush(self, batch: list[tuple[list[JobEvent], asyncio.Future[None]]]) -> None:
        events = [e for evs, _ in batch for e in evs]
        message = aio_pika.Message(pack_events(events), delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        try:
            await self._connection.publish(message, self._stream, mandatory=True)
        except asyncio.CancelledError:
            _settle(batch, BrokerUnavailable("ledger writer closed"))
            raise
        except Exception as exc:  # the flusher must outlive any failure: each writer learns of it instead
            _settle(batch, exc if isinstance(exc, BrokerError) else BrokerUnavailable(f"ledger write failed: {exc!r}"))
            return
        self.messages_written += 1
        _settle(batch, None)

    async def aclose(self) -> None:
        """Stop the flusher; pending writes fail with BrokerUnavailable. Idempotent."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                if asyncio.current_task().cancelling():
                    raise
        for _, future in self._pending:
            if not future.done():
                future.set_exception(BrokerUnavailable("ledger writer closed"))
        self._pending.clear()


def _settle(batch: list[tuple[list[JobEvent], asyncio.Future[None]]], error: BaseException | None) -> None:
    for _, future in batch:
        if not future.done():
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)


EventHandler = Callable[[list[JobEvent]], Awaitable[None] | None]


class LedgerTail:
    """Consumes a stream from ``offset`` ("first", "last", "next" or a timestamp)."""

    def __init__(self, connection: BrokerConnection, stream: str, handler: EventHandler, offset: object = "first") -> None:
        self._connection = connection
        self._stream = stream
        self._handler = handler
        self._offset = offset
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._markers: dict[str, asyncio.Future[None]] = {}
        self._round: asyncio.Future[None] | None = None
        self._rounds: set[asyncio.Task[None]] = set()
        self.messages_read = 0

    @classmethod
    async def start(cls, connection: BrokerConnection, stream: str, handler: EventHandler, offset: object = "first") -> LedgerTail:
        """Begin consuming; events arrive at ``handler`` from now on."""
        self = cls(connection, stream, handler, offset)
        self._channel = await connection.channel(prefetch=2000)
        try:
            # Declared (passively) and held on self: aio-pika restores only such queues after a reconnect.
            self._queue = await self._channel.declare_queue(stream, passive=True)
            await self._queue.consume(self._on_message, arguments={"x-stream-offset": offset})
        except (aio_pika.exceptions.AMQPError, OSError) as exc:
            await self.aclose()
            raise BrokerUnavailable(f"cannot read stream {stream}: {exc!r}") from exc
        return self

    def sync(self) -> asyncio.Future[None]:
        """Resolve once everything confirmed in the stream before this call has been handled.

        A marker message goes into the stream and we wait to read it back:
        streams keep one order, so whatever was confirmed earlier, by any
        process, comes before it. Callers within one loop tick share a marker.
        """
        if self._round is None:
            self._round = asyncio.get_running_loop().create_future()
            task = asyncio.create_task(self._send_marker(), name=f"ledger-sync:{self._stream}")
            self._rounds.add(task)
            task.add_done_callback(self._rounds.discard)
        return asyncio.shield(self._round)

    async def _send_marker(self) -> None:
        future, self._round = self._round, None
        marker = uuid.uuid4().hex
        self._markers[marker] = future
        message = aio_pika.Message(b"", headers={MARKER_HEADER: marker})
        try:
            await self._connection.publish(message, self._stream)
        except BrokerError as exc:
            self._markers.pop(marker, None)
            future.set_exception(exc)
            future.exception()  # retrieved here: callers may have given up waiting

    async def _on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        marker = (message.headers or {}).get(MARKER_HEADER)
        if marker is not None:
            future = self._markers.pop(str(marker), None)
            if future is not None and not future.done():
                future.set_result(None)
            await message.ack()
            return
        try:
            events = unpack_events(message.body)
        except CodecError as exc:
            log.warning("skipping a malformed message in %s: %s", self._stream, exc)
            events = []
        self.messages_read += 1
        if events:
            result = self._handler(events)
            if result is not None:
                await result
        await message.ack()

    async def __aenter__(self) -> LedgerTail:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop consuming; idempotent."""
        for task in list(self._rounds):
            task.cancel()
        await asyncio.gather(*self._rounds, return_exceptions=True)
        for future in self._markers.values():
            if not future.done():
                future.set_exception(BrokerUnavailable("ledger reader closed"))
                future.exception()
        self._markers.clear()
        channel, self._channel = self._channel, None
        await close_channel(channel, "stream")
