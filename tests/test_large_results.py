"""Large results (issue 19): byte budgets, results read back from the ledger, 410 past retention, 413, output_too_large.

The issue's model (``x float32[N,4] -> y float32[N,1000000]``, 4 MB a job) at test scale: 64 KiB and
1 MiB a job, with the budgets scaled down alike. The module runs on a RabbitMQ node of its own whose
ledger stream keeps 16 MiB (in 1 MiB segments), so that retention by bytes is reached within a test
and tens of megabytes of results never go through the machine's shared broker.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import tracemalloc
import uuid
from collections.abc import AsyncIterator, Callable

import msgpack
import numpy as np
import onnxruntime as ort
import pytest

from inferq.broker.codec import decode_tensor_map, encode_tensor, packb
from inferq.broker.messages import JobEvent, join_packed_events, pack_event, unpack_events
from inferq.broker.topology import Topology
from inferq.edge import download, v2
from inferq.edge.projection import JOB_BYTES, JobProjection
from inferq.edge.responses import dumps
from inferq.runtime.loader import remove_namespace, sync_repository
from inferq.runtime.rabbitnode import NodeSpec, RabbitNode
from inferq.settings import BrokerSettings, EdgeSettings, JobSettings, Settings
from tests.models import write_wide_model
from tests.support import wait_until

pytestmark = pytest.mark.features  # a feature suite that starts many processes: make test-features (CI runs it after make test)

WIDE, WIDER = 16_384, 262_144  # floats a row: 64 KiB and 1 MiB
INLINE = 16 * 1024
PROJECTION_BYTES = 1024 * 1024
LEDGER_BYTES, SEGMENT_BYTES = 16 * 1024 * 1024, 1024 * 1024
MSGPACK = {"Accept": "application/msgpack"}


@pytest.fixture(scope="module")
async def broker(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RabbitNode]:
    node = RabbitNode(NodeSpec.ephemeral(), tmp_path_factory.mktemp("large-rabbit"))
    await node.astart()
    try:
        yield node
    finally:
        await node.astop()


@pytest.fixture(scope="module")
async def synced(settings: Settings, broker: RabbitNode, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Settings]:
    """This module's namespace: the wide models and small budgets (the conftest fixtures start processes on it)."""
    repo = tmp_path_factory.mktemp("large") / "models"
    write_wide_model(repo, "wide", WIDE)
    write_wide_model(repo, "wider", WIDER)
    large = dataclasses.replace(
        settings, namespace=f"t{uuid.uuid4().hex[:8]}", model_repository=repo, broker=BrokerSettings(url=broker.url),
        jobs=JobSettings(ttl_s=600, inline_result_bytes=INLINE, ledger_max_bytes=LEDGER_BYTES, ledger_segment_bytes=SEGMENT_BYTES),
        edge=dataclasses.replace(settings.edge, max_projection_bytes=PROJECTION_BYTES, result_cache_bytes=2 * 1024 * 1024),
    )
    await sync_repository(large)
    yield large
    await remove_namespace(large)


@pytest.fixture(scope="module")
def wide_reference(synced: Settings) -> Callable[[str, np.ndarray], np.ndarray]:
    sessions = {m: ort.InferenceSession(str(synced.model_repository / m / "1" / "model.onnx")) for m in ("wide", "wider")}
    return lambda model, x: sessions[model].run(None, {"x": x})[0]


def rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 4)).astype(np.float32)


async def submit(http, edge, model: str, x: np.ndarray) -> str:
    body = packb({"inputs": {"x": encode_tensor(x)}})
    async with http.post(f"{edge.url}/v1/models/{model}/jobs", data=body, headers={"Content-Type": "application/msgpack"}) as resp:
        assert resp.status == 202, await resp.text()
        return (await resp.json())["job_id"]


async def fetch(http, edge, job_id: str, accept: dict | None = MSGPACK) -> tuple[int, bytes]:
    async with http.get(f"{edge.url}/v1/jobs/{job_id}", params={"wait": "30"}, headers=accept) as resp:
        return resp.status, await resp.read()


