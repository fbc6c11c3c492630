"""Cluster mode under node loss (``pytest -m cluster``, ``make test-cluster``): issue 16's six scenarios.

One local cluster (3 RabbitMQ nodes, 3 etcd members) serves the whole module;
each test has its own namespace, heals the cluster first, and runs real
``inferq`` processes against it under a steady load of at least 1,000 jobs.
Every job that got a 202 must reach exactly one final state, counted from the
ledger stream itself (tests/cluster_stack.py). Figures are printed as
``[cluster figures]`` lines.

Queues are declared through node 1 before the load begins, so their leaders
start there, and they settle for seconds before any kill (see
tests/test_rabbitnode.py, QUEUE_SETTLE_S).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from inferq.runtime.cluster import ClusterSpec, LocalCluster
from inferq.runtime.demo import write_demo_repository
from tests.cluster_stack import ClusterStack, SteadyLoad, report, settled_accounting, window
from tests.support import wait_until
from tests.test_rabbitnode import QUEUE_SETTLE_S

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]

JOBS = 1200
RATE = 60.0  # jobs per second: 20 s of load
OUTAGE_S = 15.0  # etcd without quorum: 1.5 lease TTLs
PARTITION_S = 20.0
RESTART_AFTER_S = 15.0  # a SIGKILLed node's supervisor starts it again this long after


@pytest.fixture(scope="module")
async def cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LocalCluster]:
    """One local cluster for the module (starting one takes half a minute)."""
    local = LocalCluster(ClusterSpec.ephemeral(3), tmp_path_factory.mktemp("cluster"))
    await local.astart()
    try:
        yield local
    finally:
        await local.astop()


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_repository(tmp_path_factory.mktemp("models"), {"mlp": "mlp"})


@pytest.fixture
async def stack(cluster: LocalCluster, repository: Path, tmp_path: Path) -> AsyncIterator[ClusterStack]:
    """A fresh namespace on a whole cluster (whatever the last test broke is started again first)."""
    healed = await asyncio.to_thread(cluster.heal)
    if healed:
        print(f"\nhealed the cluster: started {healed} again")
    stack = ClusterStack(cluster, repository, tmp_path)
    await stack.sync()
    try:
        yield stack
    finally:
        await stack.aclose()


def model_queue(stack: ClusterStack) -> str:
    return f"{stack.settings.namespace}.model.mlp.1"


async def load_through(stack: ClusterStack, edge_url: str, fault, at_jobs: int = 300,
                       **more: int) -> tuple[SteadyLoad, float]:
    """Run the steady load, and ``fault()`` once ``at_jobs`` have been sent; returns the load and the fault's time."""
    load = SteadyLoad(edge_url, JOBS, RATE, **more).start()
    await wait_until(lambda: load.sent >= at_jobs, 60, f"{at_jobs} submissions")
    fault_at = time.monotonic()
    await fault()
    await load.wait()
    return load, fault_at


async def assert_exactly_one_final_state_each(stack: ClusterStack, load: SteadyLoad, name: str) -> None:
    accepted = load.accepted()
    counted = await settled_accounting(stack.cluster, stack, accepted)
    report(name, ledger=counted.describe())
    assert len(accepted) >= 1000, f"only {len(accepted)} of {JOBS} submissions were accepted"
    assert counted.missing == [], f"{len(counted.missing)} accepted jobs never reached a final state"
    assert counted.conflicting == {}, f"jobs with conflicting final states: {list(counted.conflicting.items())[:5]}"
    assert counted.first_finals == {"succeeded": len(accepted)}, counted.first_finals


