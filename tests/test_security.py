"""Bad input at the HTTP edge, API keys and tenants, rate limits."""

from __future__ import annotations

import asyncio
import gzip
import math
import time
import uuid

import aio_pika
import pytest

from inferq.broker.codec import encode_tensor, packb
from inferq.broker.messages import CONTENT_TYPE
from inferq.edge.auth import create_key
from inferq.runtime.coordination import open_etcd
from inferq.errors import ConfigError
from inferq.runtime.repository import read_signature
from tests.conftest import sample
from tests.support import assert_each_ended_once, ledger_events
from tests.test_edge import v2_input


async def test_nan_is_refused_where_the_model_config_forbids_it(spawn_edge, http) -> None:
    edge = await spawn_edge()
    x = sample("mlp")
    x[0, 3] = math.nan
    body = packb({"inputs": {"x": encode_tensor(x)}})
    headers = {"Content-Type": "application/msgpack"}
    async with http.post(f"{edge.url}/v1/models/strict/jobs", data=body, headers=headers) as resp:
        doc = await resp.json()
        assert resp.status == 422 and "NaN" in doc["error"]["message"]
    async with http.post(f"{edge.url}/v1/models/mlp/jobs", data=body, headers=headers) as resp:
        assert resp.status == 202, "models that allow NaN take it"


async def test_a_gzip_bomb_is_stopped_at_the_body_limit(spawn_edge, http) -> None:
    edge = await spawn_edge(env={"INFERQ_EDGE_MAX_BODY_BYTES": str(1 << 20)})
    bomb = gzip.compress(b"[" + b"0," * (32 << 20) + b"0]")  # 64 MiB of JSON in well under 1 MiB
    assert len(bomb) < 1 << 20
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    async with http.post(f"{edge.url}/v1/models/mlp/jobs", data=bomb, headers=headers) as resp:
        assert resp.status == 413 and (await resp.json())["error"]["code"] == "too_large"
    async with http.get(f"{edge.url}/v2/health/ready") as resp:
        assert resp.status == 200


# Shapes that fit their (empty or tiny) data by arithmetic but not by numpy's limits, or not at all.
HOSTILE_SHAPES = [([0, 2**40, 2**40], b""), ([2**62, 0], b""), ([0] * 8 + [5], b""), ([-1, 256], b"\0" * 1024),
                  ([1, 2**31], b""), ([True, 256], b"\0" * 1024), ([1.0, 256], b"\0" * 1024), ([[1], 256], b"")]


@pytest.mark.parametrize(
    "body, status",
    [
        (b"\xdd\xff\xff\xff\xff", 400),                                            # msgpack array claiming 4 billion items
        (b"\x81\xa6inputs" + b"\x91" * 50_000 + b"\xc0", 400),                      # 50k nested arrays
        (packb({"inputs": {"x": {"dtype": "object", "shape": [1], "data": b"\x80\x04N."}}}), 400),  # object dtype / pickle bytes
        (packb({"inputs": {"x": {"dtype": "float32", "shape": [1, 256], "data": b"short"}}}), 400),
        *[(packb({"inputs": {"x": {"dtype": "float32", "shape": shape, "data": data}}}), 400) for shape, data in HOSTILE_SHAPES],
        (packb({"inputs": {"x": {"dtype": "<U4", "shape": [1], "data": b"abcd"}}}), 400),         # a string dtype
        (packb({"inputs": {"x": {"dtype": "float32", "shape": [1, 256], "data": "not bytes"}}}), 400),
        (packb({"inputs": {1: {"dtype": "float32", "shape": [1], "data": b"\0" * 4}}}), 400),    # a non-string key
        (packb({"inputs": {"x": {"dtype": "float32", "shape": [1], "data": b"\0" * 4, "extra": 1}}}), 400),
    ],
)
async def test_msgpack_bombs_hostile_shapes_and_object_dtypes_get_400(spawn_edge, http, body: bytes, status: int) -> None:
    edge = await spawn_edge()
    async with http.post(f"{edge.url}/v1/models/mlp/jobs", data=body, headers={"Content-Type": "application/msgpack"}) as resp:
        assert resp.status == status and (await resp.json())["error"]["code"] == "bad_message"
    async with http.get(f"{edge.url}/v2/health/live") as resp:
        assert resp.status == 200, "the edge lives on"