async def metric(http, edge, name: str) -> float:
    async with http.get(f"{edge.url}/metrics") as resp:
        for line in (await resp.text()).splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


def y_of(body: bytes) -> np.ndarray:
    doc = msgpack.unpackb(body)
    assert doc["status"] == "succeeded", doc
    return decode_tensor_map(doc["outputs"])["y"]


# --- on the real stack -----------------------------------------------------------


async def test_large_results_stay_out_of_the_projection_and_every_one_reads_back_equal_to_onnxruntime(
        spawn_worker, spawn_edge, http, wide_reference) -> None:
    await spawn_worker("wide")
    edge = await spawn_edge()
    inputs = [rows(1, seed) for seed in range(100)]  # 6.4 MB of results against a 1 MiB projection
    gate = asyncio.Semaphore(16)

    async def one(x: np.ndarray) -> tuple[np.ndarray, str]:
        async with gate:
            return x, await submit(http, edge, "wide", x)

    jobs = await asyncio.gather(*(one(x) for x in inputs))
    for x, job_id in jobs:
        status, body = await fetch(http, edge, job_id)
        assert status == 200, body
        np.testing.assert_array_equal(y_of(body), wide_reference("wide", x))
    held = await metric(http, edge, "inferq_edge_jobs_in_memory")
    used = await metric(http, edge, "inferq_edge_projection_bytes")
    assert held >= 100, "no job may be forgotten: their results are not what fills the projection"
    assert used <= held * JOB_BYTES <= PROJECTION_BYTES, f"{used} bytes for {held} jobs: outputs were kept inline"
    assert await metric(http, edge, "inferq_edge_results_read_total") >= 100 - 2 * 1024 * 1024 // (WIDE * 4)


async def test_a_large_result_someone_waits_on_is_answered_without_reading_it_back(
        spawn_worker, spawn_edge, http, wide_reference) -> None:
    edge = await spawn_edge()
    x = rows(1, seed=11)
    job_id = await submit(http, edge, "wide", x)  # no worker yet: the job waits, and so does the poll below
    before = await metric(http, edge, "inferq_edge_results_read_total")
    used = await metric(http, edge, "inferq_edge_projection_bytes")  # the module's earlier jobs are in the ledger too
    waiting = asyncio.ensure_future(fetch(http, edge, job_id))
    await spawn_worker("wide")
    status, body = await waiting
    assert status == 200, body
    np.testing.assert_array_equal(y_of(body), wide_reference("wide", x))
    # The edge had the outputs in hand as the final event went by: the waiting poll got them from there.
    assert await metric(http, edge, "inferq_edge_results_read_total") == before
    assert await metric(http, edge, "inferq_edge_projection_bytes") - used < WIDE * 4, "and they stayed out of the projection"


async def test_two_edges_and_a_restarted_edge_serve_the_same_large_result_byte_for_byte(
        spawn_worker, spawn_edge, http, wide_reference) -> None:
    await spawn_worker("wider")
    first, second = await spawn_edge(), await spawn_edge()
    x = rows(2, seed=7)  # 2 MiB of outputs
    job_id = await submit(http, first, "wider", x)
    status, body = await fetch(http, first, job_id)
    assert status == 200
    np.testing.assert_array_equal(y_of(body), wide_reference("wider", x))
    assert await fetch(http, second, job_id) == (200, body)
    status, text = await fetch(http, second, job_id, accept=None)  # JSON, streamed as well
    one_piece = msgpack.unpackb(body)
    one_piece["outputs"] = v2.tensors_to_json(decode_tensor_map(one_piece["outputs"]))
    assert status == 200 and text == dumps(one_piece).encode()
    await first.process.stop()
    restarted = await spawn_edge()
    assert await fetch(http, restarted, job_id) == (200, body)
    waited = packb({"inputs": {"x": encode_tensor(x)}})  # submit and wait in one request: the same document, streamed
    async with http.post(f"{restarted.url}/v1/models/wider/jobs", params={"wait": "30"}, data=waited,
                         headers={"Content-Type": "application/msgpack", **MSGPACK}) as resp:
        assert resp.status == 200 and resp.headers["Location"].startswith("/v1/jobs/")
        np.testing.assert_array_equal(y_of(await resp.read()), wide_reference("wider", x))