async def test_sigkill_of_the_node_leading_the_model_queue_loses_no_accepted_job(stack: ClusterStack) -> None:
    cluster = stack.cluster
    await stack.worker(broker_first=0)
    await stack.worker(broker_first=1)
    edge = await stack.edge(broker_first=0)  # the edge, the queue's leader and one worker share node 1
    await asyncio.sleep(QUEUE_SETTLE_S)
    leader = cluster.queue_leader(model_queue(stack))
    assert leader is cluster.rabbit[0], "the queue was declared through node 1"
    assert cluster.queue_members(model_queue(stack)) == sorted(n.spec.node for n in cluster.rabbit)

    restarted: dict[str, float] = {}
    restarting: list[asyncio.Task] = []

    async def restart_later() -> None:
        await asyncio.sleep(RESTART_AFTER_S)
        await leader.astart()
        restarted["at"] = time.monotonic()

    async def kill_and_restart_later() -> None:
        # The node's supervisor (systemd, a StatefulSet) starts it again after a while. Until then the edge must
        # fail over; and RabbitMQ 3.10.8 sometimes keeps a stream whose writer's node died unwritable until the
        # node is back (README, "Cluster"): the ledger is such a stream here, declared through node 1.
        await asyncio.to_thread(leader.kill)
        restarting.append(asyncio.create_task(restart_later()))

    try:
        load, fault_at = await load_through(stack, edge.url, kill_and_restart_later, min_accepted=1000, max_count=4000)
    finally:
        await asyncio.gather(*restarting)

    figures = window(load.answers, fault_at)
    first_after = min((a.answered for a in load.answers if a.status == 202 and a.sent > fault_at), default=None)
    new_leader = cluster.queue_leader(model_queue(stack))
    report("leader node SIGKILL", submissions=figures.describe(), new_queue_leader=new_leader.spec.node,
           accepting_again_after_s=f"{first_after - fault_at:.2f}" if first_after else "never",
           node_restarted_after_s=f"{restarted['at'] - fault_at:.1f}" if restarted else "not yet")
    assert new_leader is not leader, "the queue's leadership moved to a node that lives"
    assert first_after is not None, "the edge accepted nothing after the kill, neither after failing over nor once the node was back"
    await assert_exactly_one_final_state_each(stack, load, "leader node SIGKILL")


async def test_sigkill_of_the_edges_node_makes_it_fail_over_and_keep_accepting(stack: ClusterStack) -> None:
    cluster = stack.cluster
    await stack.worker(broker_first=0)
    await stack.worker(broker_first=2)
    edge = await stack.edge(broker_first=1)  # node 2: neither a queue leader nor a worker's node
    await asyncio.sleep(QUEUE_SETTLE_S)
    assert cluster.queue_leader(model_queue(stack)) is cluster.rabbit[0]
    edges_node = cluster.rabbit[1]

    load, fault_at = await load_through(stack, edge.url, lambda: asyncio.to_thread(edges_node.kill))

    figures = window(load.answers, fault_at)
    accepted_after = [a for a in load.answers if a.status == 202 and a.sent > fault_at + figures.gap_s]
    report("edge's node SIGKILL", submissions=figures.describe(), accepted_after_failover=len(accepted_after))
    assert accepted_after, "the edge accepted nothing after its node died"
    assert "failing over" in edge.process.output(), "the edge's log tells of its failover"
    await assert_exactly_one_final_state_each(stack, load, "edge's node SIGKILL")


async def test_a_partitioned_node_pauses_and_rejoins_and_no_accepted_job_is_lost(stack: ClusterStack) -> None:
    cluster = stack.cluster
    await stack.worker(broker_first=0)
    await stack.worker(broker_first=1)
    edge = await stack.edge(broker_first=2)  # on the node that will be cut off
    await asyncio.sleep(QUEUE_SETTLE_S)
    cut, rest = cluster.rabbit[2], cluster.rabbit[:2]
    everyone = sorted(n.spec.node for n in cluster.rabbit)

    async def partition() -> None:
        await asyncio.to_thread(cut.partition, rest, PARTITION_S)
        # pause_minority: the majority goes on without the node, which pauses (and drops its clients) until it heals.
        majority = sorted(n.spec.node for n in rest)
        await wait_until(lambda: _running_nodes_or_none(cluster) == majority, PARTITION_S / 2, "the majority to see the node gone")

    load, fault_at = await load_through(stack, edge.url, partition)
    await wait_until(lambda: _running_nodes_or_none(cluster) == everyone, 120, "the node to rejoin after the heal", interval=1)
    healed_after = time.monotonic() - fault_at

    figures = window(load.answers, fault_at)
    report("partitioned node", submissions=figures.describe(), rejoined_after_s=f"{healed_after:.1f}")
    assert cluster.queue_members(model_queue(stack)) == everyone, "the healed node holds its replica again"
    await assert_exactly_one_final_state_each(stack, load, "partitioned node")


def _running_nodes_or_none(cluster: LocalCluster) -> list[str] | None:
    try:
        return cluster.running_rabbit_nodes()
    except Exception:  # noqa: BLE001 (a node between pause and restart refuses rabbitmqctl for a moment)
        return None


async def leader_key(stack: ClusterStack) -> tuple[str, int, int] | None:
    """(identity, token, lease) of the acting autoscaler."""
    from inferq.runtime.coordination import keys, open_etcd

    async with open_etcd(stack.settings.etcd) as client:
        kv = await client.get(keys(stack.settings.namespace).leader.encode())
    return None if kv is None else (kv.value.decode(), kv.create_revision, kv.lease)


