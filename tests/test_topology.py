"""Topology declarations: idempotent, quorum queues with limits, default-version routing."""

from __future__ import annotations

import uuid

import aio_pika
import pytest

from broker.connection import BrokerConnection
from broker.topology import QueueLimits, Topology, check_model_name
from runtime.errors import ConfigError, TopologyError, Unroutable


@pytest.fixture
async def connection(synced):
    conn = await BrokerConnection.open(synced.broker, "test-topology")
    yield conn
    await conn.aclose()


async def _ready(connection: BrokerConnection, queue: str) -> int:
    channel = await connection.channel()
    try:
        return (await (await channel.get_underlay_channel()).queue_declare(queue, passive=True)).message_count
    finally:
        await channel.close()


async def test_declaring_the_topology_twice_is_harmless(connection, synced) -> None:
    topology = Topology(synced.namespace)
    for _ in range(2):
        await topology.declare_shared(connection.publisher, synced.jobs.ttl_s)
        await topology.declare_model(connection.publisher, "mlp", ["1"], "1", QueueLimits())


async def test_model_queues_carry_their_delivery_limit(connection, synced) -> None:
    topology = Topology(synced.namespace)
    model = f"limits-{uuid.uuid4().hex[:6]}"
    await topology.declare_model(connection.publisher, model, ["1"], "1", QueueLimits(delivery_limit=3))
    channel = await connection.channel()
    try:
        with pytest.raises(TopologyError, match="clashes"):
            await topology.declare_model(channel, model, ["1"], "1", QueueLimits(delivery_limit=4))
    finally:
        await connection.publisher.queue_delete(topology.model_queue(model, "1"))


async def test_model_routing_key_follows_the_default_version_and_queued_jobs_stay(connection, synced) -> None:
    topology = Topology(synced.namespace)
    model = f"route-{uuid.uuid4().hex[:6]}"
    q1, q2 = topology.model_queue(model, "1"), topology.model_queue(model, "2")
    try:
        await topology.declare_model(connection.publisher, model, ["1", "2"], "2", QueueLimits())
        await connection.publish(aio_pika.Message(b"a"), model, topology.requests, mandatory=True)
        await connection.publish(aio_pika.Message(b"b"), f"{model}.1", topology.requests, mandatory=True)
        assert (await _ready(connection, q1), await _ready(connection, q2)) == (1, 1)
        await topology.declare_model(connection.publisher, model, ["1", "2"], "1", QueueLimits())
        await connection.publish(aio_pika.Message(b"c"), model, topology.requests, mandatory=True)
        assert (await _ready(connection, q1), await _ready(connection, q2)) == (2, 1)
        with pytest.raises(Unroutable):
            await connection.publish(aio_pika.Message(b"d"), f"{model}.9", topology.requests, mandatory=True)
    finally:
        for q in (q1, q2):
            await connection.publisher.queue_delete(q)


def test_model_names_are_restricted_to_the_routing_safe_alphabet() -> None:
    assert check_model_name("mlp_v2-large") == "mlp_v2-large"
    for bad in ("Mlp", "a.b", "a b", "", "x" * 65, "*", "#"):
        with pytest.raises(ConfigError):
            check_model_name(bad)
