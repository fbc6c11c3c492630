"""The fault suite: a job that got a 202 or a confirm is never lost, and bad input harms nobody.

Real processes, real signals, real RabbitMQ and etcd; every test leaves the services running.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from dataclasses import replace

import numpy as np
import pytest

from inferq.broker.codec import encode_tensor, packb
from inferq.edge.jobs import idempotent_job_id
from inferq.runtime.loader import sync_repository
from inferq.runtime.rabbitnode import RabbitNode
from tests.conftest import sample, set_policy
from tests.support import assert_each_ended_once, ledger_events, live_workers, wait_until
from tests.test_edge import poll, submit, v2_input

pytestmark = pytest.mark.faults  # the fault suite: make test-faults (CI runs it after make test)


async def statuses(http, edge, job_ids: list[str], wait: float = 0) -> dict[str, str]:
    async def one(job_id: str) -> str:
        async with http.get(f"{edge.url}/v1/jobs/{job_id}", params={"wait": str(wait)}) as resp:
            return (await resp.json())["status"] if resp.status == 200 else f"http {resp.status}"
    return dict(zip(job_ids, await asyncio.gather(*(one(j) for j in job_ids))))


async def test_worker_killed_mid_batch_loses_nothing_and_no_job_ends_twice(spawn_worker, spawn_edge, http, synced) -> None:
    edge = await spawn_edge()
    # Queued before the worker starts: a worker already consuming can finish all of them while they are
    # still being submitted one by one, and then no job is ever seen running.
    jobs = [(await submit(http, edge, "slow", sample("mlp", seed=i)))["job_id"] for i in range(120)]
    first = await spawn_worker("slow")

    async def some_running() -> bool:
        return "running" in (await statuses(http, edge, jobs)).values()

    await wait_until(some_running, 30, "a batch to be running")
    first.kill()
    await first.wait(10)
    await spawn_worker("slow")
    final = await statuses(http, edge, jobs, wait=60)
    assert set(final.values()) == {"succeeded"}, final
    assert set(assert_each_ended_once(await ledger_events(synced), jobs).values()) == {"succeeded"}


@contextlib.asynccontextmanager
async def broker_stopped(node: RabbitNode):
    """Stop the RabbitMQ application of the test's own node; always start it again."""
    await node.actl("stop_app", timeout=60)
    try:
        yield
    finally:
        await node.actl("start_app", timeout=120)
        await node.actl("await_startup", timeout=120)


async def test_broker_restart_loses_no_confirmed_job_and_outage_submissions_get_503(
        own_broker, synced, spawn_worker, spawn_edge, http) -> None:
    # A node of the test's own: stopping the machine's RabbitMQ would fail every other test running on it.
    await sync_repository(replace(synced, broker=replace(synced.broker, url=own_broker.url)))
    env = {"INFERQ_BROKER_URL": own_broker.url}
    edge = await spawn_edge(env=env)
    jobs = [(await submit(http, edge, "slow", sample("mlp", seed=i)))["job_id"] for i in range(200)]
    await spawn_worker("slow", env=env)

    async def some_done() -> bool:
        return "succeeded" in (await statuses(http, edge, jobs[:20])).values()

    await wait_until(some_done, 30, "work to be under way")
    async with broker_stopped(own_broker):
        started = time.monotonic()
        async with http.post(f"{edge.url}/v1/models/slow/jobs", json={"inputs": [v2_input(sample("mlp"))]}) as resp:
            body = await resp.json()
        assert resp.status == 503 and body["error"]["code"] == "broker_unavailable", body
        assert time.monotonic() - started < 5, "an outage answers at once, it does not hang"

    async def edge_ready() -> bool:
        async with http.get(f"{edge.url}/v2/health/ready") as r:
            return r.status == 200

    await wait_until(edge_ready, 60, "the edge to reconnect", interval=0.5)
    after = (await submit(http, edge, "slow", sample("mlp")))["job_id"]
    final = await statuses(http, edge, jobs + [after], wait=60)
    assert set(final.values()) == {"succeeded"}, {k: v for k, v in final.items() if v != "succeeded"}
    ledger = assert_each_ended_once(await ledger_events(synced, own_broker.url), jobs + [after])
    assert set(ledger.values()) == {"succeeded"}