def scaling(min_workers: int, max_workers: int, **more: str) -> dict[str, str]:
    env = {"INFERQ_AUTOSCALER_MIN_WORKERS": str(min_workers), "INFERQ_AUTOSCALER_MAX_WORKERS": str(max_workers),
           "INFERQ_AUTOSCALER_SCALE_DOWN_STABILIZATION_S": "2", "INFERQ_AUTOSCALER_IDLE_BEFORE_ZERO_S": "5"}
    return {**env, **more}


async def test_sigkill_of_the_etcd_leader_keeps_every_lease_and_drains_no_worker(stack: ClusterStack) -> None:
    cluster = stack.cluster
    etcd_leader = await asyncio.to_thread(cluster.etcd_leader)
    first = cluster.etcd.index(etcd_leader)
    # The acting autoscaler, and the workers it starts (they inherit its settings), talk to the etcd leader first.
    acting = stack.autoscaler("mlp", etcd_first=first, **scaling(2, 2))
    await wait_until(lambda: _count_workers(stack, 2), 90, "the autoscaler's two workers", interval=0.5)
    standby = stack.autoscaler("mlp", etcd_first=(first + 1) % 3, **scaling(2, 2))
    edge = await stack.edge(etcd_first=(first + 2) % 3)
    before_leader = await leader_key(stack)
    assert before_leader is not None and f"-{acting.pid}-" in before_leader[0]
    before = await stack.leases("workers/")
    assert len(before) == 2

    async def kill_leader() -> None:
        etcd_leader.kill()
        killed = time.monotonic()
        await wait_until(lambda: _has_other_leader(cluster, etcd_leader), 30, "a new etcd leader", interval=0.1)
        report("etcd leader SIGKILL", new_etcd_leader_after_s=f"{time.monotonic() - killed:.2f}")

    load, fault_at = await load_through(stack, edge.url, kill_leader)
    await asyncio.sleep(stack.settings.etcd.lease_ttl_s)  # past a whole TTL after the kill: a lost lease would show

    after = await stack.leases("workers/")
    after_leader = await leader_key(stack)
    moved = after_leader is not None and after_leader[1] != before_leader[1]
    report("etcd leader SIGKILL", submissions=window(load.answers, fault_at).describe(),
           autoscaler_leadership="moved to the standby" if moved else "kept (its lease was refreshed through another member)")
    assert after == before, "a worker lost its lease (or was replaced) when the etcd leader died"
    assert after_leader is not None, "no autoscaler leads after the etcd leader died"
    assert "draining worker" not in acting.output() + standby.output(), "a worker was drained"
    assert all(p.alive() for p in (acting, standby))
    await assert_exactly_one_final_state_each(stack, load, "etcd leader SIGKILL")


async def test_with_two_of_three_etcd_members_stopped_serving_goes_on_and_scaling_pauses_until_quorum_returns(
        stack: ClusterStack) -> None:
    cluster = stack.cluster
    autoscaler = stack.autoscaler("mlp", **scaling(1, 3))
    await wait_until(lambda: _count_workers(stack, 1), 90, "the autoscaler's worker", interval=0.5)
    edge = await stack.edge()
    etcd_leader = await asyncio.to_thread(cluster.etcd_leader)
    stopped = [etcd_leader, next(m for m in cluster.etcd if m is not etcd_leader)]
    before = await stack.leases("workers/")
    outage: dict[str, float] = {}

    load = SteadyLoad(edge.url, JOBS, RATE).start()
    await wait_until(lambda: load.sent >= 300, 60, "300 submissions")
    outage["start"] = time.monotonic()
    await asyncio.gather(*(asyncio.to_thread(m.stop) for m in stopped))
    outage["stopped_after"] = time.monotonic() - outage["start"]
    await wait_until(lambda: "scaling paused" in autoscaler.output(), 30, "the autoscaler to say it paused", interval=0.2)
    outage["paused_after"] = time.monotonic() - outage["start"]
    # Longer than the leases' TTL: without a quorum etcd expires no lease, and none may be lost for it.
    await asyncio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - outage["start"])))
    during = [a for a in load.answers if a.sent > outage["start"]]
    for member in stopped:
        member.launch()
    await asyncio.gather(*(asyncio.to_thread(m.wait_ready, 60) for m in stopped))
    back = time.time()
    outage["lasted_s"] = time.monotonic() - outage["start"]
    await load.wait()

    async def decided_again() -> bool:
        return any(d.at > back for d in (await stack.decisions()).values())

    await wait_until(lambda: "scaling resumed" in autoscaler.output(), 60, "the autoscaler to resume", interval=0.5)
    await wait_until(decided_again, 30, "a scaling decision written after quorum returned", interval=0.5)
    paused_line = next(line for line in autoscaler.output().splitlines() if "scaling paused" in line)
    report("2 of 3 etcd members stopped", outage_s=f"{outage['lasted_s']:.1f}",
           members_stopped_after_s=f"{outage['stopped_after']:.1f}", paused_after_s=f"{outage['paused_after']:.1f}",
           accepted_during=sum(1 for a in during if a.status == 202), of=len(during), log=paused_line.split(": ", 1)[-1][:200])
    assert "etcd does not answer" in paused_line
    assert sum(1 for a in during if a.status == 202) == len(during), "the edge refused jobs while etcd had no quorum"
    assert await stack.leases("workers/") == before, "no worker was started, drained or re-registered"
    assert "draining worker" not in autoscaler.output()
    await assert_exactly_one_final_state_each(stack, load, "2 of 3 etcd members stopped")


