"""Observability on real processes: /metrics (parsed with prometheus-client's parser), service discovery, tracing."""

from __future__ import annotations

import asyncio
import re

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import sample, set_policy
from tests.support import wait_until
from tests.test_edge import poll, submit, v2_input

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


async def scrape(http, url: str) -> dict[str, dict[tuple, float]]:
    """``{sample name: {sorted label items: value}}`` of a /metrics answer, through prometheus-client's text parser."""
    async with http.get(f"{url}/metrics") as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    found: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return found


def value(metrics: dict, name: str, **labels: str) -> float:
    """One sample's value (0 when absent: a counter that has not counted yet)."""
    return metrics.get(name, {}).get(tuple(sorted(labels.items())), 0.0)


MLP = {"model": "mlp", "version": "1"}


async def test_edge_metrics_count_each_finished_job_once_under_tritons_names_with_matching_histograms(
        spawn_worker, spawn_edge, http) -> None:
    await spawn_worker("mlp")
    edge = await spawn_edge()
    before = await scrape(http, edge.url)
    jobs = [(await submit(http, edge, "mlp", sample("mlp", seed=i)))["job_id"] for i in range(5)]
    docs = [await poll(http, edge, job) for job in jobs]
    assert all(doc["status"] == "succeeded" for doc in docs), docs
    after = await scrape(http, edge.url)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("nv_inference_request_success", **MLP) == 5
    assert grew("nv_inference_count", **MLP) == 5
    assert 0 < grew("nv_inference_exec_count", **MLP) <= 5
    assert grew("inferq_jobs_total", **MLP, status="succeeded", code="") == 5
    for histogram in ("inferq_job_duration_seconds", "inferq_job_queue_seconds", "inferq_job_compute_seconds", "inferq_batch_size"):
        assert grew(f"{histogram}_count", **MLP) == 5, histogram
        assert grew(f"{histogram}_bucket", **MLP, le="+Inf") == 5, histogram
    assert grew("nv_inference_request_duration_us", **MLP) >= 1e6 * grew("inferq_job_duration_seconds_sum", **MLP) * 0.999
    assert grew("nv_inference_compute_infer_duration_us", **MLP) > 0


async def test_a_restarted_edge_counts_the_ledgers_jobs_again_so_history_survives(spawn_worker, spawn_edge, http) -> None:
    await spawn_worker("mlp")
    first = await spawn_edge()
    for i in range(3):
        assert (await poll(http, first, (await submit(http, first, "mlp", sample("mlp", seed=i)))["job_id"]))["status"] == "succeeded"
    counted = value(await scrape(http, first.url), "nv_inference_request_success", **MLP)
    await first.process.stop()
    second = await spawn_edge()
    assert value(await scrape(http, second.url), "nv_inference_request_success", **MLP) >= counted >= 3


async def test_worker_metrics_are_found_through_service_discovery_and_count_that_workers_jobs(spawn_worker, spawn_edge, http) -> None:
    workers = [await spawn_worker("cnn", "--metrics-port", "-1") for _ in range(2)]
    edge = await spawn_edge(env={"INFERQ_METRICS_REFRESH_S": "0.2"})

    async def targets() -> list[dict]:
        async with http.get(f"{edge.url}/v1/metrics/targets") as resp:
            groups = await resp.json()
        mine = [g for g in groups if g["labels"]["model"] == "cnn" and any(str(w.pid) in g["labels"]["worker"] for w in workers)]
        return mine if len(mine) == 2 else []

    groups = await wait_until(targets, 30, "both cnn workers in the service-discovery document")
    assert all(g["labels"]["job"] == "inferq-worker" and g["labels"]["version"] == "1" for g in groups)
    for i in range(4):
        assert (await poll(http, edge, (await submit(http, edge, "cnn", sample("cnn", seed=i)))["job_id"]))["status"] == "succeeded"
    total = 0.0
    for group in groups:
        (target,) = group["targets"]
        scraped = await scrape(http, f"http://{target}")
        labels = {"model": "cnn", "version": "1", "worker": group["labels"]["worker"]}
        assert value(scraped, "inferq_worker_state", **labels, state="ready") == 1
        assert value(scraped, "inferq_worker_spooled_batches", **labels) == 0  # the ledger took every result
        total += value(scraped, "nv_inference_count", model="cnn", version="1")
        batches = value(scraped, "inferq_batch_size_count", model="cnn", version="1")
        assert batches == value(scraped, "nv_inference_count", model="cnn", version="1")
    assert total == 4, "every job is counted by the one worker that ran it"


