"""The Python SDK (inferq.client) on the real stack: edge and worker processes, RabbitMQ, etcd."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from inferq import AmqpClient, AsyncClient, Client, JobStatus
from inferq.client.retry import NO_RETRIES, RetryPolicy
from inferq.edge.auth import create_key
from inferq.errors import (
    InferqError, InvalidInput, JobFailed, NotFound, RateLimited, Timeout, Unauthorized, Unavailable, UnknownModel,
)
from inferq.runtime.coordination import open_etcd
from tests.conftest import free_port, sample
from tests.support import ROOT, wait_until


def close_to(actual: np.ndarray, expected: np.ndarray) -> None:
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)


def client_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "inferq-client"]


async def test_a_submitted_job_gives_outputs_equal_to_onnxruntime(spawn_worker, spawn_edge, reference) -> None:
    await spawn_worker("mlp")
    edge = await spawn_edge()
    x = sample("mlp", n=3, seed=31)

    def use() -> tuple[str, str, dict, dict, JobStatus]:
        with Client(edge.url) as client, Client(edge.url, format="json") as as_json:
            job = client.submit("mlp", {"x": x})
            outputs = job.result(timeout=30)
            return job.id, job.version, outputs, as_json.infer("mlp", {"x": x}, timeout=30), job.status()

    job_id, version, outputs, json_outputs, status = await asyncio.to_thread(use)
    assert len(job_id) == 32 and version == "1" and status is JobStatus.SUCCEEDED
    close_to(outputs["probs"], reference("mlp", x))
    close_to(json_outputs["probs"], reference("mlp", x))
    assert outputs["probs"].flags.writeable, "results are the caller's arrays"


async def test_a_cancelled_queued_job_ends_cancelled_and_its_result_raises(spawn_edge) -> None:
    edge = await spawn_edge()  # no cnn worker: the job stays queued

    def use() -> tuple:
        with Client(edge.url) as client:
            job = client.submit("cnn", {"x": sample("cnn")})
            queued = job.status()
            cancelled = job.cancel()
            with pytest.raises(JobFailed) as failed:
                job.result(timeout=10)
            return queued, cancelled, failed.value, job.id, client.job(job.id).status()

    queued, cancelled, failed, job_id, seen_again = await asyncio.to_thread(use)
    assert queued is JobStatus.QUEUED and cancelled.status is JobStatus.CANCELLED and seen_again is JobStatus.CANCELLED
    assert (failed.job_id, failed.status, failed.reason) == (job_id, "cancelled", "cancelled")


async def test_the_same_idempotency_key_names_one_job_queued_once(spawn_edge, amqp) -> None:
    edge = await spawn_edge()
    queue = amqp.topology.model_queue("cnn", "1")
    before = (await amqp.queue_counts(queue))[0]
    key = f"order-{time.time_ns()}"
    async with AsyncClient(edge.url) as client:
        first = await client.submit("cnn", {"x": sample("cnn")}, idempotency_key=key, ttl=60)
        again = await client.submit("cnn", {"x": sample("cnn")}, idempotency_key=key, ttl=60)
        other = await client.submit("cnn", {"x": sample("cnn")}, idempotency_key=key + "-other", ttl=60)
        with pytest.raises(InvalidInput, match="different request"):  # Stripe's rule: a key names one request
            await client.submit("cnn", {"x": sample("cnn", seed=1)}, idempotency_key=key, ttl=60)
    assert first.id == again.id != other.id
    assert (await amqp.queue_counts(queue))[0] == before + 2


@pytest.fixture
async def api_key(synced):
    async def make(tenant: str, rate: float = 0.0, burst: int = 0) -> str:
        async with open_etcd(synced.etcd) as etcd:
            return await create_key(etcd, synced.namespace, tenant, rate, burst, 5)
    return make


async def test_a_tenant_over_its_rate_is_retried_after_the_servers_retry_after(spawn_edge, api_key) -> None:
    edge = await spawn_edge(env={"INFERQ_EDGE_AUTH": "true"})
    key = await api_key("paced", rate=1.0, burst=1)  # one submission a second: the next waits 1 s
    async with AsyncClient(edge.url, api_key=key) as client:
        await client.submit("cnn", {"x": sample("cnn")}, ttl=60)
        started = time.monotonic()
        await client.submit("cnn", {"x": sample("cnn")}, ttl=60)
        assert time.monotonic() - started >= 0.9, "the retry waited for Retry-After"
    impatient = AsyncClient(edge.url, api_key=key, retry=RetryPolicy(deadline_s=0.5))
    async with impatient:  # the bucket is empty again: the edge asks for at least 1 s
        started = time.monotonic()
        with pytest.raises(RateLimited) as limited:
            await impatient.submit("cnn", {"x": sample("cnn")}, ttl=60)
    assert limited.value.retry_after >= 1 and "rate_limited" in str(limited.value)
    assert time.monotonic() - started < 0.5, "a pause past the deadline is not taken"
    async with AsyncClient(edge.url) as anonymous:
        with pytest.raises(Unauthorized):
            await anonymous.submit("cnn", {"x": sample("cnn")})


async def test_a_full_queue_refuses_http_and_amqp_jobs_until_it_drains_and_retries_get_through(
        spawn_worker, spawn_edge, synced, reference, caplog) -> None:
    edge = await spawn_edge()
    x = sample("mlp", seed=41)
    async with AsyncClient(edge.url, retry=NO_RETRIES) as client, \
            await AmqpClient.open(namespace=synced.namespace, retry=NO_RETRIES) as amqp:
        accepted = []
        with pytest.raises(RateLimited) as full:  # "tiny_sdk" holds 3 jobs and has no worker yet
            for _ in range(10):
                accepted.append(await client.submit("tiny_sdk", {"x": x}))
        assert 3 <= len(accepted) <= 4, "quorum queues enforce the limit once reached: one more job may get in"
        assert "broker_rejected" in str(full.value) and full.value.retry_after >= 1
        with pytest.raises(RateLimited, match="queue is full"):
            await amqp.submit("tiny_sdk", {"x": x})  # the broker's nack, seen through publisher confirms
    caplog.set_level(logging.INFO, logger="inferq.client")
    async with AsyncClient(edge.url) as client, await AmqpClient.open(namespace=synced.namespace) as amqp:
        over_http = asyncio.ensure_future(client.infer("tiny_sdk", {"x": x}, timeout=60))
        over_amqp = asyncio.ensure_future(amqp.infer("tiny_sdk", {"x": x}, timeout=60))
        await wait_until(lambda: sum("trying again" in r.getMessage() for r in caplog.records) >= 2, 20, "both to retry")
        await spawn_worker("tiny_sdk")
        for outputs in await asyncio.gather(over_http, over_amqp):
            close_to(outputs["probs"], reference("tiny_sdk", x))
        for job in accepted:
            assert (await client.job(job.id).wait(30)).status is JobStatus.SUCCEEDED


async def test_map_over_500_inputs_streams_results_in_order_equal_to_onnxruntime(spawn_worker, spawn_edge, reference) -> None:
    await spawn_worker("mlp")
    edge = await spawn_edge()
    inputs = [sample("mlp", seed=1000 + i) for i in range(500)]

    def use() -> list:
        with Client(edge.url) as client:
            return list(client.map("mlp", ({"x": x} for x in inputs), concurrency=32, timeout=60))

    results = await asyncio.to_thread(use)
    assert len(results) == 500
    for x, outputs in zip(inputs, results):
        close_to(outputs["probs"], reference("mlp", x))


async def test_async_client_submits_polls_and_maps(spawn_worker, spawn_edge, reference) -> None:
    await spawn_worker("cnn")
    edge = await spawn_edge()
    xs = [sample("cnn", seed=50 + i) for i in range(6)]
    async with AsyncClient(edge.url, format="json") as client:
        job = await client.submit("cnn", {"x": xs[0]})
        close_to((await job.result(timeout=30))["logits"], reference("cnn", xs[0]))
        document = await job.get()
        assert document.status is JobStatus.SUCCEEDED and document.attempts == 1 and document.finished_at
        mapped = [r async for r in client.map("cnn", [{"x": x} for x in xs], concurrency=2)]
    for x, outputs in zip(xs, mapped):
        np.testing.assert_allclose(outputs["logits"], reference("cnn", x), rtol=1e-4, atol=1e-5)


async def test_map_stopped_early_cancels_the_jobs_in_flight_and_leaves_no_task(spawn_edge) -> None:
    edge = await spawn_edge()  # no worker for cnn: every job stays queued

    async with AsyncClient(edge.url) as client:
        before = len(asyncio.all_tasks())
        with pytest.raises(Timeout):
            async with contextlib.aclosing(client.map("cnn", ({"x": sample("cnn")} for _ in range(100)),
                                                      concurrency=4, ttl=30, timeout=1)) as results:
                async for _ in results:
                    pass
        assert len(asyncio.all_tasks()) == before


async def test_the_blocking_client_closes_its_thread_and_refuses_use_after_close(spawn_edge) -> None:
    edge = await spawn_edge()

    def use() -> None:
        assert client_threads() == []
        with Client(edge.url) as client:
            assert {m["name"] for m in client.models()} >= {"mlp", "cnn"}
            assert len(client_threads()) == 1
        assert client_threads() == []
        with pytest.raises(InferqError, match="closed"):
            client.models()
        forgotten = Client(edge.url)
        forgotten.models()
        del forgotten
        gc.collect()
        assert client_threads() == [], "a client never closed is closed when collected"

    await asyncio.to_thread(use)


async def test_amqp_client_publishes_with_confirms_and_gets_the_result_from_its_reply(
        spawn_worker, spawn_edge, synced, reference) -> None:
    edge = await spawn_edge()
    x = sample("mlp", seed=61)
    async with await AmqpClient.open(namespace=synced.namespace, edge_url=edge.url) as client:
        queued = await client.submit("mlp", {"x": x}, ttl=60)
        assert await queued.status() is JobStatus.QUEUED, "confirmed, not yet taken by a worker"
        await spawn_worker("mlp")
        close_to((await queued.result(timeout=30))["probs"], reference("mlp", x))
        assert (await client.job(queued.id).wait(30)).status is JobStatus.SUCCEEDED, "the same job over HTTP"
        pinned = await client.submit("mlp", {"x": x}, version="1", job_id=f"amqp-{time.time_ns()}")
        close_to((await pinned.result(timeout=30))["probs"], reference("mlp", x))
        with pytest.raises(UnknownModel):
            await client.submit("nope", {"x": x})
        with pytest.raises(UnknownModel):
            await client.submit("mlp", {"x": x}, version="7")
        with pytest.raises(JobFailed) as failed:
            await client.infer("mlp", {"x": np.zeros((1, 255), np.float32)}, timeout=30)
        assert failed.value.reason == "invalid_input"
    async with await AmqpClient.open(namespace=synced.namespace) as without_edge:
        mapped = [r async for r in without_edge.map("mlp", [{"x": x}] * 20, concurrency=8, timeout=30)]
    for outputs in mapped:
        close_to(outputs["probs"], reference("mlp", x))


async def test_errors_are_typed(spawn_worker, spawn_edge) -> None:
    await spawn_worker("reshape")
    edge = await spawn_edge()
    async with AsyncClient(edge.url) as client:
        with pytest.raises(UnknownModel) as unknown:
            await client.submit("nope", {"x": sample("mlp")})
        assert isinstance(unknown.value, InvalidInput) and "nope" in str(unknown.value)
        with pytest.raises(UnknownModel):
            await client.submit("mlp", {"x": sample("mlp")}, version="7")
        with pytest.raises(InvalidInput):
            await client.submit("mlp", {"x": np.zeros((1, 255), np.float32)})
        with pytest.raises(InvalidInput, match="ttl"):
            await client.submit("mlp", {"x": sample("mlp")}, ttl=10**9)
        with pytest.raises(NotFound):
            await client.job("0123456789abcdef0123456789abcdef").status()
        job = await client.submit("reshape", {"x": np.ones((2, 4), np.float32), "shape": np.array([3, 3], np.int64)})
        with pytest.raises(JobFailed) as failed:
            await job.result(timeout=30)
        assert (failed.value.job_id, failed.value.status, failed.value.reason) == (job.id, "failed", "inference_error")
        with pytest.raises(Timeout):
            await (await client.submit("cnn", {"x": sample("cnn")}, ttl=30)).result(timeout=0.5)
    async with AsyncClient(f"http://127.0.0.1:{free_port()}", retry=RetryPolicy(backoff_s=0.01)) as nobody:
        with pytest.raises(Unavailable, match="cannot reach"):
            await nobody.models()


async def test_the_readme_python_client_examples_run(spawn_worker, spawn_edge, synced) -> None:
    await spawn_worker("mlp")
    edge = await spawn_edge()
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Python client"):readme.index("## Triton")]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2
    env = {**os.environ, "INFERQ_NAMESPACE": synced.namespace}
    for block in blocks:
        code = block.replace("http://127.0.0.1:8000", edge.url)
        done = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", code], capture_output=True, text=True,
                                       timeout=120, env=env)
        assert done.returncode == 0, done.stderr
        assert "probs" not in done.stderr and done.stdout.strip()