async def test_a_v2_infer_call_answers_a_large_result_and_a_later_poll_reads_it_back(spawn_worker, spawn_edge, http, wide_reference) -> None:
    edge = await spawn_edge()
    x = rows(1, seed=40)
    request = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": x.ravel().tolist()}]}

    async def infer() -> tuple[int, dict, str]:
        async with http.post(f"{edge.url}/v2/models/wider/infer", json=request) as resp:
            return resp.status, await resp.json(), resp.headers.get("X-Inferq-Job-Id", "")

    calling = asyncio.ensure_future(infer())  # waiting before the worker starts: answered from what went by
    await spawn_worker("wider")
    status, body, _ = await calling
    assert status == 200, body
    y = body["outputs"][0]
    np.testing.assert_array_equal(np.asarray(y["data"], np.float32).reshape(y["shape"]), wide_reference("wider", x))
    assert await metric(http, edge, "inferq_edge_results_read_total") == 0
    other = await spawn_edge()  # it never held the outputs: a poll there reads the result back
    job_id = await submit(http, edge, "wider", x)
    assert (await fetch(http, edge, job_id))[0] == 200
    status, again = await fetch(http, other, job_id)
    assert status == 200 and np.array_equal(y_of(again), wide_reference("wider", x))
    assert await metric(http, other, "inferq_edge_results_read_total") == 1