async def test_a_failed_job_is_counted_by_its_error_code_and_carries_the_callers_trace_to_the_worker_log(
        spawn_worker, spawn_edge, http) -> None:
    worker = await spawn_worker("reshape")
    edge = await spawn_edge()
    before = await scrape(http, edge.url)
    body = {"inputs": [v2_input(np.ones((2, 4), np.float32)), v2_input(np.array([3, 3], np.int64), "shape", "INT64")]}
    async with http.post(f"{edge.url}/v1/models/reshape/jobs", json=body, headers={"traceparent": TRACEPARENT}) as resp:
        accepted = await resp.json()
        assert resp.status == 202, accepted
        answered = resp.headers["traceparent"]
    assert answered.startswith(f"00-{TRACE_ID}-") and answered != TRACEPARENT, "the edge's own span in the caller's trace"
    doc = await poll(http, edge, accepted["job_id"])
    assert doc["status"] == "failed" and doc["error"]["code"] == "inference_error", doc
    assert doc["trace_id"] == TRACE_ID and doc["traceparent"] == answered
    after = await scrape(http, edge.url)
    labels = {"model": "reshape", "version": "1"}
    assert value(after, "inferq_jobs_total", **labels, status="failed", code="inference_error") - value(
        before, "inferq_jobs_total", **labels, status="failed", code="inference_error") == 1
    assert value(after, "nv_inference_request_failure", **labels, reason="BACKEND") - value(
        before, "nv_inference_request_failure", **labels, reason="BACKEND") == 1
    await wait_until(lambda: f"trace_id={TRACE_ID}" in worker.output(), 10, "the trace id in the worker's log")
    assert re.search(rf"job {accepted['job_id']} failed .*trace_id={TRACE_ID}", worker.output())


async def test_a_job_without_a_traceparent_gets_a_new_trace_and_a_malformed_one_is_replaced(spawn_worker, spawn_edge, http) -> None:
    await spawn_worker("mlp")
    edge = await spawn_edge()
    seen = set()
    for headers in ({}, {"traceparent": "00-zz-not-a-trace"}, {"traceparent": f"00-{'0' * 32}-00f067aa0ba902b7-01"}):
        async with http.post(f"{edge.url}/v1/models/mlp/jobs", json={"inputs": [v2_input(sample("mlp"))]}, headers=headers) as resp:
            accepted = await resp.json()
        doc = await poll(http, edge, accepted["job_id"])
        assert doc["status"] == "succeeded" and re.fullmatch(r"[0-9a-f]{32}", doc["trace_id"]) and doc["trace_id"] != "0" * 32
        seen.add(doc["trace_id"])
    assert len(seen) == 3, "each job without a usable traceparent starts a trace of its own"


async def test_autoscaler_metrics_explain_its_decision_and_the_edge_shows_it_too(synced, spawn_autoscaler, spawn_edge, http) -> None:
    await set_policy(synced, "explained", min_workers=1, max_workers=2)
    port = free_port()
    await spawn_autoscaler("explained", "--launcher", "none", "--metrics-port", str(port))
    labels = {"model": "explained", "version": "1"}

    async def decided() -> dict | None:
        try:
            scraped = await scrape(http, f"http://127.0.0.1:{port}")
        except OSError:
            return None
        return scraped if value(scraped, "inferq_autoscaler_desired_workers", **labels) == 1 else None

    scraped = await wait_until(decided, 30, "the autoscaler's decision on its /metrics")
    assert value(scraped, "inferq_autoscaler_current_workers", **labels) == 0
    (reason,) = [dict(k)["reason"] for k in scraped["inferq_autoscaler_decision_info"] if dict(k)["model"] == "explained"]
    assert reason, "the decision's reason is an info metric"
    assert "inferq_autoscaler_cooldown_remaining_seconds" in scraped and value(scraped, "inferq_autoscaler_leader",
                                                                                autoscaler=_leader(scraped)) == 1
    edge = await spawn_edge(env={"INFERQ_METRICS_REFRESH_S": "0.2"})

    async def shown() -> bool:
        at_edge = await scrape(http, edge.url)
        return value(at_edge, "inferq_autoscaler_decision_info", **labels, reason=reason) == 1

    await wait_until(shown, 30, "the decision's reason on the edge's /metrics")


