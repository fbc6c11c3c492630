"""The pure pieces behind /v2 and the gRPC endpoint: documents, counters, error shapes, the gRPC codec.

No processes: Triton configs from model records, statistics from final job states, model
control policies, API-key roles, status mappings, and ModelInfer messages built and read by
tritonclient.grpc's own code.
"""

from __future__ import annotations

import json
import math

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from google.protobuf import json_format
from tritonclient.grpc._utils import _get_inference_request

from inferq.runtime.records import ModelRecord, WorkerRecord
from inferq import errors as e
from inferq.broker.messages import CANCELLED, EXPIRED, FAILED, SUCCEEDED, JobEvent
from inferq.edge import triton
from inferq.edge.auth import Principal, _principal, check_role, load_keys_file, token_hash
from inferq.edge.control import is_unloaded, loaded_policy, unloaded_policy
from inferq.edge.errors import add_error_style, json_errors
from inferq.edge.grpc_codec import encode_model_infer, parse_model_infer
from inferq.edge.grpc_server import status_of as grpc_status_of
from inferq.edge.projection import JobProjection, JobState
from inferq.edge.proto import grpc_service_pb2 as pb
from inferq.edge.proto import model_config_pb2
from inferq.edge.serving import _timeout_s
from inferq.edge.stats import InferenceStats, VersionStats
from inferq.edge.v2 import InferRequest, RequestedOutput, error_body, header_length
from inferq.edge.v2_routes import v2_error_response


def record(inputs: list[dict], outputs: list[dict], batching: dict | None = None) -> ModelRecord:
    doc = {"name": "m", "default_version": "2", "versions": {"1": {"inputs": inputs, "outputs": outputs},
                                                            "2": {"inputs": inputs, "outputs": outputs}},
           **(batching or {"max_batch_size": 16, "max_queue_delay_ms": 2.5})}
    return ModelRecord.from_json(json.dumps(doc))


MLP_SIGNATURE = ([{"name": "x", "dtype": "float32", "shape": [None, 256]}], [{"name": "probs", "dtype": "float32", "shape": [None, 10]}])
MLP = record(*MLP_SIGNATURE)


# --- Triton documents --------------------------------------------------------------------


def test_a_model_batched_on_its_first_dim_gets_max_batch_size_dims_without_it_and_dynamic_batching() -> None:
    config = triton.model_config(MLP, "2", [])
    assert config["max_batch_size"] == 16
    assert config["input"] == [{"name": "x", "data_type": "TYPE_FP32", "dims": [256]}]
    assert config["output"] == [{"name": "probs", "data_type": "TYPE_FP32", "dims": [10]}]
    assert config["dynamic_batching"] == {"max_queue_delay_microseconds": 2500}
    assert config["version_policy"] == {"all": {}}
    assert config["instance_group"] == [{"name": "m_0", "kind": "KIND_CPU", "count": 1}]


def test_a_model_with_a_fixed_first_dim_has_no_batching_and_keeps_every_dim() -> None:
    fixed = record([{"name": "a", "dtype": "int64", "shape": [2]}, {"name": "b", "dtype": "uint8", "shape": [None, 3, None]}],
                   [{"name": "y", "dtype": "float16", "shape": []}])
    config = triton.model_config(fixed, "1", [])
    assert config["max_batch_size"] == 0 and "dynamic_batching" not in config
    assert config["input"] == [{"name": "a", "data_type": "TYPE_INT64", "dims": [2]},
                               {"name": "b", "data_type": "TYPE_UINT8", "dims": [-1, 3, -1]}]
    assert config["output"] == [{"name": "y", "data_type": "TYPE_FP16", "dims": []}]


def test_a_batch_size_of_one_is_not_dynamic_batching() -> None:
    config = triton.model_config(record(*MLP_SIGNATURE, {"max_batch_size": 1, "max_queue_delay_ms": 1.0}), "1", [])
    assert config["max_batch_size"] == 1 and "dynamic_batching" not in config


def test_instance_group_counts_this_versions_live_workers_and_their_kind() -> None:
    workers = [WorkerRecord("a", "m", "2", providers=("CUDAExecutionProvider", "CPUExecutionProvider")),
               WorkerRecord("b", "m", "2", providers=("CPUExecutionProvider",)),
               WorkerRecord("c", "m", "1", providers=("CPUExecutionProvider",)),
               WorkerRecord("d", "other", "2")]
    assert triton.model_config(MLP, "2", workers)["instance_group"][0] == {"name": "m_0", "kind": "KIND_GPU", "count": 2}
    assert triton.model_config(MLP, "1", workers)["instance_group"][0]["kind"] == "KIND_CPU"


