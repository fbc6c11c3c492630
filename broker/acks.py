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

from inferq.broker.connection import tolerant

log = logging.getLogger("inferq.acks")

Delivery = aio_pika.abc.AbstractIncomingMessage


class AckTracker:
    """Every delivery is :meth:`track`-ed on arrival and :meth:`finish`-ed once its result is durable.

    Each channel keeps its own delivery order: a worker consuming two queues on
    two channels (high and normal priority) acks each run as soon as it is
    done, whatever the other channel still has in hand.
    """

    def __init__(self) -> None:
        self._orders: dict[int, deque[Delivery]] = {}  # id(channel at delivery) -> deliveries in tag order
        self._channel_of: dict[int, int] = {}  # id(delivery) -> its channel key, while tracked
        self._finished: dict[int, bool] = {}  # id(delivery) -> does it still need an ack?
        # Frames of concurrent finish() calls could otherwise reach the socket out of tag order
        # (an earlier multiple ack after a later one is an unknown tag: the channel closes).
        self._lock = asyncio.Lock()

    def __len__(self) -> int:
        return len(self._channel_of)

    def track(self, delivery: Delivery) -> None:
        """Note a delivery as it arrives; its channel is read now, while it is open."""
        key = id(delivery.channel)
        self._orders.setdefault(key, deque()).append(delivery)
        self._channel_of[id(delivery)] = key

    async def finish(self, acked: Iterable[Delivery] = (), settled: Iterable[Delivery] = ()) -> None:
        """``acked`` are done and need an ack; ``settled`` were rejected or requeued one by one already."""
        # Only deliveries still waiting count: a finished one's id may belong to a new message by now.
        for delivery in acked:
            if id(delivery) in self._channel_of:
                self._finished[id(delivery)] = True
        for delivery in settled:
            if id(delivery) in self._channel_of:
                self._finished[id(delivery)] = False
        async with self._lock:
            for last in self._pop_runs():
                await ack(last, multiple=True)

    def pending(self, deliveries: Iterable[Delivery]) -> list[Delivery]:
        """Those of ``deliveries`` not finished yet."""
        return [d for d in deliveries if id(d) in self._channel_of and id(d) not in self._finished]

    def _pop_runs(self) -> list[Delivery]:
        """The last ack-needing delivery of the finished run at the head of each channel."""
        runs: list[Delivery] = []
        for key, order in list(self._orders.items()):
            last = None
            while order and id(order[0]) in self._finished:
                delivery = order.popleft()
                del self._channel_of[id(delivery)]
                if self._finished.pop(id(delivery)):
                    last = delivery
            if last is not None:
                runs.append(last)
            if not order:
                del self._orders[key]
        return runs


async def ack(delivery: Delivery, multiple: bool = False) -> None:
    """Ack; a stale delivery after a reconnect is redelivered anyway."""
    await _tolerant(delivery.ack(multiple=multiple), delivery, "ack")


async def settle(delivery: Delivery, requeue: bool) -> None:
    """Requeue, or reject without requeue (dead-letter), one delivery."""
    action = delivery.nack(requeue=True) if requeue else delivery.reject(requeue=False)
    await _tolerant(action, delivery, "settle")


async def _tolerant(action: Awaitable[Any], delivery: Delivery, what: str) -> None:
    # A lost connection only means the broker redelivers the message; a message
    # aio-pika already settled (MessageProcessError) needs nothing more either.
    try:
        async with tolerant(f"{what} {delivery.message_id} (the broker will redeliver it)", logging.INFO):
            await action
    except aio_pika.exceptions.MessageProcessError as exc:
        log.debug("%s %s: %r", what, delivery.message_id, exc)
