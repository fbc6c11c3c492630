"""The HTTP edge on real processes: submit, poll, cancel, several edges, restarts, errors, Triton clients."""

from __future__ import annotations

import asyncio
import re
import time

import msgpack
import numpy as np
import pytest

from inferq.broker.codec import decode_tensor_map, encode_tensor, packb
from inferq.runtime.coordination import keys, open_etcd
from inferq.runtime.records import WorkerRecord, WorkerState
from tests.conftest import sample


def v2_input(x: np.ndarray, name: str = "x", datatype: str = "FP32") -> dict:
    return {"name": name, "shape": list(x.shape), "datatype": datatype, "data": x.ravel().tolist()}


async def submit(http, edge, model: str, x: np.ndarray, headers: dict | None = None, query: str = "") -> dict:
    async with http.post(f"{edge.url}/v1/models/{model}/jobs{query}", json={"inputs": [v2_input(x)]}, headers=headers) as resp:
        body = await resp.json()
        assert resp.status == 202, body
        assert resp.headers["Location"] == f"/v1/jobs/{body['job_id']}"
        return body


async def poll(http, edge, job_id: str, wait: float = 30) -> dict:
    async with http.get(f"{edge.url}/v1/jobs/{job_id}", params={"wait": str(wait)}) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


def outputs_of(doc: dict) -> dict[str, np.ndarray]:
    return {o["name"]: np.asarray(o["data"], np.float32).reshape(o["shape"]) for o in doc["outputs"]}


async def test_submitted_job_is_polled_to_outputs_equal_to_onnxruntime(spawn_worker, spawn_edge, http, reference) -> None:
    await spawn_worker("mlp")
    edge = await spawn_edge()
    x = sample("mlp", n=3, seed=11)
    accepted = await submit(http, edge, "mlp", x)
    assert accepted["status"] == "queued" and accepted["model"] == "mlp" and accepted["version"] == "1"
    doc = await poll(http, edge, accepted["job_id"])
    assert doc["status"] == "succeeded", doc
    assert doc["attempts"] == 1 and doc["created_at"] <= doc["started_at"] <= doc["finished_at"]
    np.testing.assert_allclose(outputs_of(doc)["probs"], reference("mlp", x), rtol=1e-5, atol=1e-6)


async def test_long_poll_returns_as_soon_as_the_job_finishes(spawn_worker, spawn_edge, http) -> None:
    edge = await spawn_edge()
    accepted = await submit(http, edge, "mlp", sample("mlp"))
    poller = asyncio.create_task(poll(http, edge, accepted["job_id"], wait=50))
    await asyncio.sleep(0.5)
    assert not poller.done(), "the poll must wait while the job is queued"
    await spawn_worker("mlp")
    started = time.monotonic()
    doc = await asyncio.wait_for(poller, 40)
    assert doc["status"] == "succeeded"
    assert time.monotonic() - started < 40


async def test_msgpack_bodies_and_msgpack_results_with_raw_tensor_bytes(spawn_worker, spawn_edge, http, reference) -> None:
    await spawn_worker("cnn")
    edge = await spawn_edge()
    x = sample("cnn", n=2, seed=3)
    body = packb({"inputs": {"x": encode_tensor(x)}})
    async with http.post(f"{edge.url}/v1/models/cnn/jobs", data=body, headers={"Content-Type": "application/msgpack"}) as resp:
        assert resp.status == 202, await resp.text()
        job_id = (await resp.json())["job_id"]
    async with http.get(f"{edge.url}/v1/jobs/{job_id}?wait=30", headers={"Accept": "application/msgpack"}) as resp:
        assert resp.content_type == "application/msgpack"
        doc = msgpack.unpackb(await resp.read())
    assert doc["status"] == "succeeded"
    np.testing.assert_allclose(decode_tensor_map(doc["outputs"])["logits"], reference("cnn", x), rtol=1e-4, atol=1e-5)


