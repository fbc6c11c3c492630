"""Following the job ledger: :class:`LedgerTail` reads a stream in order and knows how far it got.

It starts at a given offset (a fresh edge: now minus the retention), resumes
after the last message it handled when it is interrupted, and tells whether
it has caught up. :meth:`LedgerTail.sync` waits until everything written to
the stream before the call has been handled (read-your-writes across edges).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import aio_pika
import aiormq

from inferq.broker.cancellation import cancel_requested
from inferq.broker.connection import BrokerConnection, tolerant, unavailable_as_error
from inferq.broker.messages import unpack_events
from inferq.broker.ratelog import RateLimitedLog
from inferq.errors import BrokerError, BrokerUnavailable, CodecError

log = logging.getLogger("inferq.ledger")

MARKER_HEADER = "x-inferq-marker"
OFFSET_HEADER = "x-stream-offset"  # set by RabbitMQ on every message a stream delivers
PREFETCH = 2000
MARKER_TIMEOUT_S = 30.0  # a marker never read back (stream deleted meanwhile) frees its slot after this
RESUBSCRIBE_MAX_S = 5.0
RESUME_MARGIN_S = 30.0  # read again before the newest event seen, when resuming by time (writers' clocks differ)


EventHandler = Callable[..., Awaitable[None] | None]  # (events) or, with_offset, (events, offset)


def retention_start(retention_s: float) -> datetime.datetime:
    """The stream offset where a fresh reader of the ledger starts: a timestamp, now minus the retention."""
    return datetime.datetime.fromtimestamp(time.time() - retention_s, datetime.timezone.utc)


class LedgerTail:
    """Follows a stream and hands each message's events to ``handler``, in stream order.

    The first subscription starts at ``offset`` ("first", "last", "next", a
    number or a timestamp). The tail remembers the stream offset of the last
    message it handled, and after a lost connection it subscribes again from
    the next offset, on a plain channel it opens itself: aio-pika's robust
    restore would consume again with the original arguments and replay the
    whole stream. When the broker cancels the consumer (the stream was
    deleted, or its member moved), offsets may start again in a new stream,
    so it resumes by time instead, a margin before the newest event it saw.

    :attr:`caught_up` is false from each (re)subscription until a sync marker
    written after it has been read back; until then the handler's view lags.
    """

    def __init__(self, connection: BrokerConnection, stream: str, handler: EventHandler, offset: object = "first",
                 prefetch: int = PREFETCH, with_offset: bool = False) -> None:
        self._connection = connection
        self._with_offset = with_offset  # the handler also gets each message's stream offset
        self._stream = stream
        self._handler = handler
        self._start = offset
        self._prefetch = prefetch
        self.offset: int | None = None  # of the last message handled
        self._newest_ts: float | None = None  # of the newest event handled
        self._by_time = False  # resume by time, not offset: the stream may have been recreated
        self._session: _Session | None = None
        self._caught_up = asyncio.Event()
        self._closed = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._catching_up: asyncio.Task[None] | None = None
        self._next_round: asyncio.Future[None] | None = None
        self._markers: dict[str, asyncio.Future[None]] = {}  # at most one: one marker in flight at a time
        self._marker_wake = asyncio.Event()
        self._inbox: asyncio.Queue[aiormq.abc.DeliveredMessage] = asyncio.Queue()  # at most a prefetch's worth
        self._retry_log = RateLimitedLog(log)
        self._handler_log = RateLimitedLog(log)
        self.messages_read = 0
        self.markers_sent = 0
        self.subscriptions = 0
        self.malformed = 0  # events skipped as malformed (counted, not logged each time: anyone may write here)

    @classmethod
    async def open(cls, connection: BrokerConnection, stream: str, handler: EventHandler, offset: object = "first",
                   prefetch: int = PREFETCH, with_offset: bool = False) -> LedgerTail:
        """Begin consuming; events arrive at ``handler`` from now on. Raises BrokerUnavailable if it cannot.

        With ``with_offset`` the handler is called ``handler(events, offset)``, ``offset`` being the
        stream offset of the message that carried them (what :mod:`inferq.broker.recall` reads back).
        """
        self = cls(connection, stream, handler, offset, prefetch, with_offset)
        self._spawn(self._send_markers(), "markers")
        self._spawn(self._process(), "process")
        try:
            await self._subscribe()
        except BrokerUnavailable:
            await self.aclose()
            raise
        self._spawn(self._follow(), "follow")
        return self

    @property
    def caught_up(self) -> bool:
        """Whether everything in the stream up to a recent sync marker has been handled."""
        return self._caught_up.is_set()

    async def wait_caught_up(self) -> None:
        """Return once :attr:`caught_up` (callers bound the wait)."""
        await self._caught_up.wait()

    def _spawn(self, coro: Coroutine[Any, Any, None], what: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=f"ledger-tail-{what}:{self._stream}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _resume_point(self) -> object:
        if not self._by_time:
            return self._start if self.offset is None else self.offset + 1
        # The stream may be a new one whose offsets start again: go by time, accept every offset,
        # and read a margin twice (handlers are idempotent) rather than miss anything.
        self.offset = None
        if self._newest_ts is None:
            return self._start
        return datetime.datetime.fromtimestamp(self._newest_ts - RESUME_MARGIN_S, datetime.timezone.utc)

    async def _subscribe(self) -> None:
        channel = await self._connection.raw_channel(self._prefetch)
        session = _Session(channel, asyncio.get_running_loop().create_future())
        tag = f"ledger-tail.{uuid.uuid4().hex}"
        cancels = getattr(channel, "on_consumer_cancel_callbacks", None)
        if cancels is not None:  # aiormq 7; on Python 3.10 (aiormq 6) a broker-side cancel is seen only when the channel closes
            cancels.add(lambda frame: self._stop(session, "the broker cancelled the consumer", True)
                        if frame.consumer_tag == tag else None)
        channel.closing.add_done_callback(lambda _: self._stop(session, "its channel closed"))
        start = self._resume_point()
        try:
            async with unavailable_as_error(f"consuming stream {self._stream}"):
                await asyncio.wait_for(channel.basic_consume(
                    self._stream, self._deliver, consumer_tag=tag, arguments={"x-stream-offset": start}),
                    self._connection.settings.connect_timeout_s)
        except BrokerUnavailable:
            await _close_raw(channel)
            raise
        self._session, self._by_time = session, False
        self.subscriptions += 1
        self._caught_up.clear()
        log.debug("%s: consuming from %s", self._stream, start)
        self._catching_up = self._spawn(self._catch_up(session), "catch-up")

    def _stop(self, session: _Session, reason: str, by_time: bool = False) -> None:
        if not session.ended.done():
            self._by_time = self._by_time or by_time
            session.ended.set_result(reason)

    async def _follow(self) -> None:
        while self._session is not None:
            _raise_if_cancelling()
            session = self._session
            reason = await session.ended
            self._caught_up.clear()
            if self._catching_up is not None:
                self._catching_up.cancel()
            log.warning("%s: the stream consumer stopped (%s); subscribing again %s", self._stream, reason,
                        "by time" if self._by_time else f"after offset {self.offset}")
            await _close_raw(session.channel)
            self._session = None
            await self._subscribe_again()

    async def _subscribe_again(self) -> None:
        delay = 0.1
        while True:
            _raise_if_cancelling()
            await asyncio.sleep(delay)
            try:
                await self._subscribe()
                return
            except BrokerUnavailable as exc:
                self._retry_log.warning("%s: cannot subscribe again yet: %s", self._stream, exc)
                delay = min(delay * 2, RESUBSCRIBE_MAX_S)

    async def _catch_up(self, session: _Session) -> None:
        first = self.offset
        while not session.ended.done():
            try:
                await self.sync()
            except _MarkerLost:
                if self.offset == first:  # nothing at all delivered: an offset past the end of a recreated stream
                    self._stop(session, "nothing delivered since subscribing", True)
                    return
                continue
            except BrokerError as exc:
                log.debug("%s: catch-up marker failed (%s); again", self._stream, exc)
                await asyncio.sleep(0.5)
                continue
            if not session.ended.done():
                self._caught_up.set()
                log.info("%s: caught up at offset %s (%d messages read)", self._stream, self.offset, self.messages_read)
            return

    def sync(self) -> asyncio.Future[None]:
        """Resolve once everything confirmed in the stream before this call has been handled.

        A marker message goes into the stream and we wait to read it back:
        streams keep one order, so whatever was confirmed earlier, by any
        process, comes before it. One marker is in flight at a time, and every
        caller meanwhile shares the next one: a flood of callers costs one
        stream write per round trip, never one per call.
        """
        if self._closed:
            future = asyncio.get_running_loop().create_future()
            future.set_exception(BrokerUnavailable("ledger reader closed"))
            return future
        if self._next_round is None:
            self._next_round = asyncio.get_running_loop().create_future()
            self._marker_wake.set()
        return asyncio.shield(self._next_round)

    async def _send_markers(self) -> None:
        while True:
            _raise_if_cancelling()
            await self._marker_wake.wait()
            self._marker_wake.clear()
            while self._next_round is not None:
                future, self._next_round = self._next_round, None
                await self._marker_round(future)

    async def _marker_round(self, future: asyncio.Future[None]) -> None:
        marker = uuid.uuid4().hex
        self._markers[marker] = future
        try:
            await self._connection.publish(aio_pika.Message(b"", headers={MARKER_HEADER: marker}), self._stream)
            self.markers_sent += 1
            # asyncio.wait, not wait_for: on Python 3.11 wait_for swallows a cancellation that
            # arrives as the marker comes back, and this loop would then never stop.
            await asyncio.wait([future], timeout=MARKER_TIMEOUT_S)
            _fail(future, _MarkerLost(f"sync marker not read back from {self._stream} within {MARKER_TIMEOUT_S:g} s"))
        except BrokerError as exc:
            _fail(future, exc)
        finally:
            self._markers.pop(marker, None)

    async def _deliver(self, message: aiormq.abc.DeliveredMessage) -> None:
        # aiormq calls this in a task per delivery; one task of ours handles them in order.
        self._inbox.put_nowait(message)

    async def _process(self) -> None:
        while True:
            message = await self._inbox.get()
            await self._on_message(message)
            # A replay is thousands of messages at once: let requests and broker calls in between.
            await asyncio.sleep(0)

    async def _on_message(self, message: aiormq.abc.DeliveredMessage) -> None:
        headers = message.header.properties.headers or {}
        offset = headers.get(OFFSET_HEADER)
        if isinstance(offset, int) and not isinstance(offset, bool):
            if self.offset is not None and offset <= self.offset:
                await _ack(message)  # seen before the resubscription
                return
            self.offset = offset
        marker = headers.get(MARKER_HEADER)
        if marker is not None:
            future = self._markers.get(str(marker))
            if future is not None and not future.done():
                future.set_result(None)
        else:
            await self._handle(message.body)
        await _ack(message)

    async def _handle(self, body: bytes) -> None:
        try:
            events, bad = unpack_events(body)
        except CodecError as exc:
            events, bad = [], 1
            self._handler_log.warning("skipping a malformed message in %s: %s", self._stream, exc)
        self.malformed += bad
        self.messages_read += 1
        if not events:
            return
        newest = max(e.ts for e in events)
        if newest < time.time() + 60:  # a writer's clock far ahead must not move the resume point past real events
            self._newest_ts = max(self._newest_ts or newest, newest)
        try:
            result = self._handler(events, self.offset) if self._with_offset else self._handler(events)
            if result is not None:
                await result
        except Exception:  # a handler bug must not stop the tail (its message would stay unacked)
            self._handler_log.log(logging.ERROR, "%s: the event handler failed", self._stream, exc_info=True)

    async def aclose(self) -> None:
        """Stop consuming; idempotent."""
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for future in [*self._markers.values(), *([self._next_round] if self._next_round else [])]:
            _fail(future, BrokerUnavailable("ledger reader closed"))
        self._markers.clear()
        self._next_round = None
        session, self._session = self._session, None
        if session is not None:
            await _close_raw(session.channel)


@dataclass(frozen=True)
class _Session:
    """One subscription: its channel, and a future that resolves (with the reason) when it ends."""

    channel: aiormq.abc.AbstractChannel
    ended: asyncio.Future[str]


class _MarkerLost(BrokerUnavailable):
    """A sync marker was not read back in time."""


def _raise_if_cancelling() -> None:
    # A cancellation that a wait_for inside an awaited call swallowed (Python 3.11) is honoured here.
    task = asyncio.current_task()
    if task is not None and cancel_requested(task):
        raise asyncio.CancelledError


def _fail(future: asyncio.Future[None], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
        future.exception()  # retrieved here: callers may have given up waiting


async def _ack(message: aiormq.abc.DeliveredMessage) -> None:
    async with tolerant("acking a stream message"):
        await message.channel.basic_ack(message.delivery.delivery_tag, wait=False)


async def _close_raw(channel: aiormq.abc.AbstractChannel) -> None:
    if channel.is_closed:
        return
    async with tolerant("closing a stream channel"):
        await asyncio.wait_for(channel.close(), 5)
