"""Acks in delivery order, one ``multiple`` ack per run of finished deliveries.

Acking each job costs a frame per job; one ``basic.ack(multiple=True)`` covers
a whole run. It is only safe up to the first delivery still being worked on
(a multiple ack would settle it too), so deliveries are acked in the order the
channel delivered them, and never across a channel change (after a reconnect,
delivery tags start again).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Iterable
from typing import Any

import aio_pika

from broker.connection import foreign_cancel

log = logging.getLogger("inferq.acks")

Delivery = aio_pika.abc.AbstractIncomingMessage
SETTLE_ERRORS = (aio_pika.exceptions.AMQPError, aio_pika.exceptions.MessageProcessError, OSError, RuntimeError)


class AckTracker:
    """Every delivery is :meth:`track`-ed on arrival and :meth:`finish`-ed once its result is durable."""

    def __init__(self) -> None:
        self._order: deque[tuple[Delivery, int]] = deque()
        self._finished: dict[int, bool] = {}  # id(delivery) -> does it still need an ack?
        self._tracked: set[int] = set()
        # Frames of concurrent finish() calls could otherwise reach the socket out of tag order
        # (an earlier multiple ack after a later one is an unknown tag: the channel closes).
        self._lock = asyncio.Lock()

    def __len__(self) -> int:
        return len(self._order)

    def track(self, delivery: Delivery) -> None:
        """Note a delivery as it arrives; its channel is read now, while it is open."""
        self._order.append((delivery, id(delivery.channel)))
        self._tracked.add(id(delivery))

    async def finish(self, acked: Iterable[Delivery] = (), settled: Iterable[Delivery] = ()) -> None:
        """``acked`` are done and need an ack; ``settled`` were rejected or requeued one by one already."""
        # Only deliveries still waiting count: a finished one's id may belong to a new message by now.
        for delivery in acked:
            if id(delivery) in self._tracked:
                self._finished[id(delivery)] = True
        for delivery in settled:
            if id(delivery) in self._tracked:
                self._finished[id(delivery)] = False
        async with self._lock:
            for last in self._pop_runs():
                await ack(last, multiple=True)

    def pending(self, deliveries: Iterable[Delivery]) -> list[Delivery]:
        """Those of ``deliveries`` not finished yet."""
        return [d for d in deliveries if id(d) in self._tracked and id(d) not in self._finished]

    def _pop_runs(self) -> list[Delivery]:
        """The last ack-needing delivery of each finished run at the head, per channel."""
        runs: list[Delivery] = []
        channel = None
        while self._order and id(self._order[0][0]) in self._finished:
            delivery, key = self._order.popleft()
            self._tracked.discard(id(delivery))
            if channel != key:
                channel = key
                runs.append(None)  # type: ignore[arg-type]
            if self._finished.pop(id(delivery)):
                runs[-1] = delivery
        return [d for d in runs if d is not None]


async def ack(delivery: Delivery, multiple: bool = False) -> None:
    """Ack; a stale delivery after a reconnect is redelivered anyway."""
    await _tolerant(delivery.ack(multiple=multiple), delivery, "ack")


async def settle(delivery: Delivery, requeue: bool) -> None:
    """Requeue, or reject without requeue (dead-letter), one delivery."""
    action = delivery.nack(requeue=True) if requeue else delivery.reject(requeue=False)
    await _tolerant(action, delivery, "settle")


async def _tolerant(action: Awaitable[Any], delivery: Delivery, what: str) -> None:
    # A lost connection (including aiormq's CancelledError for it) only means the
    # broker redelivers the message; a cancellation of our own task still propagates.
    try:
        await action
    except (*SETTLE_ERRORS, asyncio.CancelledError) as exc:
        if isinstance(exc, asyncio.CancelledError) and not foreign_cancel(exc):
            raise
        log.info("could not %s %s: %r (the broker will redeliver it)", what, delivery.message_id, exc)
