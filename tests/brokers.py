"""Fixtures with RabbitMQ nodes (and etcd members) of the test's own, for fault tests.

A test that kills or partitions a broker uses these, never the machine's
RabbitMQ on 5672. Each node lives in the test's temporary folder, is stopped
by the fixture, and dies with the test session if that is killed (see
``inferq.runtime.daemon``). Imported by ``tests/conftest.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import asyncio
import secrets

from inferq.runtime.cluster import ClusterSpec, LocalCluster
from inferq.runtime.etcdnode import EtcdMember, EtcdMemberSpec
from inferq.runtime.rabbitnode import NodeSpec, RabbitNode


@pytest.fixture
async def own_broker(tmp_path: Path) -> AsyncIterator[RabbitNode]:
    """A started single RabbitMQ node on free ports; ``.url`` is its AMQP URL. Kill, restart, alarm it freely."""
    node = RabbitNode(NodeSpec.ephemeral(), tmp_path / "rabbit")
    await node.astart()
    try:
        yield node
    finally:
        await node.astop()


@pytest.fixture
async def own_etcd(tmp_path: Path) -> AsyncIterator[EtcdMember]:
    """A started single-member etcd on free ports; pause, kill or restart it freely (``.spec.client_port``)."""
    spec = EtcdMemberSpec.ephemeral("own")
    member = EtcdMember(spec, tmp_path / "etcd", [spec], f"inferq-{secrets.token_hex(4)}")
    member.launch()
    try:
        await asyncio.to_thread(member.wait_ready, 60)
        yield member
    finally:
        await asyncio.to_thread(member.stop)


@pytest.fixture
async def local_cluster(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[LocalCluster]:
    """3 joined RabbitMQ nodes and a 3-member etcd cluster on free ports (tests marked ``cluster`` only)."""
    if request.node.get_closest_marker("cluster") is None:
        pytest.fail("a test that uses local_cluster must be marked @pytest.mark.cluster (it is slow)")
    cluster = LocalCluster(ClusterSpec.ephemeral(3), tmp_path / "cluster")
    await cluster.astart()
    try:
        yield cluster
    finally:
        await cluster.astop()