async def test_a_hostile_amqp_job_fails_alone_and_its_batch_mates_succeed(synced, spawn_worker, amqp) -> None:
    await spawn_worker("mlp")
    good = [await amqp.submit("mlp", {"x": sample("mlp", seed=i)}) for i in range(20)]
    hostile = []
    for i, (shape, data) in enumerate(HOSTILE_SHAPES):
        body = packb({"inputs": {"x": {"dtype": "float32", "shape": shape, "data": data}}})
        hostile.append(f"hostile-{i}-{uuid.uuid4().hex[:6]}")
        await amqp.publish_raw("mlp", aio_pika.Message(body, message_id=hostile[-1], content_type=CONTENT_TYPE, reply_to=amqp.reply_queue))
    good += [await amqp.submit("mlp", {"x": sample("mlp", seed=100 + i)}) for i in range(19)]
    results = await amqp.wait_results(good + hostile, timeout=60)
    assert {results[j]["status"] for j in good} == {"succeeded"}
    assert {(results[j]["status"], results[j]["error"]["code"]) for j in hostile} == {("failed", "bad_message")}
    final = assert_each_ended_once(await ledger_events(synced), good + hostile)
    assert sum(1 for j in good if final[j] == "succeeded") == len(good)


async def test_bytes_tensors_are_refused_with_422(spawn_edge, http) -> None:
    edge = await spawn_edge()
    job = {"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["cos\nsystem\n(S'id'\ntR."]}]}
    async with http.post(f"{edge.url}/v1/models/mlp/jobs", json=job) as resp:
        assert resp.status == 422


def test_a_model_whose_external_data_points_outside_its_directory_is_refused(tmp_path) -> None:
    from onnx import TensorProto, helper

    w = helper.make_tensor("w", TensorProto.FLOAT, [2], [1.0, 2.0])
    w.data_location = TensorProto.EXTERNAL
    w.ClearField("float_data")
    entry = w.external_data.add()
    entry.key, entry.value = "location", "../../../etc/passwd"
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], [w])
    path = tmp_path / "evil" / "1" / "model.onnx"
    path.parent.mkdir(parents=True)
    path.write_bytes(helper.make_model(graph).SerializeToString())
    with pytest.raises(ConfigError, match="outside its directory"):
        read_signature("evil", "1", path)


@pytest.fixture
async def keys_for(synced):
    async def make(tenant: str, rate: float = 0.0, burst: int = 0, max_priority: str = "high") -> dict[str, str]:
        async with open_etcd(synced.etcd) as client:
            token = await create_key(client, synced.namespace, tenant, rate, burst, 5, max_priority=max_priority)
        return {"Authorization": f"Bearer {token}"}
    return make


async def test_jobs_belong_to_their_tenant_and_need_a_key(spawn_worker, spawn_edge, http, keys_for) -> None:
    edge = await spawn_edge(env={"INFERQ_EDGE_AUTH": "true"})
    acme, globex = await keys_for("acme"), await keys_for("globex")
    job = {"inputs": [v2_input(sample("mlp"))]}
    async with http.post(f"{edge.url}/v1/models/mlp/jobs", json=job) as resp:
        assert resp.status == 401 and resp.headers["WWW-Authenticate"].startswith("Bearer")
    async with http.post(f"{edge.url}/v1/models/mlp/jobs", json=job, headers={"Authorization": "Bearer nope"}) as resp:
        assert resp.status == 401
    async with http.post(f"{edge.url}/v1/models/mlp/jobs", json=job, headers=acme) as resp:
        assert resp.status == 202
        job_id = (await resp.json())["job_id"]
    for method in ("GET", "DELETE"):
        async with http.request(method, f"{edge.url}/v1/jobs/{job_id}", headers=globex) as resp:
            assert resp.status == 404, "another tenant cannot see or cancel the job"
    await spawn_worker("mlp")
    async with http.get(f"{edge.url}/v1/jobs/{job_id}?wait=30", headers=acme) as resp:
        assert (await resp.json())["status"] == "succeeded"
    async with http.get(f"{edge.url}/v2/health/live") as resp:
        assert resp.status == 200, "health checks need no key"


