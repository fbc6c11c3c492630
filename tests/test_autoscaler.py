"""The autoscaler on real RabbitMQ, etcd and worker processes."""

from __future__ import annotations

import asyncio
import signal

import pytest

from inferq.actors.launches import LaunchBook, counted
from inferq.actors.policy import Recommender
from inferq.errors import NoCapacity
from inferq.runtime.records import ModelRecord, NodeRecord, VersionRecord, WorkerRecord, WorkerState
from inferq.runtime.variants import place
from inferq.settings import ScalingPolicy
from inferq.runtime.coordination import keys, open_etcd
from tests.conftest import sample, set_policy
from tests.support import live_workers, wait_until

FAST = dict(scale_up_stabilization_s=0, scale_down_stabilization_s=1, idle_before_zero_s=2)


def test_recommender_clamps_smooths_and_activates() -> None:
    policy = ScalingPolicy(min_workers=0, max_workers=3, target_backlog_per_worker=10,
                           scale_up_stabilization_s=0, scale_down_stabilization_s=5, idle_before_zero_s=10)
    r = Recommender()
    assert r.decide(policy, 0, backlog=1, current=0) == (1, "activation: jobs waiting and no worker")
    assert r.decide(policy, 1, backlog=100, current=1)[0] == 3
    assert r.decide(policy, 2, backlog=0, current=3)[0] == 3, "a scale-down waits for its window"
    assert r.decide(policy, 8, backlog=0, current=3)[0] == 1, "the last worker waits for idle_before_zero_s"
    assert r.decide(policy, 12, backlog=0, current=1)[0] == 1, "still inside the scale-down window"
    assert r.decide(policy, 14, backlog=0, current=1)[0] == 0


def test_placement_respects_required_providers_and_capacity() -> None:
    nodes = {"gpu": NodeRecord("gpu", ("cuda", "cpu"), capacity=2, workers=1),
             "cpu": NodeRecord("cpu", ("cpu",), capacity=4, workers=0),
             "full": NodeRecord("full", ("tensorrt", "cuda", "cpu"), capacity=1, workers=1)}
    model = ModelRecord("m", "1", {"1": VersionRecord((), ())})
    assert place(nodes, model, "1", ["cuda"]).node == "gpu"
    assert place(nodes, model, "1").node == "cpu"
    with pytest.raises(NoCapacity):
        place(nodes, model, "1", ["tensorrt"])


def test_placement_prefers_a_node_that_already_caches_the_artifact_over_more_free_capacity() -> None:
    warm, cold = "a" * 64, "b" * 64
    nodes = {"warm": NodeRecord("warm", ("cpu",), capacity=2, workers=1, cached=(warm,)),
             "roomy": NodeRecord("roomy", ("cpu",), capacity=8, workers=0)}
    model = lambda sha: ModelRecord("m", "1", {"1": VersionRecord((), (), sha)})  # noqa: E731
    assert place(nodes, model(warm), "1").node == "warm"
    assert place(nodes, model(cold), "1").node == "roomy"


def test_a_warming_worker_counts_as_coming_not_as_failed_so_no_second_one_is_started() -> None:
    key, book = ("m", "1"), LaunchBook(grace_s=30)
    book.launched(key, 0, 1, now=0.0)
    warming = WorkerRecord("w1", "m", "1", state=WorkerState.WARMING, warming_since=1.0)
    # Long past the launch grace (a TensorRT engine build): the registered, warming worker is there.
    serving, present = counted([warming], draining=set())
    assert serving == [] and present == 1
    assert book.current(key, present, now=300.0) == 1 and book.held(key, 300.0) is None
    desired, _ = Recommender().decide(ScalingPolicy(target_backlog_per_worker=10), 300.0, backlog=8, current=1)
    assert desired == 1  # the demand one worker meets: the warming one is it
    ready = WorkerRecord("w2", "m", "1", state=WorkerState.READY)
    leaving = WorkerRecord("w3", "m", "1", state=WorkerState.READY)
    assert counted([warming, ready, leaving], draining={"w3"}) == ([ready], 2)


def test_a_worker_that_never_registers_still_counts_as_a_failed_launch() -> None:
    key, book = ("m", "1"), LaunchBook(grace_s=30)
    book.launched(key, 0, 1, now=0.0)
    assert book.current(key, counted([], set())[1], now=31.0) == 0
    assert "never registered" in book.held(key, 31.0)