def test_the_config_document_is_a_valid_triton_model_config_message() -> None:
    message = json_format.ParseDict(triton.model_config(MLP, "2", []), model_config_pb2.ModelConfig())
    assert message.max_batch_size == 16 and message.input[0].data_type == model_config_pb2.TYPE_FP32
    assert message.dynamic_batching.max_queue_delay_microseconds == 2500 and message.version_policy.HasField("all")


def test_index_entries_say_ready_or_why_not() -> None:
    assert triton.index_entry("m", "1", unloaded=False) == {"name": "m", "version": "1", "state": "READY", "reason": ""}
    entry = triton.index_entry("m", "1", unloaded=True)
    assert entry["state"] == "UNAVAILABLE" and "unloaded" in entry["reason"]


def test_server_metadata_declares_only_what_is_supported() -> None:
    meta = triton.server_metadata()
    assert meta["name"] == "inferq" and meta["version"]
    assert set(meta["extensions"]) == {"binary_tensor_data", "model_configuration", "model_repository", "statistics"}


# --- statistics --------------------------------------------------------------------------


def final(status: str, created: float = 100.0, finished: float = 100.25, **timings: float) -> JobState:
    return JobState("j", status=status, model="m", version="1", created_at=created, finished_at=finished, timings=timings or None)


def test_successes_add_end_to_end_queue_and_compute_time_in_ns() -> None:
    stats = VersionStats()
    stats.record(final(SUCCEEDED, queue_ms=10.0, inference_ms=5.0, batch_size=2))
    stats.record(final(SUCCEEDED, finished=100.5, queue_ms=20.0, inference_ms=5.0, batch_size=2))
    assert (stats.success.count, stats.success.ns) == (2, 750_000_000)
    assert (stats.queue.count, stats.queue.ns) == (2, 30_000_000)
    assert (stats.compute_infer.count, stats.compute_infer.ns) == (2, 10_000_000)
    assert stats.last_inference_ms == 100_500 and stats.executions == 1.0
    doc = triton.model_statistics("m", "1", stats)
    assert doc["inference_count"] == 2 and doc["execution_count"] == 1
    assert doc["batch_stats"] == [{"batch_size": 2, "compute_input": {"count": 1, "ns": 0},
                                   "compute_infer": {"count": 1, "ns": 5_000_000}, "compute_output": {"count": 1, "ns": 0}}]


def test_failed_and_expired_jobs_count_as_failures_and_cancelled_ones_as_neither() -> None:
    stats = VersionStats()
    for status in (FAILED, EXPIRED, CANCELLED):
        stats.record(final(status))
    assert (stats.fail.count, stats.fail.ns) == (2, 500_000_000)
    assert stats.success.count == 0 and stats.executions == 0


def test_a_job_without_a_queued_event_counts_its_queue_and_compute_time_as_its_duration() -> None:
    stats = VersionStats()
    stats.record(final(SUCCEEDED, created=None, queue_ms=3.0, inference_ms=1.0))
    assert stats.success.ns == 4_000_000


def test_the_projection_counts_each_job_once_however_often_its_final_event_arrives() -> None:
    counters = InferenceStats()
    projection = JobProjection(100, 3600, counters.record)
    done = JobEvent("a", SUCCEEDED, "m", "1", timings={"inference_ms": 2.0, "batch_size": 1})
    projection.apply([JobEvent("a", "queued", "m", "1"), done, done])
    projection.apply([done, JobEvent("a", FAILED, "m", "1")])
    projection.apply([JobEvent("b", FAILED, "m", "1")])
    stats = counters.get("m", "1")
    assert (stats.success.count, stats.fail.count) == (1, 1)
    assert counters.versions() == [("m", "1")] and counters.get("m", "9").success.count == 0


def test_statistics_documents_are_valid_triton_statistics_messages() -> None:
    stats = VersionStats()
    stats.record(final(SUCCEEDED, queue_ms=1.0, inference_ms=1.0, batch_size=4))
    message = json_format.ParseDict({"model_stats": [triton.model_statistics("m", "1", stats)]}, pb.ModelStatisticsResponse())
    assert message.model_stats[0].inference_stats.success.count == 1
    assert message.model_stats[0].batch_stats[0].batch_size == 4


