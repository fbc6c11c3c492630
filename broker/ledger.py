"""The job ledger: every job event goes to a RabbitMQ stream, read by every edge.

:class:`LedgerWriter` coalesces the events of concurrent writers into one
confirmed stream message (bounded in events and bytes), so per-job broker
overhead stays low under load while a lone write still goes out at once.
Readers follow the stream with :class:`inferq.broker.tail.LedgerTail`.
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass

import aio_pika

from inferq.broker.cancellation import cancel_requested
from inferq.broker.connection import BrokerConnection
from inferq.broker.messages import JobEvent, join_packed_events, pack_event
from inferq.errors import BrokerError, BrokerUnavailable, EventTooLarge

MAX_EVENTS_PER_MESSAGE = 512
MAX_IN_FLIGHT = 4
ARRAY_HEADER_BYTES = 5  # msgpack's list header, at most


class LedgerWriter:
    """Confirmed, coalescing writes to one stream. Build with :meth:`open`; :meth:`aclose` stops it.

    A stream message carries at most ``MAX_EVENTS_PER_MESSAGE`` events and
    ``broker.ledger_batch_bytes`` bytes; a larger write is split over several
    messages. An event bigger than ``broker.max_message_bytes`` can never be
    stored: :meth:`write` refuses it with EventTooLarge, so the caller can
    fail that job (``output_too_large``) instead of retrying for ever.
    """

    def __init__(self, connection: BrokerConnection, stream: str, batch_bytes: int | None = None,
                 max_bytes: int | None = None) -> None:
        self._connection = connection
        self._stream = stream
        self.batch_bytes = batch_bytes or connection.settings.ledger_batch_bytes
        self.max_bytes = max_bytes or connection.settings.max_message_bytes
        self._pending: collections.deque[_Chunk] = collections.deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.messages_written = 0

    @classmethod
    async def open(cls, connection: BrokerConnection, stream: str, batch_bytes: int | None = None,
                   max_bytes: int | None = None) -> LedgerWriter:
        """Start the flusher; writes go out from now on."""
        self = cls(connection, stream, batch_bytes, max_bytes)
        self._task = asyncio.create_task(self._flush_forever(), name=f"ledger-writer:{stream}")
        return self

    async def write(self, events: list[JobEvent]) -> None:
        """Return once the broker has confirmed ``events``; raise BrokerError if not.

        Raises EventTooLarge, and writes none of ``events``, if any one of them
        is over the broker's message limit; its ``job_ids`` names those jobs.
        """
        await self.enqueue(events)

    def enqueue(self, events: list[JobEvent]) -> asyncio.Future[None]:
        """Queue ``events`` now and return the future of their confirm (what :meth:`write` awaits).

        The queue is this writer's order in the stream: events queued by one
        call go before those of any later call, confirmed or not. So a caller
        need not wait for one write's confirm to keep a later write behind it.
        Raises EventTooLarge (queuing nothing) and BrokerUnavailable at once.
        """
        loop = asyncio.get_running_loop()
        if not events:
            done: asyncio.Future[None] = loop.create_future()
            done.set_result(None)
            return done
        if self._task is None or self._task.done():
            raise BrokerUnavailable("ledger writer is closed")
        packed = [pack_event(e) for e in events]
        too_big = tuple(e.job_id for e, p in zip(events, packed) if len(p) + ARRAY_HEADER_BYTES > self.max_bytes)
        if too_big:
            raise EventTooLarge(
                f"{len(too_big)} job event(s) over the broker's {self.max_bytes} byte message limit "
                f"(broker.max_message_bytes), e.g. job {too_big[0]}", too_big)
        futures = []
        for chunk in self._chunks(packed):
            future: asyncio.Future[None] = loop.create_future()
            self._pending.append(_Chunk(chunk, sum(map(len, chunk)), future))
            futures.append(future)
        self._wake.set()
        return futures[0] if len(futures) == 1 else asyncio.ensure_future(_all_confirmed(futures))

    def _chunks(self, packed: list[bytes]) -> list[list[bytes]]:
        # One caller's events split into pieces that each fit a message (an event over
        # the budget but under the broker's limit goes alone).
        chunks: list[list[bytes]] = [[]]
        size = 0
        for item in packed:
            if chunks[-1] and (size + len(item) > self.batch_bytes or len(chunks[-1]) >= MAX_EVENTS_PER_MESSAGE):
                chunks.append([])
                size = 0
            chunks[-1].append(item)
            size += len(item)
        return chunks

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

    def _take(self) -> list[_Chunk]:
        taken: list[_Chunk] = []
        count = size = 0
        while self._pending:
            head = self._pending[0]
            if taken and (count + len(head.packed) > MAX_EVENTS_PER_MESSAGE or size + head.size > self.batch_bytes):
                break
            taken.append(self._pending.popleft())
            count, size = count + len(head.packed), size + head.size
        return taken

    async def _flush(self, batch: list[_Chunk]) -> None:
        body = join_packed_events([p for chunk in batch for p in chunk.packed])
        message = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
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
                if cancel_requested(asyncio.current_task()):
                    raise
        _settle(list(self._pending), BrokerUnavailable("ledger writer closed"))
        self._pending.clear()


@dataclass(frozen=True)
class _Chunk:
    """Packed events of one write that go into one message, and the future their writer awaits."""

    packed: list[bytes]
    size: int
    future: asyncio.Future[None]


async def _all_confirmed(futures: list[asyncio.Future[None]]) -> None:
    # Every chunk settles (confirmed, refused, or failed on close), so this always ends; the first error wins.
    results = await asyncio.gather(*futures, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


def _settle(batch: list[_Chunk], error: BaseException | None) -> None:
    for chunk in batch:
        if not chunk.future.done():
            if error is None:
                chunk.future.set_result(None)
            else:
                chunk.future.set_exception(error)
