"""Failover over several broker URLs and etcd endpoints, on real nodes (a node of the test's own is the one that dies).

The machine's RabbitMQ on 5672 and etcd on 2379 are only ever the survivors here,
used as a normal client would. The cluster suite (``-m cluster``) covers failover
inside one real cluster, under load.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aio_pika
import pytest

from inferq.broker.connection import BrokerConnection
from inferq.errors import BrokerUnavailable, Unroutable
from inferq.runtime.coordination import open_etcd
from inferq.runtime.etcdnode import EtcdMember, EtcdMemberSpec
from inferq.runtime.rabbitnode import RabbitNode
from inferq.runtime.services import free_port
from inferq.settings import BrokerSettings, EtcdSettings, Settings
from tests.support import wait_until

MACHINE_BROKER = "amqp://guest:guest@127.0.0.1:5672/"
MACHINE_ETCD = "127.0.0.1:2379"


def nobody() -> str:
    """An AMQP URL on a port where nothing listens."""
    return f"amqp://guest:guest@127.0.0.1:{free_port()}/"


async def test_a_connection_goes_to_the_first_broker_url_that_answers() -> None:
    settings = BrokerSettings(urls=(nobody(), MACHINE_BROKER), connect_timeout_s=3)
    async with await BrokerConnection.open(settings, "failover-first") as connection:
        assert connection.connected and connection.url.endswith("@127.0.0.1:5672/")
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await connection.publish(aio_pika.Message(b"x"), queue.name)  # confirmed by the second URL's broker
        assert (await queue.get(timeout=5)).body == b"x"


async def test_no_answering_broker_url_is_broker_unavailable_naming_every_url() -> None:
    urls = (nobody(), nobody())
    with pytest.raises(BrokerUnavailable) as caught:
        await BrokerConnection.open(BrokerSettings(urls=urls, connect_timeout_s=2), "failover-none")
    assert all(u.replace("guest:guest", "guest:***") in str(caught.value) for u in urls)


async def test_a_lost_connection_fails_over_to_the_next_url_and_its_consumer_is_restored_there(
        own_broker: RabbitNode, settings: Settings) -> None:
    broker = BrokerSettings(urls=(own_broker.url, MACHINE_BROKER), reconnect_interval_s=0.2)
    queue_name = f"{settings.namespace}.failover-consumer"
    got: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        await message.ack()
        await got.put(message.body)

    async with await BrokerConnection.open(broker, "failover-loss") as connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, auto_delete=True)
        await queue.consume(on_message)
        await connection.publish(aio_pika.Message(b"before"), queue_name)
        assert await asyncio.wait_for(got.get(), 10) == b"before"
        assert f":{own_broker.spec.port}/" in connection.url

        own_broker.kill()
        killed = time.monotonic()
        await wait_until(lambda: connection.connected and ":5672/" in connection.url, 30, "failover to the second URL")
        failover_s = time.monotonic() - killed

        async def delivered_after() -> bool:
            try:
                await connection.publish(aio_pika.Message(b"after"), queue_name, mandatory=True)
            except (BrokerUnavailable, Unroutable):  # the channels, and with them the queue, are still being restored
                return False
            return True

        await wait_until(delivered_after, 30, "a publish on the new node", interval=0.2)
        assert await asyncio.wait_for(got.get(), 10) == b"after", "the consumer was not restored on the new node"
    print(f"\nbroker failover after SIGKILL: {failover_s:.2f}s")


async def test_an_etcd_client_moves_to_the_next_member_when_its_member_dies(tmp_path: Path, settings: Settings) -> None:
    spec = EtcdMemberSpec.ephemeral("lone")
    member = EtcdMember(spec, tmp_path / "etcd", [spec], "failover-test")
    member.launch()
    try:
        await asyncio.to_thread(member.wait_ready, 30)
        key = f"/{settings.namespace}/failover-probe".encode()
        async with open_etcd(EtcdSettings(endpoints=(MACHINE_ETCD,))) as machine:
            await machine.put(key, b"on the machine's etcd")
        client = open_etcd(EtcdSettings(endpoints=(spec.endpoint, MACHINE_ETCD), timeout_s=3))
        async with client:
            assert await client.get(key) is None, "the first member (our own, empty) answers first"
            assert client.endpoint == spec.endpoint
            member.kill()
            found = await asyncio.wait_for(client.get(key), 5)  # a read fails over and is retried at once
            assert found is not None and found.value == b"on the machine's etcd"
            assert client.endpoint == MACHINE_ETCD
            lease = await client.lease(5)  # later calls stay on the member that answers
            assert (await lease.refresh()).TTL > 0
            await lease.revoke()
            await client.delete(key)
    finally:
        member.stop()


def gateway(member: EtcdMember, path: str, body: dict, token: str | None = None) -> dict:
    """One call to a member's JSON gateway (``/v3/...``)."""
    import json
    import urllib.request

    headers = {"Authorization": token} if token else {}
    request = urllib.request.Request(f"{member.spec.client_url}{path}", json.dumps(body).encode(), headers, method="POST")
    with urllib.request.urlopen(request, timeout=5) as resp:
        return json.loads(resp.read())


async def test_with_etcd_auth_a_dead_first_member_is_left_before_the_first_call_and_the_client_authenticates_on_the_next(
        tmp_path: Path) -> None:
    spec = EtcdMemberSpec.ephemeral("auth")
    member = EtcdMember(spec, tmp_path / "etcd", [spec], "failover-auth")
    member.launch()
    try:
        await asyncio.to_thread(member.wait_ready, 30)
        for path, body in (("/v3/auth/user/add", {"name": "root", "password": "s3cret"}),
                           ("/v3/auth/user/grant", {"user": "root", "role": "root"}), ("/v3/auth/enable", {})):
            await asyncio.to_thread(gateway, member, path, body)
        settings = EtcdSettings(endpoints=(f"127.0.0.1:{free_port()}", spec.endpoint), username="root", password="s3cret",
                                timeout_s=3)
        async with open_etcd(settings) as client:  # connecting authenticates: on the dead member first
            await client.put(b"/failover-auth", b"yes")
            assert (await client.get(b"/failover-auth")).value == b"yes"
            assert client.endpoint == spec.endpoint
    finally:
        member.stop()