# --- errors ------------------------------------------------------------------------------


def test_v2_error_bodies_are_a_single_message_led_by_the_code() -> None:
    assert error_body("invalid_input", "input 'x' dim 1 must be 256") == {"error": "invalid_input: input 'x' dim 1 must be 256"}
    response = v2_error_response(422, "invalid_input", "bad")
    assert response.status == 422 and json.loads(response.body) == {"error": "invalid_input: bad"}


async def test_errors_take_the_style_of_the_api_their_path_belongs_to() -> None:
    async def refuse(request: web.Request) -> web.Response:
        raise e.InvalidInput("nope")

    app = web.Application(middlewares=[json_errors])
    add_error_style(app, "/v2", v2_error_response)
    for path in ("/v1/x", "/v2", "/v2/x", "/v2x"):
        app.router.add_get(path, refuse)
    async with TestClient(TestServer(app)) as client:
        bodies = {}
        for path in ("/v1/x", "/v2", "/v2/x", "/v2x", "/v2/missing"):
            async with client.get(path) as resp:
                bodies[path] = (resp.status, await resp.json())
    assert bodies["/v1/x"] == bodies["/v2x"] == (422, {"error": {"code": "invalid_input", "message": "nope"}})
    assert bodies["/v2"] == bodies["/v2/x"] == (422, {"error": "invalid_input: nope"})
    assert bodies["/v2/missing"][0] == 404 and bodies["/v2/missing"][1]["error"].startswith("not_found: ")


