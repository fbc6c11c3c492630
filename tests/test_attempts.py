"""Innocent jobs never pay for another job's crash, a drain, a broker restart or a ledger that refuses writes.

Real workers, real signals; the brokers killed or starved here are nodes of the
test's own (tests/brokers.py), never the machine's RabbitMQ. Every claim is
checked by counting each job's final states in the ledger stream.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from inferq.broker.control import send, worker_key
from inferq.broker.connection import BrokerConnection
from inferq.broker.topology import Topology
from tests.conftest import sample
from tests.support import assert_each_ended_once, ledger_events, live_workers, wait_until
from tests.test_edge import poll, submit, v2_input

pytestmark = pytest.mark.faults  # the fault suite: make test-faults (CI runs it after make test)


async def doc(http, edge, job_id: str) -> dict:
    async with http.get(f"{edge.url}/v1/jobs/{job_id}") as resp:
        return await resp.json() if resp.status == 200 else {"status": f"http {resp.status}", "attempts": 0}


async def test_a_poison_job_among_fifty_good_ones_fails_alone_and_every_good_job_succeeds(synced, spawn_worker, spawn_edge, http) -> None:
    edge = await spawn_edge()
    # 128 samples: its runs last long enough that the kill below lands while it, and not a neighbour, runs.
    # One long job (128 rows, past the model's max_batch_size of 8): ?shard=1 keeps the edge from splitting it.
    poison = (await submit(http, edge, "poison", sample("mlp", n=128, seed=99), query="?shard=1"))["job_id"]
    good = [(await submit(http, edge, "poison", sample("mlp", seed=i)))["job_id"] for i in range(50)]
    kills = 0
    while kills < 6:
        worker = await spawn_worker("poison")

        async def poison_running_again_or_final() -> dict | None:
            d = await doc(http, edge, poison)
            return d if d["status"] not in ("queued", "running") or (d["status"] == "running" and d["attempts"] > kills) else None

        state = await wait_until(poison_running_again_or_final, 60, "the poison job to start again or end", interval=0.02)
        if state["status"] != "running":
            break
        worker.kill()  # the job "crashes" its worker: a real SIGKILL while it runs, with its batch- and prefetch-mates
        await worker.wait(10)
        kills += 1
    assert (await poll(http, edge, poison, wait=30))["error"]["code"] == "delivery_limit"
    for job in good:
        await poll(http, edge, job, wait=60)
    final = assert_each_ended_once(await ledger_events(synced), [poison, *good])
    assert final[poison] == "failed" and kills == 2, (final[poison], kills)  # the model's delivery_limit is 2 starts
    assert {final[j] for j in good} == {"succeeded"}, {j: final[j] for j in good if final[j] != "succeeded"}


async def test_jobs_handed_back_by_six_drains_in_a_row_all_succeed(synced, spawn_worker, spawn_edge, http) -> None:
    edge = await spawn_edge()
    jobs = [(await submit(http, edge, "slow", sample("mlp", seed=i)))["job_id"] for i in range(200)]
    connection = await BrokerConnection.open(synced.broker, "test-drains")
    try:
        for _ in range(6):  # more than the delivery limit (5): a drain must not spend a job's deliveries
            worker = await spawn_worker("slow")
            (worker_id,) = [k for k, v in (await live_workers(synced, "slow")).items() if v["pid"] == worker.pid]

            await wait_until(lambda: _any_running(http, edge, jobs), 30, "a batch to be running")
            await send(connection, Topology(synced.namespace).control, worker_key(worker_id), {"command": "drain"})
            assert await worker.wait(40) == 0, worker.output()
    finally:
        await connection.aclose()
    await spawn_worker("slow")
    for job in jobs:
        await poll(http, edge, job, wait=60)
    final = assert_each_ended_once(await ledger_events(synced), jobs)
    assert set(final.values()) == {"succeeded"}, {j: s for j, s in final.items() if s != "succeeded"}


async def test_a_memory_alarm_refuses_new_jobs_clearly_and_loses_none_of_the_accepted_ones(
        synced, own_broker, spawn_worker, spawn_edge, http) -> None:
    env = {"INFERQ_BROKER_URL": own_broker.url, "INFERQ_BROKER_PUBLISH_TIMEOUT_S": "2"}
    await spawn_worker("slow", env=env)
    edge = await spawn_edge(env=env)
    jobs = [(await submit(http, edge, "slow", sample("mlp", seed=i)))["job_id"] for i in range(60)]
    await wait_until(lambda: _work_started(http, edge, jobs), 30, "work under way")
    await asyncio.to_thread(own_broker.set_vm_memory_high_watermark, 0.00001)
    try:
        await wait_until(lambda: asyncio.to_thread(own_broker.memory_alarm), 30, "the memory alarm")
        started = time.monotonic()
        async with http.post(f"{edge.url}/v1/models/slow/jobs", json={"inputs": [v2_input(sample("mlp"))]}) as resp:
            refused = await resp.json()
        assert resp.status in (429, 503) and refused["error"]["code"].startswith("broker"), refused
        assert time.monotonic() - started < 10, "a blocked broker answers within the publish timeout, it does not hang"
        await asyncio.sleep(8)  # long enough for the worker to finish batches it cannot record
    finally:
        await asyncio.to_thread(own_broker.set_vm_memory_high_watermark, 0.4)
    for job in jobs:
        await poll(http, edge, job, wait=90)
    final = assert_each_ended_once(await ledger_events(synced, own_broker.url), jobs)
    assert set(final.values()) == {"succeeded"}, {j: s for j, s in final.items() if s != "succeeded"}


async def test_a_sigkilled_broker_node_loses_no_confirmed_job_and_fails_no_healthy_one(
        synced, own_broker, spawn_worker, spawn_edge, http) -> None:
    env = {"INFERQ_BROKER_URL": own_broker.url, "INFERQ_BROKER_PUBLISH_TIMEOUT_S": "3", "INFERQ_BROKER_HEARTBEAT_S": "5"}
    await spawn_worker("mlp", env=env)
    edge = await spawn_edge(env=env)
    await asyncio.sleep(2)  # RabbitMQ 3.10 can lose a quorum queue's leader if killed within ~1 s of declaring it
    accepted: list[str] = []
    refused = 0

    async def load(seconds: float) -> None:
        nonlocal refused
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                async with http.post(f"{edge.url}/v1/models/mlp/jobs", json={"inputs": [v2_input(sample("mlp"))]}) as resp:
                    body = await resp.json()
                    if resp.status == 202:
                        accepted.append(body["job_id"])
                    else:
                        assert resp.status in (429, 503), body
                        refused += 1
            except aiohttp.ClientError:
                refused += 1
            await asyncio.sleep(0.03)

    traffic = asyncio.create_task(load(25))
    for _ in range(2):
        await asyncio.sleep(5)
        await asyncio.to_thread(own_broker.kill)
        await asyncio.sleep(1)
        await own_broker.arestart()
    await traffic
    assert len(accepted) > 100 and refused > 0, (len(accepted), refused)
    for job in accepted:
        await poll(http, edge, job, wait=90)
    final = assert_each_ended_once(await ledger_events(synced, own_broker.url), accepted)
    assert set(final.values()) == {"succeeded"}, {j: s for j, s in final.items() if s != "succeeded"}


async def _work_started(http, edge, jobs: list[str]) -> bool:
    return any(d["status"] in ("running", "succeeded") for d in await asyncio.gather(*(doc(http, edge, j) for j in jobs)))


async def _any_running(http, edge, jobs: list[str]) -> bool:
    return any(d["status"] == "running" for d in await asyncio.gather(*(doc(http, edge, j) for j in jobs)))
