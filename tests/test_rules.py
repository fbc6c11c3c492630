"""The fast unit layer: the rules that decide outcomes, without processes or services (each well under a second)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings as hsettings, strategies as st

from inferq.actors.planner import Group, plan
from inferq.actors.policy import Recommender
from inferq.broker.codec import decode_tensor, encode_tensor
from inferq.broker.failover import Rotation
from inferq.broker.topology import QueueLimits, Topology
from inferq.broker.messages import JobRequest
from inferq.edge.auth import TokenBucket
from inferq.edge.projection import JobState
from inferq.errors import CodecError, ConfigError, InferenceError
from inferq.runtime.records import ModelRecord, WorkerRecord, WorkerState
from inferq.runtime.repository import ModelVersion, TensorSpec
from inferq.runtime.session import choose_providers
from inferq.runtime.signature import is_batchable, validate
from inferq.settings import BrokerSettings, ScalingPolicy, Settings
from inferq.broker.deadletter import event_for
from inferq.broker.messages import CANCELLED, EXPIRED, FAILED, QUEUED, RUNNING, SUCCEEDED, JobEvent


# --- settings ------------------------------------------------------------------------------------------------------

def test_settings_survive_the_round_trip_through_a_child_environment() -> None:
    s = Settings.load(env={"INFERQ_ETCD_CA_FILE": "/ca.pem", "INFERQ_ETCD_PASSWORD": "pw", "INFERQ_BROKER_URL": "amqp://u:p@h:1/",
                           "INFERQ_EDGE_AUTH": "true", "INFERQ_JOBS_TTL_S": "12.5", "INFERQ_AUTOSCALER_MAX_WORKERS": "7",
                           "INFERQ_BROKER_URLS": "amqp://u:p@a:5672/, amqps://u:q@b:5671/x", "INFERQ_BROKER_REPLICAS": "3",
                           "INFERQ_ETCD_ENDPOINTS": "10.0.0.1:2379,etcd-1.inferq:2379,[::1]:2379"})
    assert Settings.load(env=s.to_env()) == s
    assert s.to_env()["INFERQ_ETCD_CA_FILE"] == "/ca.pem", "etcd TLS must reach spawned workers"
    assert s.broker.addresses == ("amqp://u:p@a:5672/", "amqps://u:q@b:5671/x") and s.broker.replicas == 3
    assert s.etcd.members == (("10.0.0.1", 2379), ("etcd-1.inferq", 2379), ("::1", 2379))


def test_the_cluster_lists_come_from_the_config_file_as_toml_arrays(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[broker]\nurls = ["amqp://g:g@n1:5672/", "amqp://g:g@n2:5672/"]\n[etcd]\nendpoints = ["n1:2379", "n2:2379"]\n')
    s = Settings.load(config, env={})
    assert s.broker.addresses == ("amqp://g:g@n1:5672/", "amqp://g:g@n2:5672/")
    assert s.etcd.members == (("n1", 2379), ("n2", 2379))


def test_the_single_broker_url_and_etcd_host_still_work_when_no_list_is_given() -> None:
    s = Settings.load(env={"INFERQ_BROKER_URL": "amqp://u:p@solo:5672/", "INFERQ_ETCD_HOST": "e", "INFERQ_ETCD_PORT": "2400"})
    assert s.broker.addresses == ("amqp://u:p@solo:5672/",) and s.etcd.members == (("e", 2400),)
    listed = Settings.load(env={"INFERQ_BROKER_URL": "amqp://u:p@solo:5672/", "INFERQ_BROKER_URLS": "amqp://u:p@a:5672/"})
    assert listed.broker.addresses == ("amqp://u:p@a:5672/",), "the list wins over the single URL"


@pytest.mark.parametrize("env", [{"INFERQ_ETCD_ENDPOINTS": "no-port"}, {"INFERQ_ETCD_ENDPOINTS": "h:2379/x"},
                                 {"INFERQ_ETCD_ENDPOINTS": "h:notaport"}, {"INFERQ_BROKER_URLS": "http://h:5672/"},
                                 {"INFERQ_BROKER_REPLICAS": "-1"}])
def test_a_malformed_cluster_address_is_a_config_error_at_load_time(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        Settings.load(env=env)


def test_a_url_holding_a_comma_cannot_travel_to_a_child_and_says_so() -> None:
    s = Settings(broker=BrokerSettings(urls=("amqp://u:a,b@h/",)))
    with pytest.raises(ConfigError, match="%2C"):
        s.to_env()


def test_environment_beats_the_config_file_which_beats_the_defaults(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('namespace = "file"\n[edge]\nport = 9000\nhost = "0.0.0.0"\n')
    s = Settings.load(config, env={"INFERQ_EDGE_PORT": "9100"})
    assert (s.namespace, s.edge.port, s.edge.host, s.edge.max_wait_s) == ("file", 9100, "0.0.0.0", 60.0)


@pytest.mark.parametrize("env", [{"INFERQ_EDGE_PORT": "abc"}, {"INFERQ_JOBS_TTL_S": "x"}])
def test_a_bad_setting_is_a_config_error_naming_it(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match=next(iter(env))):
        Settings.load(env=env)


def test_an_unknown_key_in_the_config_file_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[edge]\nprot = 1\n")
    with pytest.raises(ConfigError, match="prot"):
        Settings.load(config, env={})


def test_secrets_are_masked_in_the_settings_repr() -> None:
    s = Settings.load(env={"INFERQ_BROKER_URL": "amqp://user:hunter2@h/", "INFERQ_ETCD_PASSWORD": "hunter3"})
    assert "hunter2" not in repr(s) and "hunter3" not in repr(s)
    cluster = Settings.load(env={"INFERQ_BROKER_URLS": "amqp://u:pw-one@a/,amqp://u:pw-two@b/,amqps://u:pw-three@c/"})
    assert not [pw for pw in ("pw-one", "pw-two", "pw-three") if pw in repr(cluster)]
    assert repr(cluster.broker).count("***") == 3 and "@b/" in repr(cluster)
    admin = Settings.load(env={"INFERQ_TENANCY_MANAGEMENT_URL": "http://admin:hunter4@mq:15672/"})
    assert "hunter4" not in repr(admin)


# --- failover over cluster nodes ------------------------------------------------------------------------------------

def test_a_lost_connection_moves_to_the_next_url_at_once() -> None:
    rotation = Rotation(3, base=0.5, ceiling=8)
    assert [rotation.lost(), rotation.pause] == [1, 0.5]
    assert [rotation.lost(), rotation.lost()] == [2, 0], "after the last URL comes the first again"


def test_failed_attempts_back_off_only_once_every_url_has_failed_and_never_past_the_ceiling() -> None:
    rotation = Rotation(3, base=0.5, ceiling=3)
    pauses = []
    for _ in range(12):
        rotation.failed()
        pauses.append(rotation.pause)
    assert pauses == [0.5, 0.5, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 3, 3, 3, 3]
    rotation.connected()
    assert rotation.pause == 0.5


def test_replicas_set_the_replication_of_every_quorum_queue_and_stream_and_zero_leaves_it_to_rabbitmq() -> None:
    replicated, default = Topology("ns", replicas=3), Topology("ns")
    assert replicated._model_args(QueueLimits())["x-quorum-initial-group-size"] == 3
    assert replicated._retry_args("m.1")["x-quorum-initial-group-size"] == 3
    assert replicated._stream_args(60)["x-initial-cluster-size"] == 3
    assert replicated._quorum({})["x-quorum-initial-group-size"] == 3  # the dead-letter queue
    plain = {**default._model_args(QueueLimits()), **default._retry_args("m.1"), **default._stream_args(60)}
    assert not {"x-quorum-initial-group-size", "x-initial-cluster-size"} & set(plain), "0 must declare what it always did"


# --- scaling policy and the recommender ------------------------------------------------------------------------------

@pytest.mark.parametrize("override", [
    {"scale_up_stabilization_s": -1}, {"scale_down_stabilization_s": -1}, {"scale_up_stabilization_s": math.nan},
    {"max_workers": math.inf}, {"idle_before_zero_s": math.inf}, {"max_workers": "3"}, {"max_workers": 2.5},
    {"min_workers": 3, "max_workers": 1}, {"target_backlog_per_worker": 0}, {"nonsense": 1}, {"max_workers": True},
])
def test_a_bad_policy_override_is_refused_not_applied(override: dict) -> None:
    with pytest.raises(ConfigError):
        ScalingPolicy().merged(override)


def test_a_good_override_changes_only_what_it_names() -> None:
    merged = ScalingPolicy().merged({"max_workers": 9, "scale_down_stabilization_s": 0})
    assert merged == dataclasses.replace(ScalingPolicy(), max_workers=9, scale_down_stabilization_s=0.0)


@given(backlog=st.integers(0, 10**9), current=st.integers(0, 1000), now=st.floats(0, 1e6))
@hsettings(max_examples=200, deadline=None)
def test_the_recommender_always_answers_within_the_policy_bounds(backlog: int, current: int, now: float) -> None:
    policy = ScalingPolicy(min_workers=1, max_workers=5, scale_up_stabilization_s=0, scale_down_stabilization_s=0)
    desired, reason = Recommender().decide(policy, now, backlog, current)
    assert reason and (1 <= desired <= 5 or desired == current)


# --- the projection's fold -------------------------------------------------------------------------------------------

def fold(*events: JobEvent) -> JobState:
    state = JobState(events[0].job_id)
    for e in events:
        state.apply(e)
    return state


def test_the_first_final_state_wins_and_a_state_never_moves_back() -> None:
    q, r = JobEvent("j", QUEUED, ts=1), JobEvent("j", RUNNING, ts=2, attempt=1)
    done, late = JobEvent("j", SUCCEEDED, ts=3, outputs={"y": 1}), JobEvent("j", CANCELLED, ts=4)
    state = fold(q, r, done, late, JobEvent("j", RUNNING, ts=5))
    assert (state.status, state.outputs, state.finished_at) == (SUCCEEDED, {"y": 1}, 3)


def test_events_out_of_order_give_the_same_state() -> None:
    q, r, done = JobEvent("j", QUEUED, ts=1), JobEvent("j", RUNNING, ts=2, attempt=1), JobEvent("j", SUCCEEDED, ts=3)
    a, b = fold(q, r, done), fold(done, r, q)
    assert (a.status, a.created_at, a.started_at) == (b.status, b.created_at, b.started_at) == (SUCCEEDED, 1, 2)


def test_a_pipeline_job_is_named_by_its_submission_even_when_its_first_stage_is_heard_of_first() -> None:
    # The edge publishes before it records the job queued, so a stage worker's running event can come first.
    running = JobEvent("j", RUNNING, "p-s0", "1", ts=2, attempt=1, stage="p-s0")
    queued = JobEvent("j", QUEUED, "p", "3", ts=1)
    for state in (fold(running, queued), fold(queued, running)):
        assert (state.model, state.version, state.status, state.stage) == ("p", "3", RUNNING, "p-s0")


def test_a_fence_refuses_tokens_older_than_the_highest_seen_and_lets_untokened_commands_through() -> None:
    from inferq.runtime.election import Fence

    fence = Fence()
    assert fence.admit(5) and fence.admit(5) and fence.admit(9)
    assert not fence.admit(4) and not fence.admit(8) and fence.highest == 9
    assert fence.admit(None), "an operator's command carries no token"
    assert not fence.admit("9") and not fence.admit(True), "only an int is a token"


# --- providers, rate limits -------------------------------------------------------------------------------------------

def test_providers_missing_from_this_build_are_skipped_and_cpu_comes_last() -> None:
    chosen = choose_providers(("tensorrt", "cuda", "cpu"), {}, ["CUDAExecutionProvider", "CPUExecutionProvider"], None)
    assert chosen == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(("cuda",), {}, ["CPUExecutionProvider"], None) == ["CPUExecutionProvider"]
    trt = choose_providers(("tensorrt",), {}, ["TensorrtExecutionProvider", "CPUExecutionProvider"], Path("/c"))
    assert trt[0][0] == "TensorrtExecutionProvider" and trt[0][1]["trt_engine_cache_path"] == "/c"
    with pytest.raises(ConfigError):
        choose_providers(("tpu",), {}, [], None)


def test_a_token_bucket_allows_its_burst_then_asks_to_wait() -> None:
    bucket = TokenBucket(rate=1.0, burst=2)
    assert bucket.take() == 0 and bucket.take() == 0
    assert 0 < bucket.take() <= 1.0


# --- signatures, planning, splitting --------------------------------------------------------------------------------

MLP = ModelVersion("m", "1", None, (TensorSpec("x", "float32", (None, 4)),), (TensorSpec("y", "float32", (None, 2)),))
UNBATCHED = ModelVersion("r", "1", None, (TensorSpec("x", "float32", (None, 4)), TensorSpec("shape", "int64", (2,))),
                         (TensorSpec("y", "float32", None),))


def job(i: int, n: int = 1, **inputs: np.ndarray) -> tuple[int, JobRequest]:
    return i, JobRequest(f"j{i}", inputs or {"x": np.zeros((n, 4), np.float32)})


def test_compatible_jobs_share_a_run_and_a_bad_one_fails_alone() -> None:
    groups, rejected = plan([job(0), job(1, 3), job(2, x=np.zeros((1, 5), np.float32))], MLP, allow_nan=True)
    assert [g.counts for g in groups] == [[1, 3]]
    assert [r[0] for r in rejected] == [2] and "dim 1 must be 4" in str(rejected[0][2])


def test_a_model_whose_output_is_not_batch_aligned_runs_each_job_alone_and_gets_outputs_whole() -> None:
    assert not is_batchable(UNBATCHED) and is_batchable(MLP)
    jobs = [job(i, x=np.zeros((2, 4), np.float32), shape=np.array([4, 2])) for i in range(2)]
    groups, rejected = plan(jobs, UNBATCHED, allow_nan=True)
    assert not rejected and [len(g.requests) for g in groups] == [1, 1]
    whole = np.zeros((4, 2), np.float32)
    assert groups[0].split({"y": whole})[0]["y"].shape == (4, 2)
    assert groups[0].split({"y": np.float32(3)})[0]["y"].shape == (), "a 0-d output comes back as it is"


def test_a_batched_output_that_breaks_the_batch_is_refused_for_a_rerun() -> None:
    group = Group([0, 1], [job(0)[1], job(1)[1]], [1, 1])
    with pytest.raises(InferenceError):
        group.split({"y": np.zeros((3, 2), np.float32)})


def test_a_one_row_run_whose_output_is_0d_or_not_one_row_breaks_the_declared_batch() -> None:
    from inferq.runtime.signature import batch_breaking_outputs, unbatched

    assert batch_breaking_outputs(MLP, {"y": np.zeros((1, 2), np.float32)}) == []
    assert batch_breaking_outputs(MLP, {"y": np.float32(1)}) == ["y"]
    assert batch_breaking_outputs(MLP, {"y": np.zeros((3, 2), np.float32)}) == ["y"]
    assert batch_breaking_outputs(UNBATCHED, {"y": np.float32(1)}) == [], "an unbatched model claims no batch dim"
    assert not is_batchable(unbatched(MLP, ["y"]))


def test_inputs_of_an_unbatched_model_need_not_share_their_first_dim() -> None:
    key, count = validate({"x": np.zeros((2, 4), np.float32), "shape": np.array([4, 2])}, None, UNBATCHED, True)
    assert (key, count) == (None, 1)


# --- hostile tensors --------------------------------------------------------------------------------------------------

@given(shape=st.lists(st.integers(0, 2**62), max_size=8), dtype=st.sampled_from(["float32", "uint8", "bool", "int64"]),
       data=st.binary(max_size=64))
@hsettings(max_examples=300, deadline=None)
def test_decoding_a_hostile_tensor_raises_only_codec_errors(shape: list[int], dtype: str, data: bytes) -> None:
    try:
        array = decode_tensor({"dtype": dtype, "shape": shape, "data": data})
    except CodecError:
        return
    assert list(array.shape) == shape and array.nbytes == len(data)


def test_the_empty_giant_shape_that_broke_a_batch_is_a_codec_error() -> None:
    with pytest.raises(CodecError):
        decode_tensor({"dtype": "float32", "shape": [0, 2**40, 2**40], "data": b""})


def test_a_tensor_round_trips_through_the_codec() -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert np.array_equal(decode_tensor(dict(encode_tensor(x), data=bytes(encode_tensor(x)["data"]))), x)


# --- records -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw", [b"not json", b"[1]", b'{"worker_id": "w"}', b'{"worker_id": "w", "model": "m", "version": "1", "state": "on fire"}',
                                 b'{"worker_id": "w", "model": "m", "version": "1", "stats": {"inflight": "x", "nope": 1, "jobs": []}}'])
def test_a_malformed_worker_record_is_a_codec_error(raw: bytes) -> None:
    with pytest.raises(CodecError):
        record = WorkerRecord.from_json(raw)
        assert isinstance(record.stats.inflight, int), record  # a wrong type must not pass silently either


def test_records_ignore_fields_from_a_newer_writer_and_round_trip() -> None:
    record = WorkerRecord("w", "m", "1", providers=("CPUExecutionProvider",), state=WorkerState.DRAINING)
    doc = record.to_json()[:-1] + ', "added_later": 1}'
    assert WorkerRecord.from_json(doc) == record
    with pytest.raises(CodecError):
        ModelRecord.from_json(b'{"name": "m", "default_version": "2", "versions": {"1": {"inputs": [], "outputs": []}}}')


def test_a_warming_worker_record_says_how_long_it_has_warmed_and_an_older_record_reads_without_it() -> None:
    warming = WorkerRecord("w", "m", "1", state=WorkerState.WARMING, warming_since=1000.0)
    assert WorkerRecord.from_json(warming.to_json()) == warming and warming.coming
    assert warming.warming_s(1012.34) == 12.3
    older = WorkerRecord.from_json(b'{"worker_id": "w", "model": "m", "version": "1", "state": "warming"}')
    assert older.warming_since == 0.0 and older.warming_s(1012.0) is None and older.coming
    assert WorkerRecord("w", "m", "1", state=WorkerState.READY, warming_since=1.0).warming_s(5.0) is None


# --- dead letters --------------------------------------------------------------------------------------------------

def dead_letter(reason: str, queue: str = "ns.model.mlp.1", job_id: str = "j1", tenant: object = "acme") -> SimpleNamespace:
    """What event_for reads of a dead-lettered delivery (its id and RabbitMQ's death headers)."""
    return SimpleNamespace(message_id=job_id, headers={"x-first-death-reason": reason, "x-first-death-queue": queue,
                                                       "x-inferq-tenant": tenant})


def test_a_dead_letter_becomes_the_final_event_its_reason_names() -> None:
    expired = event_for(dead_letter("expired"), "ns.model.")
    assert (expired.status, expired.model, expired.version, expired.tenant, expired.error["code"]) == (EXPIRED, "mlp", "1", "acme", "expired")
    limit = event_for(dead_letter("delivery_limit", tenant=7), "ns.model.")
    assert limit.status == FAILED and limit.error["code"] == "delivery_limit" and limit.tenant is None


def test_dead_letters_that_are_no_job_of_ours_record_nothing() -> None:
    assert event_for(dead_letter("rejected"), "ns.model.") is None, "a rejected job was recorded by its worker"
    assert event_for(dead_letter("expired", queue="other.queue"), "ns.model.") is None
    assert event_for(dead_letter("expired", job_id="bad id!"), "ns.model.") is None