def test_a_version_that_never_starts_is_given_up_on_after_ten_failed_starts_until_something_changes() -> None:
    from inferq.actors.launches import MAX_FAILED_STARTS

    key, other, book = ("m", "1"), ("n", "1"), LaunchBook(grace_s=30)
    now = 0.0
    for i in range(MAX_FAILED_STARTS - 1):
        book.failed(key, "model file gone", now)
        now += 61.0  # past the longest backoff: each failure alone would let the next launch go
        assert book.held(key, now) is None, f"after {i + 1} failures the backoff has passed"
    book.failed(key, "model file gone", now)
    book.failed(other, "broken provider", now)
    held = book.held(key, now + 3600.0)
    assert held is not None and "gave up after 10 failed starts" in held and "model file gone" in held
    book.forget("m")  # its scaling policy changed
    assert book.held(key, now + 3600.0) is None
    assert book.held(other, now + 0.5) is not None, "another model's backoff is its own"
    book.launched(other, 0, 1, now=now + 100.0)
    assert book.current(other, 1, now=now + 101.0) == 1 and book.held(other, now + 101.0) is None, "a registered worker clears it"


async def test_backlog_scales_from_zero_to_several_workers_and_back_to_zero(synced, spawn_autoscaler, amqp) -> None:
    await set_policy(synced, "scaled", min_workers=0, max_workers=3, target_backlog_per_worker=100, **FAST)
    jobs = [await amqp.submit("scaled", {"x": sample("mlp", seed=i)}) for i in range(400)]
    await spawn_autoscaler("scaled")
    peak = 0

    async def all_done() -> bool:
        nonlocal peak
        peak = max(peak, len(await live_workers(synced, "scaled")))
        return all(j in amqp.results for j in jobs)

    await wait_until(all_done, 60, "every job to be served", interval=0.2)
    assert peak > 1, "a backlog of 400 with a target of 100 per worker must start several workers"
    assert {r["status"] for r in amqp.results.values()} == {"succeeded"}
    assert all(amqp.reply_counts[j] == 1 for j in jobs), "each job ran exactly once"

    async def scaled_to_zero() -> bool:
        return not await live_workers(synced, "scaled")

    await wait_until(scaled_to_zero, 30, "scale to zero after idle", interval=0.2)


async def test_scale_down_under_load_drains_a_busy_worker_without_losing_jobs(synced, spawn_autoscaler, amqp) -> None:
    await set_policy(synced, "slow", min_workers=2, max_workers=2, target_backlog_per_worker=1, **FAST)
    await spawn_autoscaler("slow")

    async def workers(n: int) -> bool:
        return len([w for w in (await live_workers(synced, "slow")).values() if w["state"] == "ready"]) == n

    await wait_until(lambda: workers(2), 60, "two workers")
    jobs: list[str] = []

    async def steady_load() -> None:
        for i in range(150):
            jobs.append(await amqp.submit("slow", {"x": sample("mlp", seed=i)}))
            await asyncio.sleep(0.02)

    load = asyncio.create_task(steady_load())
    await wait_until(lambda: len(amqp.results) > 10, 30, "both workers to be serving")
    await set_policy(synced, "slow", min_workers=1, max_workers=1, target_backlog_per_worker=1, **FAST)
    await wait_until(lambda: workers(1), 30, "one worker drained while the load goes on")
    await load
    results = await amqp.wait_results(jobs, timeout=90)
    assert {r["status"] for r in results.values()} == {"succeeded"}


async def test_a_standby_autoscaler_takes_over_when_the_leader_is_killed(synced, spawn_autoscaler) -> None:
    await set_policy(synced, "leader", min_workers=0, max_workers=1)
    first, second = await spawn_autoscaler("leader"), await spawn_autoscaler("leader")
    key = keys(synced.namespace).leader.encode()
    async with open_etcd(synced.etcd) as client:
        async def holder() -> str | None:
            kv = await client.get(key)
            return kv.value.decode() if kv else None

        leader = await wait_until(holder, 30, "a leader to be elected")
        by_pid = {str(p.pid): p for p in (first, second)}
        acting = next(p for pid, p in by_pid.items() if f"-{pid}-" in leader)
        standby = second if acting is first else first
        acting.signal(signal.SIGKILL)
        holders = set()

        async def standby_leads() -> bool:
            current = await holder()
            holders.add(current)
            return current is not None and f"-{standby.pid}-" in current

        await wait_until(standby_leads, synced.etcd.lease_ttl_s + 10, "the standby to take over", interval=0.1)
        assert holders <= {leader, None, await holder()}, "the key names one leader at a time"
        assert standby.alive()


