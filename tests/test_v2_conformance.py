"""Triton / KServe v2 conformance, driven only by the official clients (tritonclient.http and .grpc).

One edge (HTTP and gRPC on free ports) and real workers for mlp, cnn and reshape serve the
module; the model-control tests start their own autoscaler and an edge with API keys on.
Every error is checked the way a user meets it: the client's exception, its status and a
message that says what was wrong.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aio_grpcclient
import tritonclient.http as httpclient
import tritonclient.http.aio as aio_httpclient
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException

from inferq.edge.auth import create_key
from inferq.runtime.coordination import keys, open_etcd
from inferq.runtime.repository import ModelConfig
from inferq.settings import Settings
from tests.conftest import Edge, free_port, sample
from tests.support import ROOT, Process, live_workers, settings_env, wait_until

SERVED = ("mlp", "cnn", "reshape")
OUTPUT = {"mlp": "probs", "cnn": "logits"}
EXTENSIONS = {"binary_tensor_data", "model_configuration", "model_repository", "statistics"}


@pytest.fixture(scope="module")
async def stack(synced: Settings, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Edge]:
    """One edge with gRPC on a free port, and a ready worker of each SERVED model."""
    logs = tmp_path_factory.mktemp("v2-stack")
    workers = [Process(["worker", "--model", m], synced, logs / f"worker-{m}.log") for m in SERVED]
    port, grpc_port = free_port(), free_port()
    edge = Edge(Process(["edge", "--port", str(port), "--grpc-port", str(grpc_port)], synced, logs / "edge.log"), port, grpc_port)
    try:
        async def all_registered() -> bool:
            assert all(w.alive() for w in workers), [w.output() for w in workers]
            pids = {record["pid"] for record in (await live_workers(synced)).values()}
            return all(w.pid in pids for w in workers)

        await wait_until(all_registered, 60, "the workers to register")
        await wait_until(lambda: http_ready(edge), 30, "the edge to be ready", interval=0.1)
        yield edge
    finally:
        await asyncio.gather(*(p.stop() for p in [edge.process, *workers]))


async def http_ready(edge: Edge) -> bool:
    assert edge.process.alive(), edge.process.output()
    try:
        async with aiohttp.ClientSession() as http, http.get(f"{edge.url}/v2/health/ready") as resp:
            return resp.status == 200
    except aiohttp.ClientConnectionError:
        return False


def http_client(edge: Edge) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(url=f"127.0.0.1:{edge.port}", network_timeout=60)


def grpc_client(edge: Edge) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(url=f"127.0.0.1:{edge.grpc_port}")


async def with_clients(edge: Edge, call: Callable[[httpclient.InferenceServerClient, grpcclient.InferenceServerClient], Any]) -> Any:
    """Run ``call(http, grpc)`` with both blocking clients, off the event loop."""
    def run() -> Any:
        h, g = http_client(edge), grpc_client(edge)
        try:
            return call(h, g)
        finally:
            h.close()
            g.close()
    return await asyncio.to_thread(run)


def http_input(x: np.ndarray, binary: bool, name: str = "x", datatype: str = "FP32") -> httpclient.InferInput:
    tensor = httpclient.InferInput(name, list(x.shape), datatype)
    tensor.set_data_from_numpy(x, binary_data=binary)
    return tensor


def grpc_input(x: np.ndarray, name: str = "x", datatype: str = "FP32") -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(x.shape), datatype)
    tensor.set_data_from_numpy(x)
    return tensor


def assert_refused(exc: InferenceServerException, status: str, code: str, *fragments: str) -> None:
    """The client's exception carries the status and a readable message led by the stable code."""
    assert exc.status() == status, (exc.status(), exc.message())
    assert exc.message().startswith(f"{code}: "), exc.message()
    for fragment in fragments:
        assert fragment in exc.message(), exc.message()
    assert exc.message() in str(exc)  # str() works and says why (it crashed on dict bodies before)


# --- server and model facts -------------------------------------------------------------