async def test_idempotency_key_returns_the_same_job_and_queues_it_once(spawn_edge, http, amqp) -> None:
    edge = await spawn_edge()
    queue = amqp.topology.model_queue("cnn", "1")
    before = (await amqp.queue_counts(queue))[0]
    key = {"Idempotency-Key": f"order-{time.time_ns()}"}
    first = await submit(http, edge, "cnn", sample("cnn"), key)
    second = await submit(http, edge, "cnn", sample("cnn"), key)
    other = await submit(http, edge, "cnn", sample("cnn"), {"Idempotency-Key": f"other-{time.time_ns()}"})
    assert first["job_id"] == second["job_id"] != other["job_id"]
    assert (await amqp.queue_counts(queue))[0] == before + 2


async def test_cancelled_queued_job_never_runs(spawn_worker, spawn_edge, http) -> None:
    edge = await spawn_edge()
    doomed = await submit(http, edge, "mlp", sample("mlp"))
    async with http.delete(f"{edge.url}/v1/jobs/{doomed['job_id']}") as resp:
        assert resp.status == 200
        assert (await resp.json())["status"] == "cancelled"
    later = await submit(http, edge, "mlp", sample("mlp"))
    await spawn_worker("mlp")
    assert (await poll(http, edge, later["job_id"]))["status"] == "succeeded"
    doc = await poll(http, edge, doomed["job_id"], wait=0)
    assert doc["status"] == "cancelled" and doc["started_at"] is None and "outputs" not in doc
    async with http.delete(f"{edge.url}/v1/jobs/{later['job_id']}") as resp:
        assert resp.status == 200 and (await resp.json())["status"] == "succeeded"


async def test_a_job_accepted_by_one_edge_is_visible_on_another_at_once(spawn_worker, spawn_edge, http) -> None:
    a, b = await spawn_edge(), await spawn_edge()
    accepted = await submit(http, a, "cnn", sample("cnn"))
    seen = await poll(http, b, accepted["job_id"], wait=0)
    assert seen["status"] in ("queued", "running", "succeeded")
    await spawn_worker("cnn")
    assert (await poll(http, b, accepted["job_id"]))["status"] == "succeeded"


async def test_finished_job_survives_an_edge_restart(spawn_worker, spawn_edge, http) -> None:
    await spawn_worker("mlp")
    edge = await spawn_edge()
    accepted = await submit(http, edge, "mlp", sample("mlp", seed=5))
    done = await poll(http, edge, accepted["job_id"])
    assert await edge.process.stop() == 0
    again = await spawn_edge(port=edge.port)
    assert await poll(http, again, accepted["job_id"], wait=0) == done


async def test_amqp_direct_jobs_are_pollable_over_http(spawn_worker, spawn_edge, http, amqp) -> None:
    await spawn_worker("mlp")
    edge = await spawn_edge()
    job_id = await amqp.submit("mlp", {"x": sample("mlp")}, job_id=f"direct-{time.time_ns()}")
    await amqp.wait_results([job_id], 30)
    doc = await poll(http, edge, job_id)
    assert doc["status"] == "succeeded" and doc["model"] == "mlp"


@pytest.mark.parametrize(
    "path, kwargs, status, code",
    [
        ("/v1/models/mlp/jobs", {"data": b"{not json", "headers": {"Content-Type": "application/json"}}, 400, "bad_message"),
        ("/v1/models/mlp/jobs", {"data": b"\xc1", "headers": {"Content-Type": "application/msgpack"}}, 400, "bad_message"),
        ("/v1/models/mlp/jobs", {"data": b"x=1", "headers": {"Content-Type": "text/plain"}}, 415, "unsupported_media_type"),
        ("/v1/models/nope/jobs", {"json": {"inputs": [v2_input(np.zeros((1, 256), np.float32))]}}, 404, "unknown_model"),
        ("/v1/models/mlp/versions/7/jobs", {"json": {"inputs": [v2_input(np.zeros((1, 256), np.float32))]}}, 404, "unknown_model"),
        ("/v1/models/mlp/jobs", {"json": {"inputs": [v2_input(np.zeros((1, 255), np.float32))]}}, 422, "invalid_input"),
        ("/v1/models/mlp/jobs", {"json": {"inputs": [v2_input(np.zeros((256,), np.float32))]}}, 422, "invalid_input"),
        ("/v1/models/mlp/jobs", {"json": {"inputs": [v2_input(np.zeros((1, 256), np.int32), datatype="INT32")]}}, 422, "invalid_input"),
        ("/v1/models/mlp/jobs", {"json": {"inputs": [v2_input(np.zeros((1, 256), np.float32), name="y")]}}, 422, "invalid_input"),
        ("/v1/models/mlp/jobs", {"json": {"inputs": [v2_input(np.zeros((1, 256), np.float32))], "outputs": [{"name": "nope"}]}}, 422, "invalid_input"),
    ],
)
async def test_bad_submissions_get_a_json_error_with_the_right_status(spawn_edge, http, path, kwargs, status, code) -> None:
    edge = await spawn_edge()
    async with http.post(edge.url + path, **kwargs) as resp:
        body = await resp.json()
        assert (resp.status, body["error"]["code"]) == (status, code), body
        assert body["error"]["message"]
    async with http.get(f"{edge.url}/v2/health/ready") as resp:
        assert resp.status == 200


