"""The shard worker on real RabbitMQ, etcd and ONNX Runtime, over the AMQP job contract."""

from __future__ import annotations

import asyncio
import signal

import aio_pika
import numpy as np

from inferq.broker.codec import packb
from inferq.broker.messages import CONTENT_TYPE, RUNNING, SUCCEEDED
from tests.conftest import sample
from tests.support import ledger_events, live_workers, wait_until


async def test_worker_serves_amqp_jobs_with_outputs_equal_to_onnxruntime(spawn_worker, amqp, reference) -> None:
    await spawn_worker("mlp")
    inputs = {f"job-{i}-{amqp.reply_queue[-6:]}": sample("mlp", n=1 + i % 3, seed=i) for i in range(6)}
    for job_id, x in inputs.items():
        await amqp.submit("mlp", {"x": x}, job_id=job_id)
    results = await amqp.wait_results(list(inputs), timeout=30)
    for job_id, x in inputs.items():
        result = results[job_id]
        assert result["status"] == "succeeded", result
        assert result["correlation_id"] == f"c-{job_id}"
        np.testing.assert_allclose(amqp.outputs(result)["probs"], reference("mlp", x), rtol=1e-5, atol=1e-6)


async def test_cnn_jobs_pinned_to_a_version_are_served(spawn_worker, amqp, reference) -> None:
    await spawn_worker("cnn")
    x = sample("cnn", n=2, seed=7)
    job = await amqp.submit("cnn.1", {"x": x})
    result = (await amqp.wait_results([job], timeout=30))[job]
    np.testing.assert_allclose(amqp.outputs(result)["logits"], reference("cnn", x), rtol=1e-4, atol=1e-5)


async def test_concurrent_jobs_are_batched(spawn_worker, amqp, synced) -> None:
    worker = await spawn_worker("mlp")
    jobs = await asyncio.gather(*(amqp.submit("mlp", {"x": sample("mlp", seed=i)}) for i in range(200)))
    results = await amqp.wait_results(jobs, timeout=60)
    assert all(r["status"] == "succeeded" for r in results.values())
    assert max(r["timings"]["batch_size"] for r in results.values()) > 1

    async def stats_show_batches():
        records = await live_workers(synced, "mlp")
        stats = next(v["stats"] for v in records.values() if v["pid"] == worker.pid)
        return stats if stats["jobs"] >= 200 else None

    stats = await wait_until(stats_show_batches, 10, "the worker to report its counters")
    assert stats["max_batch"] > 1 and stats["batches"] < 200


async def test_every_jobs_running_event_is_in_the_ledger_once_and_before_its_final_one(spawn_worker, amqp, synced) -> None:
    # The worker queues a batch's final events without waiting for its running events' confirm: the
    # ledger's order must still say running, then succeeded, for every job of a sub-millisecond model.
    await spawn_worker("mlp")
    jobs = await asyncio.gather(*(amqp.submit("mlp", {"x": sample("mlp", seed=i)}) for i in range(300)))
    results = await amqp.wait_results(jobs, timeout=60)
    assert {r["status"] for r in results.values()} == {"succeeded"}
    seen: dict[str, list[str]] = {j: [] for j in jobs}
    for event in await ledger_events(synced):
        if event.job_id in seen:
            seen[event.job_id].append(event.status)
    assert {j: s for j, s in seen.items() if s != [RUNNING, SUCCEEDED]} == {}


async def test_a_job_with_a_bad_shape_fails_alone(spawn_worker, amqp) -> None:
    await spawn_worker("mlp")
    good = [await amqp.submit("mlp", {"x": sample("mlp", seed=i)}) for i in range(3)]
    wrong_dims = await amqp.submit("mlp", {"x": np.zeros((1, 255), np.float32)})
    wrong_dtype = await amqp.submit("mlp", {"x": np.zeros((1, 256), np.float64)})
    wrong_name = await amqp.submit("mlp", {"y": np.zeros((1, 256), np.float32)})
    results = await amqp.wait_results(good + [wrong_dims, wrong_dtype, wrong_name], timeout=30)
    assert [results[j]["status"] for j in good] == ["succeeded"] * 3
    assert results[wrong_dims]["error"]["code"] == "invalid_input"
    assert "dim 1 must be 256" in results[wrong_dims]["error"]["message"]
    assert "must be float32" in results[wrong_dtype]["error"]["message"]
    assert "inputs must be exactly ['x']" in results[wrong_name]["error"]["message"]


async def test_garbage_messages_fail_their_job_and_the_worker_keeps_serving(spawn_worker, amqp) -> None:
    worker = await spawn_worker("mlp")
    reply = {"reply_to": amqp.reply_queue}
    await amqp.publish_raw("mlp", aio_pika.Message(b"\xc1garbage", message_id="garbage-1", content_type=CONTENT_TYPE, **reply))
    await amqp.publish_raw("mlp", aio_pika.Message(packb({"inputs": {}}), message_id="empty-1", content_type=CONTENT_TYPE, **reply))
    await amqp.publish_raw("mlp", aio_pika.Message(b"{}", message_id="json-1", content_type="application/json", **reply))
    await amqp.publish_raw("mlp", aio_pika.Message(b"no id", content_type=CONTENT_TYPE))
    good = await amqp.submit("mlp", {"x": sample("mlp")})
    results = await amqp.wait_results(["garbage-1", "empty-1", "json-1", good], timeout=30)
    assert {results[j]["status"] for j in ("garbage-1", "empty-1", "json-1")} == {"failed"}
    assert results["json-1"]["error"]["code"] == "bad_message"
    assert "content_type" in results["json-1"]["error"]["message"]
    assert results[good]["status"] == "succeeded"
    assert worker.alive()


async def test_membership_key_lives_with_a_lease_and_goes_when_the_worker_stops(spawn_worker, synced) -> None:
    worker = await spawn_worker("mlp")
    records = await live_workers(synced, "mlp")
    mine = {k: v for k, v in records.items() if v["pid"] == worker.pid}
    assert len(mine) == 1
    record = next(iter(mine.values()))
    assert record["state"] == "ready" and record["version"] == "1"
    assert "CPUExecutionProvider" in record["providers"]
    assert await worker.stop() == 0
    assert not {k for k, v in (await live_workers(synced, "mlp")).items() if v["pid"] == worker.pid}


async def test_killed_worker_loses_no_job(spawn_worker, amqp, synced) -> None:
    first = await spawn_worker("mlp")
    first.signal(signal.SIGSTOP)  # frozen: the broker still pushes it a prefetch's worth of jobs it cannot finish
    try:
        jobs = await asyncio.gather(*(amqp.submit("mlp", {"x": sample("mlp", seed=i)}) for i in range(100)))
        queue = amqp.topology.model_queue("mlp", "1")

        async def all_delivered() -> bool:
            return (await amqp.queue_counts(queue))[0] == 0

        await wait_until(all_delivered, 20, "every job to be in flight at the frozen worker", interval=0.2)
    finally:
        first.signal(signal.SIGKILL)
    await first.wait(10)
    await spawn_worker("mlp")
    results = await amqp.wait_results(jobs, timeout=60)
    assert all(r["status"] == "succeeded" for r in results.values())


async def test_queue_time_is_measured_precisely_from_submission(spawn_worker, amqp) -> None:
    await spawn_worker("mlp")
    job = await amqp.submit("mlp", {"x": sample("mlp")})
    result = (await amqp.wait_results([job], 30))[job]
    assert 0 <= result["timings"]["queue_ms"] < 5000, result["timings"]
