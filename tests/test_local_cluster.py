"""The local cluster: 3 joined RabbitMQ nodes and a 3-member etcd, started by the project (``-m cluster``)."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from inferq.runtime.cluster import LocalCluster
from inferq.runtime.daemon import exists, tagged_pids
from tests.support import ROOT
from tests.test_rabbitnode import QUEUE, QUEUE_SETTLE_S, drain

pytestmark = pytest.mark.cluster


def etcd_call(endpoint: str, path: str, body: dict) -> dict:
    """One call to etcd's JSON gateway (``/v3/...``)."""
    request = urllib.request.Request(f"http://{endpoint}{path}", json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=5) as resp:
        return json.loads(resp.read())


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


async def publish_replicated(url: str, count: int) -> list[bytes]:
    import aio_pika

    bodies = [f"job-{i}".encode() for i in range(count)]
    async with await aio_pika.connect(url, timeout=10) as connection:
        channel = await connection.channel(publisher_confirms=True)
        args = {"x-queue-type": "quorum", "x-quorum-initial-group-size": 3}
        await channel.declare_queue(QUEUE, durable=True, arguments=args, timeout=10)
        for body in bodies:
            await channel.default_exchange.publish(aio_pika.Message(body, delivery_mode=2), routing_key=QUEUE, timeout=10)
    return bodies


async def test_a_quorum_queue_on_the_local_cluster_keeps_its_messages_when_its_leader_node_dies(
    local_cluster: LocalCluster,
) -> None:
    nodes = local_cluster.rabbit
    assert local_cluster.running_rabbit_nodes() == sorted(n.spec.node for n in nodes)
    bodies = await publish_replicated(nodes[0].url, 20)
    await asyncio.sleep(QUEUE_SETTLE_S)
    [row] = json.loads(nodes[0].ctl("list_queues", "name", "leader", "members", "--formatter", "json"))
    assert sorted(row["members"]) == sorted(n.spec.node for n in nodes)

    leader = next(n for n in nodes if n.spec.node == row["leader"])
    leader.kill()

    survivor = next(n for n in nodes if n is not leader)
    assert sorted(await drain(survivor.url, len(bodies))) == sorted(bodies)


async def test_the_local_etcd_has_three_members_and_a_write_on_one_is_read_on_another(
    local_cluster: LocalCluster,
) -> None:
    first, *_, last = local_cluster.spec.etcd_endpoints
    members = etcd_call(first, "/v3/cluster/member/list", {})["members"]
    assert sorted(m["name"] for m in members) == ["etcd-1", "etcd-2", "etcd-3"]

    etcd_call(first, "/v3/kv/put", {"key": b64("inferq-cluster-test"), "value": b64("yes")})
    [kv] = etcd_call(last, "/v3/kv/range", {"key": b64("inferq-cluster-test")})["kvs"]
    assert base64.b64decode(kv["value"]) == b"yes"


def inferq(*args: str, state_dir: Path) -> subprocess.CompletedProcess:
    env = {"INFERQ_STATE_DIR": str(state_dir), "PATH": "/usr/sbin:/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "inferq.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)


def test_inferq_services_cluster_starts_a_cluster_and_cluster_stop_removes_it(tmp_path: Path) -> None:
    started = inferq("services", "--cluster", "3", state_dir=tmp_path)
    assert started.returncode == 0, started.stderr
    cluster = LocalCluster.find(tmp_path / "cluster")
    try:
        for url in cluster.spec.broker_urls + cluster.spec.etcd_endpoints:
            assert url in started.stdout
        assert len(cluster.running()) == 6
        assert cluster.running_rabbit_nodes() == sorted(n.node for n in cluster.spec.rabbit)
        pids = [pid for part in [*cluster.rabbit, *cluster.etcd] for pid in tagged_pids(part.tag)]
        again = inferq("services", "--cluster", "3", state_dir=tmp_path)
        assert again.returncode == 0 and "local cluster running" in again.stdout
    finally:
        stopped = inferq("services", "--cluster-stop", state_dir=tmp_path)

    assert stopped.returncode == 0, stopped.stderr
    assert [pid for pid in pids if exists(pid)] == []
    assert not (tmp_path / "cluster").exists()
