"""Reading one message back from a stream by its offset.

The ledger stream already holds every result, replicated and retained by
age and bytes, so an edge need not keep large results in memory: it keeps
the offset of the message that carries one and reads that message again
when a client asks (:class:`inferq.edge.results.ResultReader`).
"""

from __future__ import annotations

import asyncio

import aiormq

from inferq.broker.connection import BrokerConnection, tolerant, unavailable_as_error
from inferq.broker.tail import OFFSET_HEADER
from inferq.errors import BrokerUnavailable, ResultExpired


# A stream delivers from the start of the chunk that holds the offset: the messages before it are acked
# and skipped, one at a time. Prefetch 1, because the broker keeps sending what follows until the channel
# closes: with 32, reading one 4 MB result also shipped the next 31 (p50 317 ms a read; 2: 62 ms; 1: 51 ms).
PREFETCH = 1


class StreamRecall:
    """Reads single messages of one stream by offset, each on a short-lived channel of its own."""

    def __init__(self, connection: BrokerConnection, stream: str, timeout_s: float) -> None:
        self._connection = connection
        self._stream = stream
        self._timeout_s = timeout_s
        self.reads = 0

    async def read(self, offset: int) -> bytes:
        """The body of the message at ``offset``.

        Raises ResultExpired when the stream's retention has dropped it (the
        stream then starts past it), BrokerUnavailable when the broker does not
        answer within the timeout.
        """
        channel = await self._connection.raw_channel(PREFETCH)
        found: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        try:
            async with unavailable_as_error(f"reading offset {offset} of stream {self._stream}"):
                await asyncio.wait_for(channel.basic_consume(self._stream, _Seeker(channel, offset, found),
                                                             arguments={"x-stream-offset": offset}), self._timeout_s)
            try:
                body = await asyncio.wait_for(asyncio.shield(found), self._timeout_s)
            except TimeoutError:
                raise BrokerUnavailable(f"offset {offset} of stream {self._stream} was not delivered within "
                                        f"{self._timeout_s:g} s") from None
            self.reads += 1
            return body
        finally:
            if not found.done():
                found.cancel()
            elif not found.cancelled():
                found.exception()  # retrieved: a caller that gave up must not leave it unobserved
            await _close(channel)


class _Seeker:
    """The consumer callback: skips (acks) what comes before ``offset``, resolves ``found`` at it or past it."""

    def __init__(self, channel: aiormq.abc.AbstractChannel, offset: int, found: asyncio.Future[bytes]) -> None:
        self._channel = channel
        self._offset = offset
        self._found = found

    async def __call__(self, message: aiormq.abc.DeliveredMessage) -> None:
        at = (message.header.properties.headers or {}).get(OFFSET_HEADER)
        if self._found.done() or not isinstance(at, int):
            return
        if at > self._offset:  # the stream starts after it: retention took it
            self._found.set_exception(ResultExpired(
                f"the ledger no longer holds offset {self._offset} (it starts at {at}): the result is past the "
                "stream's retention (jobs.ledger_max_bytes, jobs.ttl_s)"))
        elif at == self._offset:
            self._found.set_result(message.body)
        else:
            async with tolerant("acking a skipped stream message"):
                await self._channel.basic_ack(message.delivery.delivery_tag, wait=False)


async def _close(channel: aiormq.abc.AbstractChannel) -> None:
    if channel.is_closed:
        return
    async with tolerant("closing a stream read's channel"):
        await asyncio.wait_for(channel.close(), 5)