async def test_a_result_past_the_ledgers_byte_retention_answers_410_result_expired(spawn_worker, spawn_edge, http) -> None:
    await spawn_worker("wider")
    edge = await spawn_edge()
    early = await submit(http, edge, "wider", rows(1, seed=1))
    assert (await fetch(http, edge, early))[0] == 200
    for seed in range(2, 2 + 3 * LEDGER_BYTES // (WIDER * 4) // 2):  # 24 MiB more: past the 16 MiB the stream keeps
        later = await submit(http, edge, "wider", rows(1, seed))  # each read back: the early one leaves the cache
        assert (await fetch(http, edge, later))[0] == 200

    async def expired() -> bool:
        return (await fetch(http, edge, early, accept=None))[0] == 410

    await wait_until(expired, 30, "the early result to leave the ledger")
    status, body = await fetch(http, edge, early, accept=None)
    assert status == 410 and json.loads(body)["error"]["code"] == "result_expired"


async def test_an_output_over_the_result_limit_fails_only_that_job(spawn_worker, spawn_edge, http, wide_reference) -> None:
    await spawn_worker("wider", env={"INFERQ_JOBS_MAX_RESULT_BYTES": str(2 * WIDER * 4)})
    edge = await spawn_edge()
    big, small = rows(3, seed=30), rows(1, seed=31)
    big_id, small_id = await asyncio.gather(submit(http, edge, "wider", big), submit(http, edge, "wider", small))
    status, body = await fetch(http, edge, big_id, accept=None)
    doc = json.loads(body)
    assert status == 200 and doc["status"] == "failed" and doc["error"]["code"] == "output_too_large", doc
    assert "jobs.max_result_bytes" in doc["error"]["message"]
    status, body = await fetch(http, edge, small_id)
    np.testing.assert_array_equal(y_of(body), wide_reference("wider", small))


async def test_an_input_over_the_body_limit_answers_413_naming_the_limit(spawn_edge, http) -> None:
    edge = await spawn_edge(env={"INFERQ_EDGE_MAX_BODY_BYTES": "100000"})
    body = packb({"inputs": {"x": encode_tensor(rows(10_000, seed=0))}})  # 160 kB
    async with http.post(f"{edge.url}/v1/models/wide/jobs", data=body, headers={"Content-Type": "application/msgpack"}) as resp:
        error = (await resp.json())["error"]
    assert resp.status == 413 and error["code"] == "too_large" and "100000" in error["message"]


# --- the projection and the documents, in process ------------------------------------


def finished(job_id: str, outputs: dict | None = None) -> list[JobEvent]:
    return [JobEvent(job_id, "queued", "m", "1", ttl_s=600.0),
            JobEvent(job_id, "succeeded", "m", "1", worker="w", run="r", outputs=outputs, timings={"inference_ms": 1.0})]


def test_projection_drops_inline_outputs_oldest_first_then_whole_jobs_to_keep_its_byte_budget() -> None:
    small = {"y": encode_tensor(np.ones(1024, np.float32))}  # 4 KiB, inline
    projection = JobProjection(1000, 600, max_bytes=10 * JOB_BYTES, inline_bytes=8192)
    for i in range(5):
        projection.apply(finished(f"j{i}", small), offset=i)
    assert projection.bytes <= projection.max_bytes and len(projection) == 5
    assert [projection.get(f"j{i}").held_out for i in range(5)] == [True, True, True, False, False]
    projection.apply(finished("big", {"y": encode_tensor(np.ones(4096, np.float32))}), offset=9)
    assert projection.get("big").held_out and projection.get("big").result_bytes == 16384
    for i in range(5, 20):  # past the budget in job states alone: the least recently updated go
        projection.apply(finished(f"j{i}"), offset=10 + i)
    assert projection.bytes <= projection.max_bytes and len(projection) == 10
    assert projection.get("j0") is None and projection.get("j19") is not None


def test_a_finished_job_costs_the_projection_less_than_JOB_BYTES() -> None:
    def ledger_message(job_id: str) -> bytes:  # a job's three events, as the tail reads them
        return join_packed_events([pack_event(e) for e in [
            JobEvent(job_id, "queued", "mlp", "1", tenant="acme", ttl_s=600.0),
            JobEvent(job_id, "running", "mlp", "1", tenant="acme", worker="w-0123abcd", run="0123abcd"),
            JobEvent(job_id, "succeeded", "mlp", "1", tenant="acme", worker="w-0123abcd", run="0123abcd",
                     timings={"inference_ms": 1.25, "batch_size": 4, "queue_ms": 3.5}),
        ]])

    projection = JobProjection(100_000, 600)
    bodies = [ledger_message(uuid.uuid4().hex) for _ in range(5000)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for offset, body in enumerate(bodies):
            projection.apply(unpack_events(body)[0], offset)
        per_job = (tracemalloc.get_traced_memory()[0] - before) / len(projection)
    finally:
        tracemalloc.stop()
    assert projection.bytes == len(projection) * JOB_BYTES and per_job < JOB_BYTES, per_job


@pytest.mark.parametrize("shape", [(1, 70_000), (3, 300_000), (2, 0)])
def test_streamed_documents_are_byte_for_byte_the_one_piece_documents(shape) -> None:
    y = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
    outputs = {"y": encode_tensor(y), "n": encode_tensor(np.arange(3, dtype=np.int64))}
    doc = {"job_id": "j", "status": "succeeded", "attempts": 1, "outputs": outputs, "timings": {"inference_ms": 2.0}}
    assert b"".join(download.msgpack_pieces(doc)) == packb(doc)
    for array in (y, np.float32(1.5).reshape(())):
        assert b"".join(download.json_numbers(array)) == json.dumps(array.reshape(-1).tolist()).encode()


def test_the_ledger_stream_is_retained_by_bytes_beside_age() -> None:
    args = Topology("ns")._stream_args(3600, 2 * 1024 ** 3, 64 * 1024 * 1024)
    assert args["x-max-age"] == "3600s" and args["x-max-length-bytes"] == 2 * 1024 ** 3
    assert args["x-stream-max-segment-size-bytes"] == 64 * 1024 * 1024
    defaults = JobSettings()
    assert defaults.inline_result_bytes == 64 * 1024 and EdgeSettings().max_projection_bytes == 256 * 1024 ** 2