@pytest.mark.parametrize("exc, code", [
    (e.CodecError("x"), grpc.StatusCode.INVALID_ARGUMENT),
    (e.MessageTooLarge("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (e.InvalidInput("x"), grpc.StatusCode.INVALID_ARGUMENT),
    (e.UnknownModel("x"), grpc.StatusCode.NOT_FOUND),
    (e.NotFound("x"), grpc.StatusCode.NOT_FOUND),
    (e.BrokerRejected("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (e.BrokerUnavailable("x"), grpc.StatusCode.UNAVAILABLE),
    (e.CoordinationError("x"), grpc.StatusCode.UNAVAILABLE),
    (e.ModelUnavailable("x"), grpc.StatusCode.UNAVAILABLE),
    (e.Unauthorized("x"), grpc.StatusCode.UNAUTHENTICATED),
    (e.Forbidden("x"), grpc.StatusCode.PERMISSION_DENIED),
    (e.RateLimited("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (e.DeadlineExceeded("x"), grpc.StatusCode.DEADLINE_EXCEEDED),
    (e.JobFailed("j", "failed", "invalid_input", "x"), grpc.StatusCode.INVALID_ARGUMENT),
    (e.JobFailed("j", "failed", "expired", "x"), grpc.StatusCode.DEADLINE_EXCEEDED),
    (e.JobFailed("j", "failed", "cancelled", "x"), grpc.StatusCode.CANCELLED),
    (e.JobFailed("j", "failed", "inference_error", "x"), grpc.StatusCode.INTERNAL),
    (e.InferqError("x"), grpc.StatusCode.INTERNAL),
])
def test_inferq_errors_map_onto_grpc_status_codes(exc: e.InferqError, code: grpc.StatusCode) -> None:
    assert grpc_status_of(exc) == code


def test_header_length_and_timeout_parameters_are_checked() -> None:
    assert header_length(None) is None and header_length("12") == 12
    with pytest.raises(e.CodecError, match="integer"):
        header_length("twelve")
    assert _timeout_s(None, 60) == 60 and _timeout_s(0, 60) == 60 and _timeout_s(1_500_000, 60) == 1.5
    for bad in (-1, "5", 1.5, True):
        with pytest.raises(e.InvalidInput, match="microseconds"):
            _timeout_s(bad, 60)


# --- model control and roles ----------------------------------------------------------------


def test_unload_drains_at_once_and_load_lifts_it_keeping_other_fields() -> None:
    unloaded = unloaded_policy({"target_backlog_per_worker": 8, "min_workers": 2})
    assert unloaded == {"target_backlog_per_worker": 8, "min_workers": 0, "max_workers": 0,
                        "idle_before_zero_s": 0, "scale_down_stabilization_s": 0}
    assert is_unloaded(unloaded) and not is_unloaded({"max_workers": 3}) and not is_unloaded(None)
    assert loaded_policy(unloaded) == {"target_backlog_per_worker": 8, "min_workers": 1}
    assert loaded_policy(None) == {"min_workers": 1}
    assert loaded_policy({"min_workers": 3, "max_workers": 5}) == {"min_workers": 3, "max_workers": 5}


def test_policies_written_by_control_are_accepted_by_the_autoscaler() -> None:
    from inferq.actors.policy import ScalingPolicy

    base = ScalingPolicy(min_workers=2, max_workers=4, idle_before_zero_s=60)
    drained = base.merged(unloaded_policy(None))
    assert (drained.min_workers, drained.max_workers, drained.idle_before_zero_s) == (0, 0, 0)
    assert base.merged(loaded_policy(unloaded_policy(None))).min_workers == 1


def test_api_key_roles_default_to_user_and_only_admin_may_control_models(tmp_path) -> None:
    path = tmp_path / "keys.toml"
    path.write_text('[[keys]]\ntenant = "ops"\nkey = "k1"\nrole = "admin"\n[[keys]]\ntenant = "acme"\nkey = "k2"\n')
    loaded = load_keys_file(str(path))
    assert loaded[token_hash("k1")].role == "admin" and loaded[token_hash("k2")].role == "user"
    loaded[token_hash("k1")].require_admin("loading a model")
    with pytest.raises(e.Forbidden, match="admin role"):
        loaded[token_hash("k2")].require_admin("loading a model")
    path.write_text('[[keys]]\ntenant = "x"\nkey = "k"\nrole = "root"\n')
    with pytest.raises(e.ConfigError, match="role"):
        load_keys_file(str(path))
    assert check_role("admin") == "admin"


def test_stored_key_records_without_a_role_are_users_and_unknown_roles_grant_nothing() -> None:
    assert _principal(b'{"tenant": "acme"}') == Principal("acme")
    assert _principal(b'{"tenant": "ops", "role": "admin"}').role == "admin"
    assert _principal(b'{"tenant": "x", "role": "root"}') is None
    assert _principal(b'["tenant"]') is None


# --- the gRPC codec, against tritonclient.grpc's own messages ----------------------------------


def client_request(arrays: dict[str, np.ndarray], outputs: list[str] | None = None, request_id: str = "") -> pb.ModelInferRequest:
    """The ModelInferRequest tritonclient.grpc sends (raw_input_contents)."""
    inputs = []
    for name, array in arrays.items():
        tensor = triton_grpc.InferInput(name, list(array.shape), triton_grpc_datatype(array))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    wanted = [triton_grpc.InferRequestedOutput(n) for n in outputs] if outputs else None
    return _get_inference_request("m", inputs, "", request_id, wanted, 0, False, False, 0, None, None)


def triton_grpc_datatype(array: np.ndarray) -> str:
    from tritonclient.utils import np_to_triton_dtype

    return np_to_triton_dtype(array.dtype)


@pytest.mark.parametrize("dtype", ["bool", "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64",
                                   "float16", "float32", "float64"])
def test_raw_inputs_from_tritonclient_parse_bit_exact(dtype: str) -> None:
    array = (np.arange(12).reshape(3, 4) % 2).astype(dtype) if dtype == "bool" else (np.arange(12).reshape(3, 4) * 3).astype(dtype)
    parsed = parse_model_infer(client_request({"x": array}, request_id="r1"))
    assert parsed.id == "r1" and parsed.outputs is None
    assert parsed.inputs["x"].dtype == array.dtype and np.array_equal(parsed.inputs["x"], array)


def test_typed_contents_parse_into_the_declared_datatype() -> None:
    request = pb.ModelInferRequest(model_name="m")
    a = request.inputs.add(name="a", datatype="INT16", shape=[2, 2])
    a.contents.int_contents.extend([1, -2, 3, 32767])
    b = request.inputs.add(name="b", datatype="FP32", shape=[3])
    b.contents.fp32_contents.extend([0.5, 1.5, -2.0])
    parsed = parse_model_infer(request)
    assert parsed.inputs["a"].dtype == np.int16 and parsed.inputs["a"].tolist() == [[1, -2], [3, 32767]]
    assert parsed.inputs["b"].dtype == np.float32 and parsed.inputs["b"].tolist() == [0.5, 1.5, -2.0]


def refuse(edit) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[2])
    tensor.contents.fp32_contents.extend([1.0, 2.0])
    edit(request)
    return request


def raw_input(request: pb.ModelInferRequest, size: int = 8) -> None:
    request.inputs[0].ClearField("contents")
    request.raw_input_contents.append(b"\x00" * size)


GARBAGE = [
    ("no inputs", lambda r: r.ClearField("inputs"), e.CodecError, "non-empty list of inputs"),
    ("nameless input", lambda r: setattr(r.inputs[0], "name", ""), e.CodecError, "non-empty name"),
    ("duplicate input", lambda r: r.inputs.append(r.inputs[0]), e.CodecError, "given twice"),
    ("unknown datatype", lambda r: setattr(r.inputs[0], "datatype", "BF16"), e.InvalidInput, "not supported"),
    ("negative dim", lambda r: r.inputs[0].shape.__setitem__(0, -1), e.CodecError, "non-negative"),
    ("too few elements", lambda r: r.inputs[0].contents.fp32_contents.pop(), e.CodecError, "has 1 elements"),
    ("raw size off", lambda r: raw_input(r, 7), e.CodecError, "does not match shape"),
    ("raw for some inputs only", lambda r: (r.inputs.add(name="y", datatype="FP32", shape=[2]), raw_input(r)), e.CodecError,
     "every input raw or none"),
    ("raw and contents", lambda r: r.raw_input_contents.append(b"\x00" * 8), e.CodecError, "both contents and raw"),
    ("FP16 contents", lambda r: setattr(r.inputs[0], "datatype", "FP16"), e.InvalidInput, "raw_input_contents"),
    ("INT8 out of range", lambda r: (setattr(r.inputs[0], "datatype", "INT8"), r.inputs[0].contents.int_contents.extend([1, 300])),
     e.CodecError, "out of range for INT8"),
    ("shared memory", lambda r: r.inputs[0].parameters["shared_memory_region"].MergeFrom(pb.InferParameter(string_param="shm")),
     e.InvalidInput, "shared_memory_region"),
    ("duplicate output", lambda r: (r.outputs.add(name="y"), r.outputs.add(name="y")), e.CodecError, "requested twice"),
    ("nameless output", lambda r: r.outputs.add(name=""), e.CodecError, "non-empty name"),
]


@pytest.mark.parametrize("edit, error, reason", [c[1:] for c in GARBAGE], ids=[c[0] for c in GARBAGE])
def test_malformed_model_infer_requests_are_refused_with_a_reason(edit, error, reason) -> None:
    with pytest.raises(error) as caught:
        parse_model_infer(refuse(edit))
    assert reason in str(caught.value)


def test_responses_carry_raw_outputs_that_tritonclient_reads_back_and_the_job_id() -> None:
    outputs = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([True, False]), "c": np.arange(3, dtype=">i8")}
    request = InferRequest("r9", {}, (RequestedOutput("c", True), RequestedOutput("a", True)), True, {})
    response = encode_model_infer("m", "2", "job-1", outputs, request)
    result = triton_grpc.InferResult(response)
    assert [o.name for o in response.outputs] == ["c", "a"] and (response.id, response.model_version) == ("r9", "2")
    assert np.array_equal(result.as_numpy("a"), outputs["a"]) and np.array_equal(result.as_numpy("c"), outputs["c"])
    assert result.as_numpy("b") is None
    assert response.parameters["inferq_job_id"].string_param == "job-1"
    everything = encode_model_infer("m", "2", "job-1", outputs, InferRequest(None, {}, None, True, {}))
    assert [o.name for o in everything.outputs] == ["a", "b", "c"] and everything.id == ""
    assert np.array_equal(triton_grpc.InferResult(everything).as_numpy("b"), outputs["b"])


def test_an_override_the_autoscaler_would_refuse_is_no_unload_and_breaks_nothing() -> None:
    for bad in (math.inf, math.nan, "0", True, 0.5, None):
        assert not is_unloaded({"max_workers": bad}), bad
    assert is_unloaded({"max_workers": 0}) and is_unloaded({"max_workers": 0.0})
    assert loaded_policy({"min_workers": math.inf}) == {"min_workers": 1}