async def test_json_answers_end_with_a_newline_and_a_malformed_body_is_called_a_body(spawn_edge, http) -> None:
    edge = await spawn_edge()
    body = {"inputs": [v2_input(np.zeros((1, 256), np.float32))]}
    answers = [await http.post(f"{edge.url}/v1/models/mlp/jobs", json=body), await http.get(f"{edge.url}/v1/models"),
               await http.get(f"{edge.url}/v2/health/ready"), await http.get(f"{edge.url}/v1/jobs/nosuchjob")]
    for resp in answers:
        text = await resp.text()
        assert text.endswith("}\n") and text.count("\n") == 1, (resp.url, text[-40:])
    async with http.post(f"{edge.url}/v1/models/mlp/jobs", data=b'{"inputs": [}',
                         headers={"Content-Type": "application/json"}) as resp:
        message = (await resp.json())["error"]["message"]
    assert message == "request body is not valid JSON: Expecting value: line 1 column 13 (char 12)"


async def test_unknown_and_malformed_job_ids_get_404_and_400(spawn_edge, http) -> None:
    edge = await spawn_edge()
    async with http.get(f"{edge.url}/v1/jobs/0123456789abcdef0123456789abcdef") as resp:
        assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_found"
    async with http.get(f"{edge.url}/v1/jobs/bad%20id!") as resp:
        assert resp.status == 400 and (await resp.json())["error"]["code"] == "bad_message"
    async with http.delete(f"{edge.url}/v1/jobs/0123456789abcdef0123456789abcdef") as resp:
        assert resp.status == 404
    async with http.get(f"{edge.url}/v1/jobs/abc?wait=soon") as resp:
        assert resp.status == 400


async def test_body_over_the_limit_gets_413(spawn_edge, http) -> None:
    edge = await spawn_edge(env={"INFERQ_EDGE_MAX_BODY_BYTES": "4096"})
    big = {"inputs": [v2_input(np.zeros((8, 256), np.float32))]}
    async with http.post(f"{edge.url}/v1/models/mlp/jobs", json=big) as resp:
        assert resp.status == 413 and (await resp.json())["error"]["code"] == "too_large"


async def test_full_model_queue_gets_429_with_retry_after(spawn_edge, http, synced) -> None:
    edge = await spawn_edge()
    statuses = []
    for _ in range(5):
        async with http.post(f"{edge.url}/v1/models/tiny/jobs", json={"inputs": [v2_input(sample("mlp"))]}) as resp:
            statuses.append(resp.status)
            if resp.status == 429:
                assert resp.headers["Retry-After"] and (await resp.json())["error"]["code"] == "broker_rejected"
    # Quorum queues enforce the limit once it is reached, so one more job may get in.
    assert statuses[:3] == [202] * 3 and statuses[-1] == 429
    assert statuses[statuses.index(429):] == [429] * (5 - statuses.index(429))


async def test_model_listing_shows_versions_workers_and_queue_depth(spawn_worker, spawn_edge, http) -> None:
    worker = await spawn_worker("mlp")
    edge = await spawn_edge()
    async with http.get(f"{edge.url}/v1/models/mlp") as resp:
        doc = await resp.json()
    assert doc["default_version"] == "1" and doc["versions"]["1"]["inputs"] == [{"name": "x", "dtype": "float32", "shape": [None, 256]}]
    assert worker.pid in [w["pid"] for w in doc["workers"]]
    started = next(w["started_at"] for w in doc["workers"] if w["pid"] == worker.pid)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", started), f"ISO 8601 like job documents: {started}"
    assert isinstance(doc["queue_depth"]["1"], int)
    async with http.get(f"{edge.url}/v1/models") as resp:
        assert {"mlp", "cnn"} <= {m["name"] for m in (await resp.json())["models"]}