async def test_server_metadata_health_and_extensions_over_http_and_grpc(stack) -> None:
    def call(h, g):
        return (h.is_server_live(), h.is_server_ready(), h.get_server_metadata(),
                g.is_server_live(), g.is_server_ready(), g.get_server_metadata())

    h_live, h_ready, h_meta, g_live, g_ready, g_meta = await with_clients(stack, call)
    assert h_live and h_ready and g_live and g_ready
    assert h_meta["name"] == g_meta.name == "inferq"
    assert h_meta["version"] == g_meta.version and h_meta["version"]
    assert set(h_meta["extensions"]) == set(g_meta.extensions) == EXTENSIONS


@pytest.mark.parametrize("model, shape", [("mlp", [-1, 256]), ("cnn", [-1, 3, 64, 64])])
async def test_model_metadata_and_readiness_agree_over_http_and_grpc(stack, model, shape) -> None:
    def call(h, g):
        return (h.get_model_metadata(model), h.get_model_metadata(model, "1"), h.is_model_ready(model),
                h.is_model_ready(model, "1"), g.get_model_metadata(model), g.is_model_ready(model, "1"))

    h_meta, h_meta_v1, h_ready, h_ready_v1, g_meta, g_ready = await with_clients(stack, call)
    assert h_meta == h_meta_v1
    assert h_meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": shape}]
    assert h_meta["outputs"][0]["name"] == OUTPUT[model] and h_meta["platform"] == "onnxruntime_onnx"
    assert (g_meta.name, list(g_meta.versions), g_meta.platform) == (model, h_meta["versions"], "onnxruntime_onnx")
    assert [(t.name, t.datatype, list(t.shape)) for t in g_meta.inputs] == [("x", "FP32", shape)]
    assert h_ready and h_ready_v1 and g_ready


async def test_model_config_is_built_from_the_signature_and_config_toml(stack, synced) -> None:
    batching = ModelConfig.load(synced.model_repository / "mlp" / "config.toml").batching

    def call(h, g):
        return h.get_model_config("mlp"), h.get_model_config("reshape", "1"), g.get_model_config("mlp").config

    mlp, reshape, g_mlp = await with_clients(stack, call)
    assert mlp["name"] == "mlp" and mlp["platform"] == "onnxruntime_onnx" and mlp["backend"] == "onnxruntime"
    assert mlp["max_batch_size"] == batching.max_batch_size
    assert mlp["input"] == [{"name": "x", "data_type": "TYPE_FP32", "dims": [256]}]
    assert mlp["output"] == [{"name": "probs", "data_type": "TYPE_FP32", "dims": [10]}]
    assert mlp["dynamic_batching"]["max_queue_delay_microseconds"] == round(batching.max_queue_delay_ms * 1000)
    assert mlp["instance_group"][0]["kind"] == "KIND_CPU" and mlp["instance_group"][0]["count"] >= 1
    assert mlp["version_policy"] == {"all": {}}
    # Not every input has a dynamic batch dim: no batching, full dims, as Triton describes such models.
    assert reshape["max_batch_size"] == 0 and "dynamic_batching" not in reshape
    assert reshape["input"] == [{"name": "x", "data_type": "TYPE_FP32", "dims": [-1, 4]},
                                {"name": "shape", "data_type": "TYPE_INT64", "dims": [2]}]
    assert g_mlp.max_batch_size == batching.max_batch_size
    assert [(i.name, i.data_type, list(i.dims)) for i in g_mlp.input] == [("x", model_config_pb2.TYPE_FP32, [256])]
    assert g_mlp.dynamic_batching.max_queue_delay_microseconds == round(batching.max_queue_delay_ms * 1000)
    assert g_mlp.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert g_mlp.version_policy.HasField("all")


async def test_repository_index_lists_every_model_version_as_ready(stack, synced) -> None:
    def call(h, g):
        return h.get_model_repository_index(), g.get_model_repository_index().models

    h_index, g_index = await with_clients(stack, call)
    assert {"name": "mlp", "version": "1", "state": "READY", "reason": ""} in h_index
    assert {"cnn", "reshape", "tiny", "strict"} <= {m["name"] for m in h_index}
    assert sorted((m.name, m.version, m.state) for m in g_index) == sorted((m["name"], m["version"], m["state"]) for m in h_index)


# --- inference ---------------------------------------------------------------------------


