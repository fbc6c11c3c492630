"""Data sharding on the real stack: a large job split by the edge into chunk sub-jobs, run by several workers, joined."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from typing import Any

import aiohttp
import msgpack
import numpy as np
import pytest

from inferq.broker.codec import decode_tensor_map, encode_tensor, packb
from inferq.runtime.loader import sync_repository
from tests.models import write_mlp
from tests.support import ROOT, live_workers, wait_until

pytestmark = [pytest.mark.features, pytest.mark.timeout(180)]  # a feature suite that starts many processes: make test-features (CI runs it after make test)

MSGPACK = {"Content-Type": "application/msgpack"}


async def submit(http: aiohttp.ClientSession, url: str, model: str, x: np.ndarray, query: str = "") -> str:
    body = packb({"inputs": {"x": encode_tensor(x)}})
    async with http.post(f"{url}/v1/models/{model}/jobs{query}", data=body, headers=MSGPACK) as resp:
        assert resp.status == 202, await resp.text()
        return (await resp.json())["job_id"]


async def document(http: aiohttp.ClientSession, url: str, job_id: str, wait: float = 0) -> dict[str, Any]:
    async with http.get(f"{url}/v1/jobs/{job_id}", params={"wait": str(wait)}, headers={"Accept": "application/msgpack"}) as resp:
        assert resp.status == 200, await resp.text()
        return msgpack.unpackb(await resp.read())


async def test_a_4096_sample_job_is_split_across_workers_and_joined_in_order(synced, spawn_worker, spawn_edge, http,
                                                                             reference) -> None:
    workers = [await spawn_worker("mlp") for _ in range(3)]
    edge = await spawn_edge()
    x = np.random.default_rng(42).standard_normal((4096, 256)).astype(np.float32)
    # Paused while the chunks are handed out, so that RabbitMQ spreads them over all three
    # and the progress of one worker's share can be seen before the others run theirs.
    for w in workers:
        w.signal(signal.SIGSTOP)
    try:
        job_id = await submit(http, edge.url, "mlp", x)  # 4096 rows > the demo max_batch_size of 64: 64 chunks
        seen = [(await document(http, edge.url, job_id))["progress"]["done"]]
        workers[0].signal(signal.SIGCONT)
        for _ in range(200):
            seen.append((await document(http, edge.url, job_id))["progress"]["done"])
            if seen[-1] > 0:
                break
            await asyncio.sleep(0.01)
    finally:
        for w in workers:
            w.signal(signal.SIGCONT)
    doc = await document(http, edge.url, job_id, wait=60)
    seen.append(doc["progress"]["done"])
    assert doc["status"] == "succeeded", {k: v for k, v in doc.items() if k != "outputs"}
    assert doc["progress"] == {"done": 64, "total": 64}
    np.testing.assert_allclose(decode_tensor_map(doc["outputs"])["probs"], reference("mlp", x), rtol=1e-5, atol=1e-6)
    assert seen[0] == 0 and seen == sorted(seen) and any(0 < d < 64 for d in seen), f"progress seen: {seen}"
    # Workers publish their counters every second.
    await wait_until(lambda: _several_ran(synced, {w.pid for w in workers}), 10, "more than one worker to have run chunks")


async def _several_ran(settings: Any, pids: set[int]) -> bool:
    return sum(1 for v in (await live_workers(settings, "mlp")).values() if v["pid"] in pids and v["stats"]["jobs"] > 0) > 1


async def test_shard_n_splits_a_small_job_and_a_failing_chunk_fails_the_parent_with_its_reason(synced, spawn_worker, spawn_edge,
                                                                                                http) -> None:
    write_mlp(synced.model_repository / "brokenshard" / "1", seed=4, broken=True)  # fails on any input but zeros
    await sync_repository(synced)
    await spawn_worker("brokenshard")
    edge = await spawn_edge()
    x = np.zeros((8, 256), np.float32)
    x[6:] = 1.0  # only the last of 4 chunks holds real input
    doc = await document(http, edge.url, await submit(http, edge.url, "brokenshard", x, "?shard=4"), wait=60)
    assert doc["status"] == "failed", doc
    assert doc["error"]["code"] == "inference_error" and doc["error"]["message"].startswith("chunk 3 of 4: "), doc["error"]
    clean = await document(http, edge.url, await submit(http, edge.url, "brokenshard", np.zeros((8, 256), np.float32), "?shard=4"), 60)
    assert clean["status"] == "succeeded" and clean["progress"] == {"done": 4, "total": 4}
    assert decode_tensor_map(clean["outputs"])["probs"].shape == (8, 10)


async def test_cancelling_a_sharded_job_cancels_its_chunks(synced, spawn_edge, http) -> None:
    edge = await spawn_edge()
    x = np.random.default_rng(1).standard_normal((6, 256)).astype(np.float32)
    job_id = await submit(http, edge.url, "unserved", x, "?shard=3")  # no worker: every chunk stays queued
    async with http.delete(f"{edge.url}/v1/jobs/{job_id}") as resp:
        assert resp.status == 200 and (await resp.json())["status"] == "cancelled"
    for i in range(3):
        assert (await document(http, edge.url, f"{job_id}.c{i:05d}"))["status"] == "cancelled"


async def test_a_bad_shard_count_is_refused(synced, spawn_edge, http) -> None:
    edge = await spawn_edge()
    body = packb({"inputs": {"x": encode_tensor(np.zeros((2, 256), np.float32))}})
    async with http.post(f"{edge.url}/v1/models/mlp/jobs?shard=5", data=body, headers=MSGPACK) as resp:
        assert resp.status == 422, await resp.text()
        assert "shard must be between 1 and 2" in (await resp.json())["error"]["message"]


async def test_sdk_submit_with_shard_and_jobs_wait_shows_the_chunks_progress(synced, spawn_worker, spawn_edge, reference) -> None:
    from inferq import AsyncClient

    edge = await spawn_edge()
    x = np.random.default_rng(7).standard_normal((48, 256)).astype(np.float32)
    async with AsyncClient(edge.url) as client:
        job = await client.submit("mlp", {"x": x}, shard=6)
        first = await client.get_job(job.id)
        assert first.progress == {"done": 0, "total": 6}
        env = {k: v for k, v in os.environ.items() if k not in ("INFERQ_URL", "INFERQ_API_KEY")}
        waiting = asyncio.create_task(asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "inferq.cli", "jobs", "wait", job.id, "--url", edge.url],
            capture_output=True, text=True, timeout=120, cwd=ROOT, env=env))
        await spawn_worker("mlp")  # the chunks were waiting for a worker
        done = await waiting
        assert done.returncode == 0, done.stderr
        assert re.search(r"100%\|.*\| 6/6 ", done.stderr), done.stderr  # tqdm's last frame
        outputs = (await client.get_job(job.id)).outputs_or_raise()
    np.testing.assert_allclose(outputs["probs"], reference("mlp", x), rtol=1e-5, atol=1e-6)


async def test_a_64_mib_msgpack_input_is_accepted_and_sharded(synced, spawn_worker, spawn_edge, http, reference) -> None:
    await spawn_worker("mlp")
    edge = await spawn_edge()
    rows = (64 * 1024 * 1024 - 4096) // 1024  # float32[rows, 256]: 64 MiB less room for the body's envelope
    x = np.random.default_rng(64).standard_normal((rows, 256)).astype(np.float32)
    job_id = await submit(http, edge.url, "mlp", x)
    doc = await document(http, edge.url, job_id, wait=120)
    assert doc["status"] == "succeeded", {k: v for k, v in doc.items() if k != "outputs"}
    assert doc["progress"]["total"] == -(-rows // 64)
    probs = decode_tensor_map(doc["outputs"])["probs"]
    assert probs.shape == (rows, 10)
    np.testing.assert_allclose(probs[::997], reference("mlp", x[::997]), rtol=1e-5, atol=1e-6)