async def test_a_killed_worker_is_replaced_and_leaves_the_membership(synced, spawn_autoscaler) -> None:
    await set_policy(synced, "replaced", min_workers=0, max_workers=2, **FAST)
    await spawn_autoscaler("replaced")
    await set_policy(synced, "replaced", min_workers=1, max_workers=2, **FAST)  # a policy change takes effect live
    first = await wait_until(lambda: live_workers(synced, "replaced"), 60, "the policy's minimum worker")
    (worker_id, record), = first.items()
    import os

    os.kill(record["pid"], signal.SIGKILL)

    async def replaced() -> dict | None:
        now = await live_workers(synced, "replaced")
        return now if now and worker_id not in now else None

    now = await wait_until(replaced, synced.etcd.lease_ttl_s + 60, "a replacement after the lease expired", interval=0.2)
    assert all(r["pid"] != record["pid"] for r in now.values())


async def test_agent_launcher_starts_workers_on_a_node_that_fits(synced, spawn_autoscaler, spawn_agent, amqp) -> None:
    await spawn_agent("node-a", capacity=2)
    await set_policy(synced, "placed", min_workers=1, max_workers=1, **FAST)
    await spawn_autoscaler("placed", "--launcher", "agent")
    workers = await wait_until(lambda: live_workers(synced, "placed"), 60, "a worker started by the agent")
    assert [w["node"] for w in workers.values()] == ["node-a"]
    job = await amqp.submit("placed", {"x": sample("mlp")})
    assert (await amqp.wait_results([job], 30))[job]["status"] == "succeeded"


async def test_decisions_are_exposed_as_metrics_and_in_the_model_listing(synced, spawn_autoscaler, spawn_edge, http) -> None:
    await set_policy(synced, "drained", min_workers=1, max_workers=1, **FAST)
    await spawn_autoscaler("drained")
    edge = await spawn_edge()

    async def ready() -> bool:  # a worker registers while it warms up; ready once it consumes
        return any(w["state"] == "ready" for w in (await live_workers(synced, "drained")).values())

    await wait_until(ready, 60, "the policy's worker")

    async def decided() -> dict | None:
        async with http.get(f"{edge.url}/v1/models/drained") as resp:
            return (await resp.json())["autoscaler"]["1"]

    decision = await wait_until(decided, 30, "a recorded decision")
    assert decision["desired"] == 1 and decision["reason"]

    async def exposed() -> bool:  # /metrics serves the edge's cache, refreshed every metrics.refresh_s
        async with http.get(f"{edge.url}/metrics") as resp:
            text = await resp.text()
        return ('inferq_autoscaler_desired_workers{model="drained",version="1"} 1.0' in text
                and 'inferq_workers{model="drained",state="ready",version="1"} 1.0' in text)

    await wait_until(exposed, 10, "the decision and the worker on /metrics")


async def test_a_bad_policy_override_is_ignored_with_a_warning_and_the_autoscaler_keeps_scaling(synced, spawn_autoscaler, amqp) -> None:
    await set_policy(synced, "guarded", min_workers=0, max_workers=1, **FAST)
    scaler = await spawn_autoscaler("guarded")
    async with open_etcd(synced.etcd) as client:  # what an operator's typo in etcdctl puts there (JSON allows it)
        await client.put(keys(synced.namespace).policy("guarded").encode(), b'{"scale_up_stabilization_s": -1, "max_workers": Infinity}')
    jobs = [await amqp.submit("guarded", {"x": sample("mlp", seed=i)}) for i in range(20)]
    results = await amqp.wait_results(jobs, timeout=60)
    assert {r["status"] for r in results.values()} == {"succeeded"}, "the previous policy (max 1 worker) still scales"
    assert scaler.alive(), scaler.output()
    await wait_until(lambda: "ignoring the policy override" in scaler.output(), 10, "a warning about the bad override")
    assert "Traceback" not in scaler.output()


async def test_a_round_that_fails_unexpectedly_is_counted_in_the_metrics_and_the_next_round_still_runs(settings) -> None:
    from prometheus_client import generate_latest

    from inferq.actors.autoscaler import Autoscaler

    class Broken(Autoscaler):
        rounds = 0

        async def tick(self) -> None:
            self.rounds += 1
            if self.rounds == 1:
                raise KeyError("a record no round expected")

    scaler = Broken(settings, launcher="none")
    await scaler._guarded_tick()
    await scaler._guarded_tick()
    assert scaler.rounds == 2 and scaler.failed_rounds == 1
    assert b"inferq_autoscaler_failed_rounds_total 1.0" in generate_latest(scaler.registry)