async def test_a_scrape_during_a_broker_outage_answers_with_the_last_values_marked_stale(
        own_broker, spawn_worker, spawn_edge, http) -> None:
    env = {"INFERQ_BROKER_URL": own_broker.url, "INFERQ_METRICS_REFRESH_S": "0.2"}
    await spawn_worker("mlp", env=env)
    edge = await spawn_edge(env=env)
    fresh = await wait_until(lambda: _fresh(http, edge.url), 20, "fresh queue facts")
    assert value(fresh, "inferq_queue_ready", **MLP) == 0
    await asyncio.to_thread(own_broker.kill)

    async def stale() -> dict | None:
        scraped = await scrape(http, edge.url)  # answers: never a 500 while the broker is away
        return scraped if value(scraped, "inferq_metrics_stale") == 1 else None

    scraped = await wait_until(stale, 30, "the scrape to mark its values stale")
    assert ("inferq_queue_ready" in scraped and value(scraped, "inferq_queue_ready", **MLP) == 0), "the last known depth stays"


async def _fresh(http, url: str) -> dict | None:
    scraped = await scrape(http, url)
    known = any(dict(labels).get("model") == "mlp" for labels in scraped.get("inferq_queue_ready", {}))
    return scraped if known and value(scraped, "inferq_metrics_stale") == 0 else None


def _leader(scraped: dict) -> str:
    (labels,) = scraped["inferq_autoscaler_leader"]
    return dict(labels)["autoscaler"]


def free_port() -> int:
    from tests.conftest import free_port as free

    return free()


def test_a_traceparent_is_accepted_only_in_w3c_form_and_a_child_keeps_its_trace() -> None:
    from inferq.broker.trace import new_traceparent, parse_traceparent, trace_id

    assert parse_traceparent(TRACEPARENT) == TRACEPARENT
    assert parse_traceparent(f"01-{TRACE_ID}-00f067aa0ba902b7-01-future") == f"00-{TRACE_ID}-00f067aa0ba902b7-01"
    for bad in (None, 42, "", "00-abc-def-01", TRACEPARENT.upper(), f"ff-{TRACE_ID}-00f067aa0ba902b7-01",
                f"00-{'0' * 32}-00f067aa0ba902b7-01", f"00-{TRACE_ID}-{'0' * 16}-01", TRACEPARENT + "-extra"):
        assert parse_traceparent(bad) is None, bad
    child = new_traceparent(TRACEPARENT)
    assert trace_id(child) == TRACE_ID and child != TRACEPARENT and child.endswith("-01")
    assert trace_id(new_traceparent()) != trace_id(new_traceparent())


def test_a_decision_held_by_stabilization_says_how_long_it_waits() -> None:
    from inferq.actors.policy import Recommender
    from inferq.settings import ScalingPolicy

    policy = ScalingPolicy(min_workers=0, max_workers=4, target_backlog_per_worker=10, scale_down_stabilization_s=30.0)
    rec = Recommender()
    assert rec.decide(policy, 100.0, 40, 4) == (4, "steady") and rec.cooldown_s == 0
    desired, reason = rec.decide(policy, 110.0, 10, 4)
    assert (desired, reason) == (4, "scale down held by stabilization")
    assert rec.cooldown_s == 20.0, "the recommendation of 4 at t=100 leaves the 30 s window at t=130"


@pytest.fixture
async def metered_agent(synced, tmp_path):
    """A real ``inferq agent`` with /metrics on a free port; stopped (and its workers drained) at teardown."""
    from tests.conftest import free_port as free
    from tests.support import Process

    from tests.jetson import ORIN, write_sysroot

    port = free()
    # The device facts come from a Jetson AGX Orin's files (the agent reads them under --sysroot).
    proc = Process(["agent", "--node", "obsnode", "--capacity", "3", "--metrics-port", str(port)], synced,
                   tmp_path / "agent.log", {"INFERQ_AGENT_SYSROOT": str(write_sysroot(tmp_path / "orin", ORIN))})
    yield proc, port
    await proc.stop(timeout=40)