async def test_the_acceptance_path_http_amqp_and_tritonclient_works_on_the_cluster(stack: ClusterStack) -> None:
    import numpy as np
    import onnxruntime as ort
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    from inferq.client.amqp import AmqpClient

    await stack.worker(broker_first=1)
    await stack.worker(broker_first=2)
    edge = await stack.edge(grpc=True)
    session = ort.InferenceSession(str(stack.settings.model_repository / "mlp" / "1" / "model.onnx"))
    rng = np.random.default_rng(16)
    xs = [rng.standard_normal((1, 256)).astype(np.float32) for _ in range(400)]

    load = SteadyLoad(edge.url, 700, RATE).start()
    urls = list(stack.settings_for(broker_first=2).broker.addresses)  # node 3 first, then 1 and 2
    async with await AmqpClient.open(urls, namespace=stack.settings.namespace, edge_url=edge.url) as amqp:
        jobs = [await amqp.submit("mlp", {"x": x}) for x in xs]
        results = [await job.result(timeout=120) for job in jobs]
    for x, result in zip(xs, results):
        np.testing.assert_allclose(result["probs"], session.run(None, {"x": x})[0], rtol=1e-5, atol=1e-6)
    await load.wait()

    x = xs[0]

    def triton_calls() -> tuple[np.ndarray, np.ndarray]:
        http = httpclient.InferenceServerClient(url=f"127.0.0.1:{edge.port}")
        grpc = grpcclient.InferenceServerClient(url=f"127.0.0.1:{edge.grpc_port}")
        try:
            hin = httpclient.InferInput("x", list(x.shape), "FP32")
            hin.set_data_from_numpy(x, binary_data=True)
            gin = grpcclient.InferInput("x", list(x.shape), "FP32")
            gin.set_data_from_numpy(x)
            return http.infer("mlp", [hin]).as_numpy("probs"), grpc.infer("mlp", [gin]).as_numpy("probs")
        finally:
            http.close()
            grpc.close()

    over_http, over_grpc = await asyncio.to_thread(triton_calls)
    expected = session.run(None, {"x": x})[0]
    np.testing.assert_allclose(over_http, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(over_grpc, expected, rtol=1e-5, atol=1e-6)

    polled = await _poll_outputs(edge.url, load.accepted()[:20])
    sent = np.random.default_rng(7).standard_normal((1, 256)).astype(np.float32)  # SteadyLoad's input
    for probs in polled:
        np.testing.assert_allclose(probs, session.run(None, {"x": sent})[0], rtol=1e-5, atol=1e-6)

    accepted = load.accepted() + [j.id for j in jobs]
    counted = await settled_accounting(stack.cluster, stack, accepted)
    report("acceptance path", http_accepted=len(load.accepted()), amqp=len(jobs), ledger=counted.describe())
    assert len(accepted) >= 1000 and counted.missing == [] and counted.conflicting == {}
    assert counted.first_finals == {"succeeded": len(accepted)}


async def _poll_outputs(edge_url: str, job_ids: list[str]) -> list:
    import aiohttp
    import numpy as np

    out = []
    async with aiohttp.ClientSession() as http:
        for job_id in job_ids:
            async with http.get(f"{edge_url}/v1/jobs/{job_id}", params={"wait": "30"}) as resp:
                doc = await resp.json()
            assert doc["status"] == "succeeded", doc
            [probs] = [o for o in doc["outputs"] if o["name"] == "probs"]
            out.append(np.asarray(probs["data"], np.float32).reshape(probs["shape"]))
    return out


async def _count_workers(stack: ClusterStack, count: int) -> bool:
    try:
        return len([w for w in await stack.workers("mlp") if w.serving]) == count
    except Exception:  # noqa: BLE001 (etcd may be electing a leader)
        return False


def _has_other_leader(cluster: LocalCluster, old) -> bool:
    try:
        return cluster.etcd_leader() is not old
    except Exception:  # noqa: BLE001 (no member claims leadership yet)
        return False
