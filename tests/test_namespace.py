"""``inferq namespace reset`` (and every test clean-up) removes what nothing names any more, and only that namespace's."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

import aio_pika
import pytest

from inferq.runtime.namespace import remove_namespace, survey
from inferq.settings import Settings
from tests.support import declared


@pytest.fixture
async def connection(settings: Settings) -> AsyncIterator[aio_pika.abc.AbstractConnection]:
    connection = await aio_pika.connect(settings.broker.url, timeout=10)
    try:
        yield connection
    finally:
        await connection.close()


async def test_a_reset_removes_queues_and_exchanges_that_no_record_names_but_not_another_namespaces_or_a_live_reply_queue(
        settings: Settings, connection) -> None:
    channel = await connection.channel()
    mine = replace(settings, namespace=f"n{uuid.uuid4().hex[:8]}")
    other = f"{mine.namespace}x"  # shares the letters, not the "<ns>." prefix
    quorum = {"x-queue-type": "quorum"}
    # What a version retired by an older inferq left: its high lane and priority exchange, with a job in the lane.
    orphan = await channel.declare_queue(f"{mine.namespace}.model.gone.7.high", durable=True, arguments=quorum)
    await channel.default_exchange.publish(aio_pika.Message(b"job"), orphan.name)
    await channel.declare_exchange(f"{mine.namespace}.route.gone.7", aio_pika.ExchangeType.HEADERS, durable=True)
    reply = await channel.declare_queue(f"{mine.namespace}.replies.acme.{uuid.uuid4().hex}", exclusive=True)
    neighbour = await channel.declare_queue(f"{other}.model.gone.7", durable=True, arguments=quorum)
    try:
        footprint = await survey(mine)
        assert orphan.name in dict(footprint.queues) and f"{mine.namespace}.route.gone.7" in footprint.exchanges
        await remove_namespace(mine, footprint)
        assert not await declared(connection, "queue", orphan.name)
        assert not await declared(connection, "exchange", f"{mine.namespace}.route.gone.7")
        assert await declared(connection, "queue", reply.name), "a running client's reply queue is the broker's to delete"
        assert await declared(connection, "queue", neighbour.name), "another namespace is never touched"
    finally:
        await neighbour.delete(if_unused=False, if_empty=False)