@pytest.mark.parametrize("binary_in, binary_out", [(True, True), (False, False), (True, False), (False, True)])
@pytest.mark.parametrize("model", ["mlp", "cnn"])
async def test_http_inference_with_binary_and_json_tensors_equals_onnxruntime(stack, reference, model, binary_in, binary_out) -> None:
    x = sample(model, n=2, seed=31)

    def call(h, g):
        wanted = [httpclient.InferRequestedOutput(OUTPUT[model], binary_data=binary_out)]
        return h.infer(model, [http_input(x, binary_in)], outputs=wanted, request_id="req-7")

    result = await with_clients(stack, call)
    response = result.get_response()
    assert (response["model_name"], response["model_version"], response["id"]) == (model, "1", "req-7")
    assert ("data" in response["outputs"][0]) is not binary_out
    np.testing.assert_allclose(result.as_numpy(OUTPUT[model]), reference(model, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model, version", [("mlp", ""), ("cnn", "1")])
async def test_grpc_inference_with_raw_contents_equals_onnxruntime(stack, reference, model, version) -> None:
    x = sample(model, n=3, seed=32)

    def call(h, g):
        return g.infer(model, [grpc_input(x)], model_version=version, request_id="g-1",
                       outputs=[grpcclient.InferRequestedOutput(OUTPUT[model])])

    result = await with_clients(stack, call)
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == (model, "1", "g-1")
    assert len(response.raw_output_contents) == 1 and list(response.outputs[0].shape) == [3, 10]
    np.testing.assert_allclose(result.as_numpy(OUTPUT[model]), reference(model, x), rtol=1e-4, atol=1e-5)


async def test_64_concurrent_requests_from_each_asyncio_client_equal_onnxruntime_and_are_ledger_jobs(stack, reference, http) -> None:
    inputs = [sample("mlp", n=1 + i % 3, seed=100 + i) for i in range(64)]
    h = aio_httpclient.InferenceServerClient(url=f"127.0.0.1:{stack.port}")
    g = aio_grpcclient.InferenceServerClient(url=f"127.0.0.1:{stack.grpc_port}")
    try:
        async def over_http(x: np.ndarray) -> Any:
            return await h.infer("mlp", [http_input_aio(x)])

        async def over_grpc(x: np.ndarray) -> Any:
            tensor = aio_grpcclient.InferInput("x", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            return await g.infer("mlp", [tensor], client_timeout=60)

        results = await asyncio.gather(*(over_http(x) for x in inputs), *(over_grpc(x) for x in inputs))
    finally:
        await h.close()
        await g.close()
    for x, result in zip(inputs + inputs, results):
        np.testing.assert_allclose(result.as_numpy("probs"), reference("mlp", x), rtol=1e-4, atol=1e-5)
    # Every call was a job of the ledger: HTTP answers with the job id, gRPC names it in a parameter.
    job_ids = [r.get_response()["id"] for r in results[:64]]
    job_ids += [r.get_response().parameters["inferq_job_id"].string_param for r in results[64:]]
    assert len(set(job_ids)) == 128
    for job_id in job_ids:
        async with http.get(f"{stack.url}/v1/jobs/{job_id}") as resp:
            doc = await resp.json()
            assert doc["status"] == "succeeded" and doc["timings"]["batch_size"] >= 1, doc


# --- statistics -------------------------------------------------------------------------


def http_stats(h, model: str) -> dict:
    (entry,) = h.get_inference_statistics(model, "1")["model_stats"]
    return entry


async def test_statistics_count_successes_failures_and_ns_durations_alike_over_both_protocols(stack) -> None:
    x = sample("mlp", seed=41)

    def call(h, g):
        before = http_stats(h, "mlp"), http_stats(h, "reshape")
        for _ in range(3):
            h.infer("mlp", [http_input(x, True)])
        bad = [http_input(np.ones((2, 4), np.float32), True), http_input(np.array([3, 3], np.int64), True, "shape", "INT64")]
        with pytest.raises(InferenceServerException):
            h.infer("reshape", bad)
        after = http_stats(h, "mlp"), http_stats(h, "reshape")
        return before, after, h.get_inference_statistics(), g.get_inference_statistics("mlp", "1").model_stats[0]

    (mlp0, reshape0), (mlp1, reshape1), everything, g_mlp = await with_clients(stack, call)
    success0, success1 = mlp0["inference_stats"]["success"], mlp1["inference_stats"]["success"]
    assert success1["count"] >= success0["count"] + 3 and success1["ns"] > success0["ns"]
    for kind in ("queue", "compute_infer"):
        assert mlp1["inference_stats"][kind]["count"] >= mlp0["inference_stats"][kind]["count"] + 3
        assert mlp1["inference_stats"][kind]["ns"] > mlp0["inference_stats"][kind]["ns"]
    assert mlp1["inference_count"] >= mlp0["inference_count"] + 3 and mlp1["execution_count"] >= 1
    assert mlp1["last_inference"] >= mlp0["last_inference"] and mlp1["last_inference"] > 0
    assert sum(b["compute_infer"]["count"] * b["batch_size"] for b in mlp1["batch_stats"]) <= mlp1["inference_count"]
    assert reshape1["inference_stats"]["fail"]["count"] >= reshape0["inference_stats"]["fail"]["count"] + 1
    assert {("mlp", "1"), ("cnn", "1"), ("reshape", "1")} <= {(s["name"], s["version"]) for s in everything["model_stats"]}
    assert g_mlp.inference_stats.success.count >= success1["count"]
    assert g_mlp.inference_stats.compute_infer.ns >= mlp1["inference_stats"]["compute_infer"]["ns"]


# --- errors ---------------------------------------------------------------------------------


ZEROS = np.zeros((1, 256), np.float32)

# (case, call on the HTTP client, HTTP status, gRPC call, gRPC status, code, fragment of the reason)
ERRORS: list[tuple[str, Callable, str, Callable, str, str, str]] = [
    ("unknown model", lambda h: h.infer("nope", [http_input(ZEROS, True)]), "404",
     lambda g: g.infer("nope", [grpc_input(ZEROS)]), "StatusCode.NOT_FOUND", "unknown_model", "model 'nope' is not known"),
    ("unknown version", lambda h: h.infer("mlp", [http_input(ZEROS, True)], model_version="7"), "404",
     lambda g: g.infer("mlp", [grpc_input(ZEROS)], model_version="7"), "StatusCode.NOT_FOUND", "unknown_model", "no version '7'"),
    ("wrong shape", lambda h: h.infer("mlp", [http_input(np.zeros((1, 255), np.float32), False)]), "422",
     lambda g: g.infer("mlp", [grpc_input(np.zeros((1, 255), np.float32))]), "StatusCode.INVALID_ARGUMENT",
     "invalid_input", "input 'x' dim 1 must be 256"),
    ("wrong datatype", lambda h: h.infer("mlp", [http_input(ZEROS.astype(np.int32), True, datatype="INT32")]), "422",
     lambda g: g.infer("mlp", [grpc_input(ZEROS.astype(np.int32), datatype="INT32")]), "StatusCode.INVALID_ARGUMENT",
     "invalid_input", "must be float32, got int32"),
    ("wrong input name", lambda h: h.infer("mlp", [http_input(ZEROS, True, name="y")]), "422",
     lambda g: g.infer("mlp", [grpc_input(ZEROS, name="y")]), "StatusCode.INVALID_ARGUMENT", "invalid_input", "inputs must be exactly ['x']"),
    ("unknown output", lambda h: h.infer("mlp", [http_input(ZEROS, True)], outputs=[httpclient.InferRequestedOutput("nope")]), "422",
     lambda g: g.infer("mlp", [grpc_input(ZEROS)], outputs=[grpcclient.InferRequestedOutput("nope")]),
     "StatusCode.INVALID_ARGUMENT", "invalid_input", "unknown output(s) ['nope']"),
    ("bytes tensor", lambda h: h.infer("mlp", [http_input(np.array([b"a"], np.object_), True, datatype="BYTES")]), "422",
     lambda g: g.infer("mlp", [grpc_input(np.array([b"a"], np.object_), datatype="BYTES")]), "StatusCode.INVALID_ARGUMENT",
     "invalid_input", "'BYTES' is not supported"),
    ("classification", lambda h: h.infer("mlp", [http_input(ZEROS, True)], outputs=[httpclient.InferRequestedOutput("probs", class_count=3)]),
     "422", lambda g: g.infer("mlp", [grpc_input(ZEROS)], outputs=[grpcclient.InferRequestedOutput("probs", class_count=3)]),
     "StatusCode.INVALID_ARGUMENT", "invalid_input", "classification is not supported"),
    ("inference error", lambda h: h.infer("reshape", [http_input(np.ones((2, 4), np.float32), True),
                                                      http_input(np.array([3, 3], np.int64), True, "shape", "INT64")]), "500",
     lambda g: g.infer("reshape", [grpc_input(np.ones((2, 4), np.float32)), grpc_input(np.array([3, 3], np.int64), "shape", "INT64")]),
     "StatusCode.INTERNAL", "inference_error", "Reshape"),
    ("metadata of an unknown model", lambda h: h.get_model_metadata("nope"), "404",
     lambda g: g.get_model_metadata("nope"), "StatusCode.NOT_FOUND", "unknown_model", "'nope'"),
    ("config of an unknown version", lambda h: h.get_model_config("mlp", "9"), "404",
     lambda g: g.get_model_config("mlp", "9"), "StatusCode.NOT_FOUND", "unknown_model", "no version '9'"),
    ("statistics of an unknown model", lambda h: h.get_inference_statistics("nope"), "404",
     lambda g: g.get_inference_statistics("nope"), "StatusCode.NOT_FOUND", "unknown_model", "'nope'"),
    ("loading an unknown model", lambda h: h.load_model("nope"), "404",
     lambda g: g.load_model("nope"), "StatusCode.NOT_FOUND", "unknown_model", "'nope'"),
    ("loading with a config override", lambda h: h.load_model("mlp", config="{}"), "422",
     lambda g: g.load_model("mlp", config="{}"), "StatusCode.INVALID_ARGUMENT", "invalid_input", "'config'"),
]


@pytest.mark.parametrize("case, http_call, http_status, grpc_call, grpc_status, code, reason", ERRORS, ids=[c[0] for c in ERRORS])
async def test_every_error_reaches_both_clients_with_its_status_and_a_readable_reason(
        stack, case, http_call, http_status, grpc_call, grpc_status, code, reason) -> None:
    def call(h, g):
        with pytest.raises(InferenceServerException) as over_http:
            http_call(h)
        with pytest.raises(InferenceServerException) as over_grpc:
            grpc_call(g)
        return over_http.value, over_grpc.value

    over_http, over_grpc = await with_clients(stack, call)
    assert_refused(over_http, http_status, code, reason)
    assert_refused(over_grpc, grpc_status, code, reason)


async def test_readiness_of_an_unknown_model_is_false_over_http_and_not_found_over_grpc(stack) -> None:
    def call(h, g):
        with pytest.raises(InferenceServerException) as caught:
            g.is_model_ready("nope")
        return h.is_model_ready("nope"), caught.value

    ready, over_grpc = await with_clients(stack, call)
    assert ready is False
    assert_refused(over_grpc, "StatusCode.NOT_FOUND", "unknown_model", "'nope'")


async def test_shared_memory_is_refused_with_the_reason(stack) -> None:
    def call(h, g):
        tensor = httpclient.InferInput("x", [1, 256], "FP32")
        tensor.set_shared_memory("region", 1024)
        with pytest.raises(InferenceServerException) as over_http:
            h.infer("mlp", [tensor])
        with pytest.raises(InferenceServerException) as registering:
            g.register_system_shared_memory("region", "/inferq-shm", 1024)
        with pytest.raises(InferenceServerException) as status:
            g.get_cuda_shared_memory_status()
        return over_http.value, registering.value, status.value

    over_http, registering, status = await with_clients(stack, call)
    assert_refused(over_http, "422", "invalid_input", "shared_memory_region is not supported")
    for exc in (registering, status):
        assert exc.status() == "StatusCode.UNIMPLEMENTED" and "worker processes" in exc.message() and "raw_input_contents" in exc.message()


async def test_a_full_queue_is_resource_exhausted_over_grpc_and_429_over_http(stack, http) -> None:
    # "tiny_v2" holds 3 jobs per priority queue and has no worker: fill its high queue, where the synchronous
    # v2 calls go (a caller waits), with /v1 jobs (they wait there until their TTL).
    job = {"inputs": [{"name": "x", "shape": [1, 256], "datatype": "FP32", "data": [0.0] * 256}], "priority": "high"}

    async def full() -> bool:
        async with http.post(f"{stack.url}/v1/models/tiny_v2/jobs?ttl=30", json=job) as resp:
            return resp.status == 429

    await wait_until(full, 10, "the queue to be full")

    def call(h, g):
        with pytest.raises(InferenceServerException) as over_grpc:
            g.infer("tiny_v2", [grpc_input(sample("mlp"))], client_timeout=10)
        with pytest.raises(InferenceServerException) as over_http:
            h.infer("tiny_v2", [http_input(sample("mlp"), True)], timeout=10_000_000)
        return over_grpc.value, over_http.value

    over_grpc, over_http = await with_clients(stack, call)
    assert_refused(over_grpc, "StatusCode.RESOURCE_EXHAUSTED", "broker_rejected")
    assert_refused(over_http, "429", "broker_rejected")


async def test_a_call_that_outlives_its_timeout_parameter_gets_504(stack) -> None:
    def call(h, g):
        # "strict" has no worker here: the job waits in the queue until the call's timeout, its TTL, ends it.
        with pytest.raises(InferenceServerException) as over_http:
            h.infer("strict", [http_input(sample("mlp"), True)], timeout=500_000)
        return over_http.value

    waited = await with_clients(stack, call)
    assert waited.status() == "504"
    # Whichever comes first: the edge's wait ends, or the broker expires the job (its TTL is the wait).
    assert waited.message().startswith(("timeout: job", "expired: job was not started within its TTL")), waited.message()


def http_input_aio(x: np.ndarray) -> aio_httpclient.InferInput:
    tensor = aio_httpclient.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=True)
    return tensor


async def test_v2_error_bodies_are_the_protocols_and_v1_keeps_its_own(stack, http) -> None:
    async with http.post(f"{stack.url}/v2/models/mlp/infer", data=b"{not json", headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 400
        body = await resp.json()
        assert list(body) == ["error"] and body["error"].startswith("bad_message: request body is not valid JSON: ")
    async with http.get(f"{stack.url}/v2/no/such/route") as resp:
        assert resp.status == 404 and (await resp.json())["error"].startswith("not_found: ")
    async with http.post(f"{stack.url}/v2/repository/index", data=b'{"ready": "yes"}') as resp:
        assert resp.status == 400 and "'ready' must be true or false" in (await resp.json())["error"]
    v1_job = {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [0.0]}]}
    async with http.post(f"{stack.url}/v1/models/nope/jobs", json=v1_job) as resp:
        assert resp.status == 404 and (await resp.json())["error"]["code"] == "unknown_model"


# --- model control ------------------------------------------------------------------------


@pytest.fixture
async def controlled(synced: Settings) -> AsyncIterator[str]:
    """The model the control tests load and unload; its policy override is removed afterwards."""
    yield "controlled"
    async with open_etcd(synced.etcd) as client:
        await client.delete(keys(synced.namespace).policy("controlled").encode())


async def policy_of(settings: Settings, model: str) -> dict:
    async with open_etcd(settings.etcd) as client:
        kv = await client.get(keys(settings.namespace).policy(model).encode())
    return json.loads(kv.value) if kv else {}


def cli_key(settings: Settings, tenant: str, role: str) -> str:
    """A key made by ``inferq apikey create``, as an operator makes one."""
    args = [sys.executable, "-m", "inferq.cli", "apikey", "create", "--tenant", tenant, "--role", role]
    done = subprocess.run(args, cwd=ROOT, env=settings_env(settings), capture_output=True, text=True, timeout=60, check=True)
    return done.stdout.strip()


async def test_loading_and_unloading_need_the_admin_role_when_api_keys_are_on(spawn_edge, synced, controlled) -> None:
    edge = await spawn_edge(env={"INFERQ_EDGE_AUTH": "true"}, grpc=True)
    admin = await asyncio.to_thread(cli_key, synced, "ops", "admin")
    async with open_etcd(synced.etcd) as client:
        user = await create_key(client, synced.namespace, "acme", 0.0, 0, 5)
        metered = await create_key(client, synced.namespace, "metered", 0.01, 1, 5)

    def call(h, g):
        refused = []
        for headers in ({}, {"authorization": f"Bearer {user}"}):
            for attempt in (lambda: h.unload_model(controlled, headers=headers), lambda: g.unload_model(controlled, headers=headers)):
                with pytest.raises(InferenceServerException) as caught:
                    attempt()
                refused.append(caught.value)
        for _ in range(2):  # the first is let through to the role check, the second is over the rate
            with pytest.raises(InferenceServerException) as caught:
                g.load_model(controlled, headers={"authorization": f"Bearer {metered}"})
            refused.append(caught.value)
        ok = {"authorization": f"Bearer {admin}"}
        h.unload_model(controlled, headers=ok)
        g.load_model(controlled, headers=ok)
        return refused, h.get_model_repository_index(headers={"authorization": f"Bearer {user}"})

    refused, index = await with_clients(edge, call)
    assert_refused(refused[4], "StatusCode.PERMISSION_DENIED", "forbidden", "admin role")
    assert_refused(refused[5], "StatusCode.RESOURCE_EXHAUSTED", "rate_limited", "tenant metered is over its submission rate")
    assert_refused(refused[0], "401", "unauthorized", "API key")
    assert_refused(refused[1], "StatusCode.UNAUTHENTICATED", "unauthorized", "API key")
    assert_refused(refused[2], "403", "forbidden", "admin role")
    assert_refused(refused[3], "StatusCode.PERMISSION_DENIED", "forbidden", "admin role")
    assert (await policy_of(synced, controlled))["min_workers"] == 1, "the admin's unload, then load, went through"
    assert {"name": controlled, "version": "1", "state": "READY", "reason": ""} in index


async def test_load_starts_a_worker_through_the_autoscaler_and_unload_drains_it(stack, spawn_autoscaler, synced, controlled, http) -> None:
    await spawn_autoscaler(controlled)
    x = sample("mlp", seed=51)

    async def workers() -> int:
        return sum(1 for w in (await live_workers(synced, controlled)).values() if w.get("state") == "ready")

    await with_clients(stack, lambda h, g: h.load_model(controlled))
    assert (await policy_of(synced, controlled))["min_workers"] == 1
    await wait_until(workers, 60, "the autoscaler to start a worker for the loaded model")
    result = await with_clients(stack, lambda h, g: g.infer(controlled, [grpc_input(x)]))
    assert result.as_numpy("probs").shape == (1, 10)

    await with_clients(stack, lambda h, g: g.unload_model(controlled))
    assert (await policy_of(synced, controlled))["max_workers"] == 0
    await wait_until(lambda: _no_workers(synced, controlled), 60, "the unloaded model's workers to drain")

    def after_unload(h, g):
        refusals = []
        for attempt in (lambda: h.infer(controlled, [http_input(x, True)]), lambda: g.infer(controlled, [grpc_input(x)])):
            with pytest.raises(InferenceServerException) as caught:
                attempt()
            refusals.append(caught.value)
        return refusals, h.is_model_ready(controlled), g.is_model_ready(controlled), h.get_model_repository_index(), \
            [m for m in g.get_model_repository_index().models if m.name == controlled]

    refusals, h_ready, g_ready, index, g_index = await with_clients(stack, after_unload)
    assert_refused(refusals[0], "503", "model_unavailable", "unloaded")
    assert_refused(refusals[1], "StatusCode.UNAVAILABLE", "model_unavailable", "unloaded")
    assert not h_ready and not g_ready
    (entry,) = [m for m in index if m["name"] == controlled]
    assert entry["state"] == "UNAVAILABLE" and "unloaded" in entry["reason"]
    assert [(m.state, m.reason) for m in g_index] == [(entry["state"], entry["reason"])]
    async with http.post(f"{stack.url}/v2/repository/index", json={"ready": True}) as resp:
        assert controlled not in {m["name"] for m in await resp.json()}, "the ready-only index leaves it out"

    await with_clients(stack, lambda h, g: h.load_model(controlled))
    assert await with_clients(stack, lambda h, g: h.is_model_ready(controlled) and g.is_model_ready(controlled))
    await wait_until(workers, 60, "a worker again after loading the model back")


async def _no_workers(settings: Settings, model: str) -> bool:
    return not await live_workers(settings, model)
