"""Topology declarations: idempotent, quorum queues with limits, the unpinned routing key and its rebinding."""

from __future__ import annotations

import uuid

import aio_pika
import pytest

from inferq.broker.connection import BrokerConnection
from inferq.broker.topology import ROUTER, QueueLimits, Topology, check_model_name
from inferq.errors import ConfigError, TopologyError, Unroutable


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


async def _delete_model(connection: BrokerConnection, topology: Topology, model: str, versions: list[str]) -> None:
    for version in versions:
        for queue in topology.queues_of(model, version):
            await connection.publisher.queue_delete(queue)
        for exchange in (topology.route_exchange(model, version), f"{topology.route_exchange(model, version)}.normal"):
            await connection.publisher.exchange_delete(exchange)
    await connection.publisher.queue_delete(topology.router_queue(model))


async def test_declaring_the_topology_twice_is_harmless(connection, synced) -> None:
    topology = Topology(synced.namespace)
    for _ in range(2):
        await topology.declare_shared(connection.publisher, synced.jobs)
        await topology.declare_model(connection.publisher, "mlp", ["1"], QueueLimits())


async def test_a_changed_queue_bound_is_a_clear_error_and_a_changed_poison_limit_is_not(connection, synced) -> None:
    topology = Topology(synced.namespace)
    model = f"limits-{uuid.uuid4().hex[:6]}"
    await topology.declare_model(connection.publisher, model, ["1"], QueueLimits(delivery_limit=3, max_length=10))
    channel = await connection.channel()
    try:
        # The poison limit is the workers' to enforce: changing it needs no new queue.
        await topology.declare_model(channel, model, ["1"], QueueLimits(delivery_limit=4, max_length=10))
        with pytest.raises(TopologyError, match="namespace reset"):
            await topology.declare_model(channel, model, ["1"], QueueLimits(max_length=11))
    finally:
        await _delete_model(connection, topology, model, ["1"])


async def test_model_routing_key_is_moved_between_versions_and_the_router_and_queued_jobs_stay(connection, synced) -> None:
    topology = Topology(synced.namespace)
    model = f"route-{uuid.uuid4().hex[:6]}"
    q1, q2, router = topology.model_queue(model, "1"), topology.model_queue(model, "2"), topology.router_queue(model)

    async def counts() -> tuple[int, int, int]:
        return await _ready(connection, q1), await _ready(connection, q2), await _ready(connection, router)

    try:
        await topology.declare_model(connection.publisher, model, ["1", "2"], QueueLimits(), unpinned="2")
        await connection.publish(aio_pika.Message(b"a"), model, topology.requests, mandatory=True)
        await connection.publish(aio_pika.Message(b"b"), f"{model}.1", topology.requests, mandatory=True)
        assert await counts() == (1, 1, 0)
        await topology.bind_unpinned(connection.publisher, model, "1", ["1", "2"])
        await connection.publish(aio_pika.Message(b"c"), model, topology.requests, mandatory=True)
        assert await counts() == (2, 1, 0)
        await topology.bind_unpinned(connection.publisher, model, ROUTER, ["1", "2"])
        await connection.publish(aio_pika.Message(b"d"), model, topology.requests, mandatory=True)
        assert await counts() == (2, 1, 1), "with a split, unpinned jobs wait in the router queue, and only there"
        await topology.declare_model(connection.publisher, model, ["1", "2"], QueueLimits())
        await connection.publish(aio_pika.Message(b"e"), model, topology.requests, mandatory=True)
        assert await counts() == (2, 1, 2), "a worker's declaration leaves the unpinned binding alone"
        with pytest.raises(Unroutable):
            await connection.publish(aio_pika.Message(b"f"), f"{model}.9", topology.requests, mandatory=True)
    finally:
        await _delete_model(connection, topology, model, ["1", "2"])


def test_model_names_are_restricted_to_the_routing_safe_alphabet() -> None:
    assert check_model_name("mlp_v2-large") == "mlp_v2-large"
    for bad in ("Mlp", "a.b", "a b", "", "x" * 65, "*", "#"):
        with pytest.raises(ConfigError):
            check_model_name(bad)


async def test_a_job_with_the_high_priority_header_lands_in_the_high_queue_and_only_there(connection, synced) -> None:
    topology = Topology(synced.namespace)
    model = f"prio-{uuid.uuid4().hex[:6]}"
    normal, high = topology.model_queue(model, "1"), topology.high_queue(model, "1")
    try:
        await topology.declare_model(connection.publisher, model, ["1"], QueueLimits(), unpinned="1")
        await topology.declare_model(connection.publisher, model, ["1"], QueueLimits(), unpinned="1")  # twice: no double routes
        await connection.publish(aio_pika.Message(b"n"), model, topology.requests, mandatory=True)
        await connection.publish(aio_pika.Message(b"h", headers={"inferq-priority": "high"}), f"{model}.1", topology.requests, mandatory=True)
        await connection.publish(aio_pika.Message(b"o", headers={"inferq-priority": "urgent!"}), model, topology.requests, mandatory=True)
        assert (await _ready(connection, normal), await _ready(connection, high)) == (2, 1)
    finally:
        await _delete_model(connection, topology, model, ["1"])