async def test_an_agent_serves_its_nodes_capacity_workers_providers_and_jetson_facts_and_the_status_page_lists_them(
        metered_agent, spawn_edge, http) -> None:
    proc, port = metered_agent

    async def scraped() -> dict | None:
        assert proc.alive(), proc.output()
        try:
            return await scrape(http, f"http://127.0.0.1:{port}")
        except OSError:
            return None

    metrics = await wait_until(scraped, 30, "the agent's /metrics")
    assert value(metrics, "inferq_node_capacity", node="obsnode") == 3
    assert value(metrics, "inferq_node_workers", node="obsnode") == 0
    await wait_until(lambda: _has_provider(http, port), 30, "the node's providers")
    metrics = await scrape(http, f"http://127.0.0.1:{port}")  # the facts come with the providers, in its record
    assert value(metrics, "inferq_node_memory_bytes", node="obsnode") == 64335836 * 1024
    assert value(metrics, "inferq_node_power_mode", node="obsnode", mode="MAXN") == 1
    assert value(metrics, "inferq_node_device_info", node="obsnode", kind="jetson", model="NVIDIA Jetson AGX Orin Developer Kit",
                 soc="tegra234", cuda_arch="8.7", l4t="36.4.3") == 1
    edge = await spawn_edge(env={"INFERQ_METRICS_REFRESH_S": "0.2"})

    async def listed() -> dict | None:
        async with http.get(f"{edge.url}/ui/api/state") as resp:
            state = await resp.json()
        return next((n for n in state["nodes"] if n["node"] == "obsnode"), None)

    node = await wait_until(listed, 30, "the node on the status page's data")
    assert node["capacity"] == 3 and node["workers"] == 0 and "cpu" in node["providers"]
    assert (node["device"]["soc"], node["device"]["power_mode"]) == ("tegra234", "MAXN"), node
    assert node["last_outage"] is None, "it has not lost the broker or etcd since it started"
    async with http.get(f"{edge.url}/v1/metrics/targets") as resp:
        groups = [g for g in await resp.json() if g["labels"] == {"job": "inferq-agent", "node": "obsnode"}]
    assert [g["targets"] for g in groups] == [[f"127.0.0.1:{port}"]], "service discovery lists the agent too"


async def _has_provider(http, port: int) -> bool:
    metrics = await scrape(http, f"http://127.0.0.1:{port}")
    return value(metrics, "inferq_node_provider", node="obsnode", provider="cpu") == 1


def test_a_finished_job_becomes_one_span_tree_in_its_trace_rooted_at_the_edges_span() -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from inferq.broker.messages import QUEUED, RUNNING, SUCCEEDED, JobEvent
    from inferq.edge.projection import JobState
    from inferq.edge.spans import JobSpans, preset_id_generator

    exporter = InMemorySpanExporter()
    provider = TracerProvider(id_generator=preset_id_generator())
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    spans = JobSpans(provider)
    state = JobState("j1")
    events = [JobEvent("j1", QUEUED, "mlp", "1", ts=100.0, trace=TRACEPARENT),
              JobEvent("j1", RUNNING, "mlp", "1", ts=100.5, worker="w1", run="r", attempt=1),
              JobEvent("j1", SUCCEEDED, "mlp", "1", ts=100.6, worker="w1", run="r", attempt=1,
                       timings={"queue_ms": 500.0, "inference_ms": 80.0, "batch_size": 4})]
    for event in events:
        state.apply(event)
    spans.record(state)
    assert exporter.get_finished_spans() == (), "jobs replayed from the ledger at start are not exported again"
    spans.live = True
    spans.record(state)
    found = {s.name: s for s in exporter.get_finished_spans()}
    assert set(found) == {"inferq.job", "queue wait", "inference", "result write"}
    root = found["inferq.job"]
    assert f"{root.context.trace_id:032x}" == TRACE_ID and f"{root.context.span_id:016x}" == "00f067aa0ba902b7"
    assert root.attributes["inferq.worker"] == "w1" and root.attributes["inferq.status"] == "succeeded"
    for name in ("queue wait", "inference", "result write"):
        assert found[name].parent.span_id == root.context.span_id and found[name].context.trace_id == root.context.trace_id
    assert found["queue wait"].end_time - found["queue wait"].start_time == 500_000_000
    assert found["inference"].end_time - found["inference"].start_time == 80_000_000
    assert found["inference"].attributes["inferq.batch_size"] == 4
    assert root.start_time == 100 * 10**9 and root.end_time == int(100.6 * 10**9)


def test_a_nodes_last_outage_is_how_long_it_lasted_and_how_long_ago_it_ended() -> None:
    from inferq.edge.ui import _outage
    from inferq.runtime.records import NodeRecord

    assert _outage(NodeRecord("n"), now=1000.0) is None, "never cut off"
    assert _outage(NodeRecord("n", disconnected_since=900.0, reconnected_at=912.5), now=1000.0) == \
        {"lasted_s": 12.5, "ago_s": 87.5}
    # A record written while the outage is still going on (its end not yet known) shows none finished.
    assert _outage(NodeRecord("n", disconnected_since=950.0, reconnected_at=912.5), now=1000.0) is None