async def test_a_tenant_over_its_rate_gets_429_with_retry_after(spawn_edge, http, keys_for) -> None:
    edge = await spawn_edge(env={"INFERQ_EDGE_AUTH": "true"})
    slow_tenant, other = await keys_for("metered", rate=0.2, burst=2), await keys_for("free")
    job = {"inputs": [v2_input(sample("cnn"))]}
    codes = []
    for _ in range(3):
        async with http.post(f"{edge.url}/v1/models/cnn/jobs", json=job, headers=slow_tenant) as resp:
            codes.append(resp.status)
            if resp.status == 429:
                assert int(resp.headers["Retry-After"]) >= 1 and (await resp.json())["error"]["code"] == "rate_limited"
    assert codes == [202, 202, 429]
    async with http.post(f"{edge.url}/v1/models/cnn/jobs", json=job, headers=other) as resp:
        assert resp.status == 202, "one tenant's limit does not hold back another"


async def test_a_tenant_limited_to_normal_priority_is_refused_high_and_its_waits_stay_normal(spawn_worker, spawn_edge, http, keys_for) -> None:
    edge = await spawn_edge(env={"INFERQ_EDGE_AUTH": "true"})
    await spawn_worker("mlp")
    bulk = await keys_for("bulk", max_priority="normal")
    body = {"inputs": [v2_input(sample("mlp"))]}
    async with http.post(f"{edge.url}/v1/models/mlp/jobs", json={**body, "priority": "high"}, headers=bulk) as resp:
        assert resp.status == 403 and "normal-priority" in (await resp.json())["error"]["message"]
    async with http.post(f"{edge.url}/v1/models/mlp/jobs", params={"wait": "10"}, json=body, headers=bulk) as resp:
        assert resp.status == 200 and (await resp.json())["status"] == "succeeded", "a wait is no request for high"


async def test_a_huge_json_submit_is_parsed_off_the_loop_so_health_checks_keep_answering(spawn_edge, http) -> None:
    edge = await spawn_edge()
    rows = 12_000  # 3 million floats, 36 MB of JSON: seconds of json.loads and list-to-array work
    data = b"0.123456789," * (rows * 256 - 1) + b"0.5"
    body = b'{"inputs":[{"name":"nope","datatype":"FP32","shape":[%d,256],"data":[%s]}]}' % (rows, data)
    started = time.monotonic()

    async def submit() -> tuple[int, dict]:
        async with http.post(f"{edge.url}/v1/models/mlp/jobs", data=body, headers={"Content-Type": "application/json"}) as resp:
            return resp.status, await resp.json()

    big = asyncio.ensure_future(submit())
    latencies = []
    while not big.done():
        t0 = time.monotonic()
        async with http.get(f"{edge.url}/v2/health/live") as resp:
            assert resp.status == 200
        latencies.append(time.monotonic() - t0)
    status, doc = await big
    took = time.monotonic() - started
    assert status == 422 and "nope" in doc["error"]["message"], doc  # parsed whole, then refused by name
    # On the loop, one health check would wait out the whole parse: most of the submit's time.
    assert len(latencies) >= 5 and max(latencies) < took / 3, (took, sorted(latencies)[-3:], len(latencies))