async def test_a_warming_worker_shows_in_the_model_listing_with_its_warming_time(synced, spawn_edge, http) -> None:
    # The record a worker registers while it builds its engine, written as it would ("unserved" has no worker).
    record = WorkerRecord("warming-test", "unserved", "1", node="n", pid=1, state=WorkerState.WARMING,
                          started_at=time.time() - 12, warming_since=time.time() - 12)
    key = keys(synced.namespace).worker(record.worker_id).encode()
    async with open_etcd(synced.etcd) as client:
        await client.put(key, record.to_json().encode())
        try:
            edge = await spawn_edge()
            async with http.get(f"{edge.url}/v1/models/unserved") as resp:
                doc = await resp.json()
        finally:
            await client.delete(key)
    (worker,) = [w for w in doc["workers"] if w["worker_id"] == "warming-test"]
    assert worker["state"] == "warming" and 12 <= worker["warming_s"] < 60, worker
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", worker["warming_since"]), worker


async def test_tritonclient_http_infers_the_same_numbers_as_onnxruntime(spawn_worker, spawn_edge, reference) -> None:
    import tritonclient.http as httpclient

    await spawn_worker("cnn")
    edge = await spawn_edge()
    x = sample("cnn", n=2, seed=9)

    def call() -> tuple[np.ndarray, bool, dict]:
        client = httpclient.InferenceServerClient(url=f"127.0.0.1:{edge.port}")
        try:
            meta = client.get_model_metadata("cnn")
            inp = httpclient.InferInput("x", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=True)
            result = client.infer("cnn", [inp], outputs=[httpclient.InferRequestedOutput("logits", binary_data=True)])
            return result.as_numpy("logits"), client.is_model_ready("cnn"), meta
        finally:
            client.close()

    logits, ready, meta = await asyncio.to_thread(call)
    assert ready and meta["inputs"][0] == {"name": "x", "datatype": "FP32", "shape": [-1, 3, 64, 64]}
    np.testing.assert_allclose(logits, reference("cnn", x), rtol=1e-4, atol=1e-5)


async def test_submit_with_wait_answers_with_the_finished_job(spawn_worker, spawn_edge, http, reference) -> None:
    await spawn_worker("mlp")
    edge = await spawn_edge()
    x = sample("mlp", seed=21)
    async with http.post(f"{edge.url}/v1/models/mlp/jobs?wait=30", json={"inputs": [v2_input(x)]}) as resp:
        doc = await resp.json()
        assert resp.status == 200 and resp.headers["Location"] == f"/v1/jobs/{doc['job_id']}"
    assert doc["status"] == "succeeded"
    np.testing.assert_allclose(outputs_of(doc)["probs"], reference("mlp", x), rtol=1e-5, atol=1e-6)
    async with http.post(f"{edge.url}/v1/models/unserved/jobs?wait=0.2", json={"inputs": [v2_input(x)]}) as resp:
        assert resp.status == 202, "a job that does not finish in time is answered as accepted"
        assert (await resp.json())["status"] == "queued"


async def test_a_cancellation_that_only_reached_the_workers_still_ends_the_job(spawn_worker, spawn_edge, http, amqp) -> None:
    from inferq.broker.ledger import LedgerWriter
    from inferq.broker.messages import CANCELLED, JobEvent

    edge = await spawn_edge()
    job = await submit(http, edge, "cnn", sample("cnn"))
    # As if the edge died between the cancel stream and the ledger: only workers hear of it.
    cancels = await LedgerWriter.open(amqp.connection, amqp.topology.cancels)
    try:
        await cancels.write([JobEvent(job["job_id"], CANCELLED, "cnn", "1")])
    finally:
        await cancels.aclose()
    await spawn_worker("cnn")
    doc = await poll(http, edge, job["job_id"])
    assert doc["status"] == "cancelled" and doc["started_at"] is None and "outputs" not in doc