async def test_etcd_outage_longer_than_the_lease_keeps_jobs_flowing_and_workers_alive(
        synced, own_etcd, spawn_worker, spawn_autoscaler, amqp) -> None:
    # An etcd of the test's own: pausing the machine's (or another test's) would stall everything else on it.
    mine = replace(synced, etcd=replace(synced.etcd, port=own_etcd.spec.client_port))
    await sync_repository(mine)
    env = {"INFERQ_ETCD_PORT": str(own_etcd.spec.client_port)}
    worker = await spawn_worker("mlp", env=env, ready=False)
    await wait_until(lambda: _registered(mine, {worker.pid}), 30, "the worker to register")
    await set_policy(mine, "scaled", min_workers=1, max_workers=1)
    await spawn_autoscaler("scaled", env=env)
    scaled = await wait_until(lambda: live_workers(mine, "scaled"), 60, "the autoscaler's worker")
    scaled_pid = next(iter(scaled.values()))["pid"]
    os.kill(own_etcd.pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(mine.etcd.lease_ttl_s + 2)
        jobs = [await amqp.submit("mlp", {"x": sample("mlp", seed=i)}) for i in range(20)]
        results = await amqp.wait_results(jobs, timeout=30)
        assert {r["status"] for r in results.values()} == {"succeeded"}
    finally:
        os.kill(own_etcd.pid, signal.SIGCONT)

    await wait_until(lambda: _registered(mine, {worker.pid, scaled_pid}), 30, "both workers to be registered again")
    os.kill(scaled_pid, 0)  # still alive: the autoscaler did not drain it while etcd was away


async def _registered(settings, pids: set[int]) -> bool:
    return pids <= {w["pid"] for w in (await live_workers(settings)).values()}


async def test_a_job_that_crashes_its_worker_every_time_is_dead_lettered_as_failed(spawn_worker, spawn_edge, http) -> None:
    edge = await spawn_edge()
    # One long job (128 rows, past the model's max_batch_size of 8): ?shard=1 keeps the edge from splitting it.
    poison = (await submit(http, edge, "poison", sample("mlp", n=128), query="?shard=1"))["job_id"]
    crashes = 0
    while crashes < 6:
        worker = await spawn_worker("poison")

        async def next_attempt_or_final() -> dict | None:
            doc = await poll(http, edge, poison, wait=0)
            return doc if doc["attempts"] > crashes or doc["status"] in ("failed", "succeeded") else None

        doc = await wait_until(next_attempt_or_final, 30, "the poison job to be picked up again")
        if doc["status"] != "running":
            break
        worker.kill()  # the job "crashes" its worker: a real SIGKILL mid-inference
        await worker.wait(10)
        crashes += 1
    doc = await poll(http, edge, poison, wait=30)
    assert doc["status"] == "failed" and doc["error"]["code"] == "delivery_limit", doc
    assert crashes >= 2
    good = (await submit(http, edge, "poison", sample("mlp")))["job_id"]
    if not worker.alive():
        await spawn_worker("poison")
    assert (await poll(http, edge, good, wait=60))["status"] == "succeeded"


def reshape_job(shape: list[int]) -> dict:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    return {"inputs": [v2_input(x), {"name": "shape", "shape": [2], "datatype": "INT64", "data": shape}]}


async def test_a_model_error_fails_the_job_with_its_message_and_only_transient_errors_retry(spawn_worker, spawn_edge, http) -> None:
    edge = await spawn_edge()
    await spawn_worker("reshape")
    await spawn_worker("reshape_retry")
    ids = {}
    for model in ("reshape", "reshape_retry"):
        for label, shape in (("bad", [3, 3]), ("good", [4, 2])):
            async with http.post(f"{edge.url}/v1/models/{model}/jobs", json=reshape_job(shape)) as resp:
                ids[model, label] = (await resp.json())["job_id"]
    docs = {k: await poll(http, edge, v) for k, v in ids.items()}
    assert docs["reshape", "good"]["status"] == docs["reshape_retry", "good"]["status"] == "succeeded"
    (y,) = docs["reshape", "good"]["outputs"]  # an output that is not batch-aligned comes back whole, not sliced
    assert y["shape"] == [4, 2] and y["data"] == list(range(8)), y
    permanent, transient = docs["reshape", "bad"], docs["reshape_retry", "bad"]
    assert permanent["status"] == "failed" and permanent["error"]["code"] == "inference_error"
    assert "cannot be reshaped" in permanent["error"]["message"] and permanent["attempts"] == 1
    assert transient["status"] == "failed" and transient["attempts"] == 3


async def test_a_job_not_started_within_its_ttl_expires_and_never_runs(spawn_worker, spawn_edge, http) -> None:
    edge = await spawn_edge()
    async with http.post(f"{edge.url}/v1/models/cnn/jobs", params={"ttl": "1"}, json={"inputs": [v2_input(sample("cnn"))]}) as resp:
        job = (await resp.json())["job_id"]
    await asyncio.sleep(1.5)
    await spawn_worker("cnn")
    doc = await poll(http, edge, job, wait=30)
    assert doc["status"] == "expired" and doc["started_at"] is None and "outputs" not in doc, doc


async def test_a_paused_worker_past_its_lease_resumes_without_duplicate_final_states(synced, spawn_worker, spawn_edge, http) -> None:
    edge = await spawn_edge()
    # A short heartbeat, so that the pause outlasts it: the broker drops the paused worker's connection
    # and hands its jobs to the other worker, which is what could make a job end twice.
    worker = await spawn_worker("slow", env={"INFERQ_BROKER_HEARTBEAT_S": "2"})
    # Jobs of 64 rows (kept whole with shard=1) run for a quarter of a second each, so the pause lands while a
    # job seen running is still running: the case where both workers start it. Jobs of one row ran for a few ms,
    # and the pause could fall after the job seen running had ended and before the next one's start was recorded.
    jobs = [(await submit(http, edge, "slow", sample("mlp", n=64, seed=i), query="?shard=1"))["job_id"] for i in range(20)]
    await wait_until(lambda: _one_running(http, edge, jobs), 30, "a job to be running")
    worker.signal(signal.SIGSTOP)
    try:
        async def gone() -> bool:
            return worker.pid not in {w["pid"] for w in (await live_workers(synced, "slow")).values()}

        await wait_until(gone, synced.etcd.lease_ttl_s + 10, "the paused worker's lease to expire", interval=0.2)
        await asyncio.sleep(6)  # past 2 heartbeats of 2 s: the broker closes the paused connection
        await spawn_worker("slow")
        await wait_until(lambda: _taken_over(http, edge, jobs), 60, "the other worker to run the paused worker's jobs")
    finally:
        worker.signal(signal.SIGCONT)
    final = await statuses(http, edge, jobs, wait=60)
    assert set(final.values()) == {"succeeded"}
    assert set(assert_each_ended_once(await ledger_events(synced), jobs).values()) == {"succeeded"}

    async def back() -> bool:
        return worker.pid in {w["pid"] for w in (await live_workers(synced, "slow")).values()}

    await wait_until(back, 60, "the resumed worker to register again")


async def _taken_over(http, edge, jobs: list[str]) -> bool:
    """Some job started a second time (on the other worker) and every job has ended."""
    async def one(job_id: str) -> dict:
        async with http.get(f"{edge.url}/v1/jobs/{job_id}") as resp:
            return await resp.json()
    docs = [await one(j) for j in jobs]
    return all(d["status"] == "succeeded" for d in docs) and any(d["attempts"] >= 2 for d in docs)


async def _one_running(http, edge, jobs: list[str]) -> bool:
    return "running" in (await statuses(http, edge, jobs)).values()


async def test_a_client_that_disconnects_mid_submit_leaves_no_half_job(spawn_worker, spawn_edge, http) -> None:
    edge = await spawn_edge()
    body = packb({"inputs": {"x": encode_tensor(sample("mlp"))}})
    ids = {}
    for label, sent in (("cut", body[: len(body) // 2]), ("whole", body)):
        key = f"{label}-{time.time_ns()}"
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
        writer.write(
            f"POST /v1/models/mlp/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/msgpack\r\n"
            f"Idempotency-Key: {key}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + sent
        )
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        ids[label] = idempotent_job_id(None, "mlp", key)

    async def known(job_id: str) -> bool:
        async with http.get(f"{edge.url}/v1/jobs/{job_id}") as resp:
            return resp.status == 200

    # A whole body is a whole job even if its client left before the answer (aiohttp does not cancel
    # handlers); by the time it is known, the cut one, sent first, has had every chance to appear.
    await wait_until(lambda: known(ids["whole"]), 30, "the job whose body arrived")
    assert not await known(ids["cut"]), "a body that never arrived makes no job"
    await spawn_worker("mlp")
    assert (await poll(http, edge, ids["whole"]))["status"] == "succeeded"


async def test_a_full_queue_refuses_new_jobs_and_keeps_the_queued_ones(spawn_worker, spawn_edge, http) -> None:
    edge = await spawn_edge()
    accepted, refused = [], 0
    for _ in range(6):
        async with http.post(f"{edge.url}/v1/models/tiny2/jobs", json={"inputs": [v2_input(sample("mlp"))]}) as resp:
            if resp.status == 202:
                accepted.append((await resp.json())["job_id"])
            else:
                assert resp.status == 429 and int(resp.headers["Retry-After"]) >= 1
                refused += 1
    assert refused >= 2
    await spawn_worker("tiny2")
    final = await statuses(http, edge, accepted, wait=30)
    assert set(final.values()) == {"succeeded"}, "every accepted job ran: nothing was dropped from the head"
