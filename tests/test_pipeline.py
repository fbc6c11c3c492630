"""Model sharding on the real stack: ``inferq models split``, stage workers in their own processes, jobs through the broker.

Every pipeline here is split from a model of the test repository by the real CLI; each
stage is served by a real worker process, and outputs are compared with onnxruntime run
on the whole model's file.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import onnxruntime as ort
import pytest

from inferq.runtime.loader import sync_repository
from inferq.settings import Settings
from tests.conftest import sample, set_policy
from tests.models import write_mlp, write_slow_model
from tests.support import ROOT, assert_each_ended_once, ledger_events, live_workers, settings_env, wait_until

pytestmark = [pytest.mark.features, pytest.mark.timeout(240)]  # a feature suite that starts many processes: make test-features (CI runs it after make test)


def split(settings: Settings, target: str, *how: str) -> str:
    """``inferq models split TARGET HOW... --direct`` as a user runs it; its output."""
    done = subprocess.run([sys.executable, "-m", "inferq.cli", "models", "split", target, *how, "--direct"], cwd=ROOT,
                          env=settings_env(settings), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr + done.stdout
    return done.stdout


def v2_input(x: np.ndarray) -> dict[str, Any]:
    return {"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}


async def submit(http: aiohttp.ClientSession, url: str, model: str, x: np.ndarray) -> str:
    async with http.post(f"{url}/v1/models/{model}/jobs", json={"inputs": [v2_input(x)]}) as resp:
        body = await resp.json()
        assert resp.status == 202, body
        return body["job_id"]


async def poll(http: aiohttp.ClientSession, url: str, job_id: str, wait: float = 60) -> dict[str, Any]:
    async with http.get(f"{url}/v1/jobs/{job_id}", params={"wait": str(wait)}) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


def output(doc: dict[str, Any]) -> np.ndarray:
    (out,) = doc["outputs"]
    return np.asarray(out["data"], np.float32).reshape(out["shape"])


def whole(settings: Settings, model: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(settings.model_repository / model / "1" / "model.onnx"))


async def stage_jobs(settings: Settings, model: str) -> int:
    """Jobs the workers of ``model`` say they ran (from their membership records)."""
    return sum(w["stats"]["jobs"] for w in (await live_workers(settings, model)).values())


@pytest.fixture(scope="module")
async def deep(synced: Settings) -> str:
    """A model with more layers than the demo ones (16 MatMul+Tanh steps), in the registry."""
    write_slow_model(synced.model_repository, "deep", layers=16)
    await sync_repository(synced)
    return "deep"


@pytest.mark.parametrize("model", ["mlp", "cnn", "deep"])
async def test_two_and_three_stage_splits_give_the_whole_models_outputs_with_each_stage_in_its_own_worker(
        model, synced, deep, spawn_worker, spawn_edge, http) -> None:
    edge = await spawn_edge()
    reference = whole(synced, model)
    for stages in (2, 3):
        name = f"{model}-p{stages}"
        printed = split(synced, model, "--stages", str(stages), "--as", name)
        assert all(f"{name}-s{i}:1" in printed for i in range(stages)), printed
        for i in range(stages):
            await spawn_worker(f"{name}-s{i}")
        inputs = [sample(model if model != "deep" else "mlp", seed=s) for s in range(100)]
        job_ids = await asyncio.gather(*(submit(http, edge.url, name, x) for x in inputs))
        docs = await asyncio.gather(*(poll(http, edge.url, j) for j in job_ids))
        for x, doc in zip(inputs, docs):
            assert doc["status"] == "succeeded", doc
            np.testing.assert_allclose(output(doc), reference.run(None, {"x": x})[0], rtol=1e-4, atol=1e-5)
        assert [st["stage"] for st in docs[0]["stages"]] == [f"{name}-s{i}" for i in range(stages)]
        assert docs[0]["stage"] == f"{name}-s{stages - 1}" and docs[0]["attempts"] == 1, docs[0]
        assert all("queue_ms" in st and "inference_ms" in st for st in docs[0]["stages"]), docs[0]
        for i in range(stages):  # workers publish their counters every second
            await wait_until(lambda: stage_jobs(synced, f"{name}-s{i}"), 10, f"stage {i} of {name}'s worker to count jobs")


@pytest.fixture(scope="module")
async def broken(synced: Settings) -> str:
    """The demo MLP plus a lookup that fails at run time on any real input (see ``write_mlp``), in the registry."""
    write_mlp(synced.model_repository / "brokenmlp" / "1", seed=3, broken=True)
    await sync_repository(synced)
    return "brokenmlp"


async def test_a_failing_stage_fails_the_job_naming_that_stage(synced, broken, spawn_worker, spawn_edge, http) -> None:
    split(synced, broken, "--cut", "clean", "--as", "brk")  # the failing lookup is in the second stage
    await spawn_worker("brk-s0")
    await spawn_worker("brk-s1")
    edge = await spawn_edge()
    doc = await poll(http, edge.url, await submit(http, edge.url, "brk", sample("mlp", seed=5)))
    assert doc["status"] == "failed", doc
    assert doc["error"]["code"] == "inference_error" and "stage brk-s1 (2 of 2) of pipeline brk" in doc["error"]["message"]
    assert doc["stage"] == "brk-s1" and [st["stage"] for st in doc["stages"]] == ["brk-s0", "brk-s1"]


async def test_intermediate_tensors_over_the_limit_fail_the_job_with_a_clear_reason(synced, spawn_worker, spawn_edge, http) -> None:
    split(synced, "mlp", "--stages", "2", "--as", "mlp-small")  # x [1,256] -> h1 [1,128] float32: 512 bytes pass on
    await spawn_worker("mlp-small-s0", env={"INFERQ_JOBS_MAX_INTERMEDIATE_BYTES": "256"})
    edge = await spawn_edge()
    doc = await poll(http, edge.url, await submit(http, edge.url, "mlp-small", sample("mlp", seed=1)))
    assert doc["status"] == "failed" and doc["error"]["code"] == "intermediate_too_large", doc
    assert "512 bytes, over the 256 byte limit (jobs.max_intermediate_bytes)" in doc["error"]["message"]
    assert "stage mlp-small-s0" in doc["error"]["message"]


async def test_a_stage_worker_killed_mid_flow_loses_no_job(synced, spawn_worker, spawn_edge, http) -> None:
    split(synced, "slow", "--stages", "2", "--as", "slow-k")  # 2000 MatMul+Tanh steps per stage: a busy worker
    first = await spawn_worker("slow-k-s0")
    await spawn_worker("slow-k-s1")
    edge = await spawn_edge()
    inputs = [sample("mlp", seed=100 + i) for i in range(60)]
    job_ids = list(await asyncio.gather(*(submit(http, edge.url, "slow-k", x) for x in inputs)))
    async def passed_on() -> bool:  # the first job finished stage 0: the rest are still in, or waiting for, stage 0
        return any(st["stage"] == "slow-k-s0" for st in (await poll(http, edge.url, job_ids[0], wait=0)).get("stages", []))

    await wait_until(passed_on, 60, "stage 0 to pass a job on", interval=0.01)
    first.kill()  # mid-flow: jobs in its batch, some published on and not yet acked
    await first.wait(10)
    await spawn_worker("slow-k-s0")
    # The replacement took over jobs the killed worker left (it ran some of them itself).
    await wait_until(lambda: _replacement_ran(synced, "slow-k-s0", first.pid), 60, "the new stage 0 worker to run jobs")
    docs = await asyncio.gather(*(poll(http, edge.url, j, wait=120) for j in job_ids))
    reference = whole(synced, "slow")
    for x, doc in zip(inputs, docs):
        assert doc["status"] == "succeeded", doc
        np.testing.assert_allclose(output(doc), reference.run(None, {"x": x})[0], rtol=1e-4, atol=1e-5)
    finals = assert_each_ended_once(await ledger_events(synced), job_ids)
    assert set(finals.values()) == {"succeeded"}


async def test_a_cancelled_pipeline_job_stops_at_the_next_stage_boundary(synced, spawn_worker, spawn_edge, http) -> None:
    split(synced, "slow", "--stages", "2", "--as", "slow-c")
    await spawn_worker("slow-c-s0")
    await spawn_worker("slow-c-s1")
    edge = await spawn_edge()
    # 768 rows: 1.5 s in each stage, so the cancel reaches stage 0's worker before its run ends. (48 rows ran for
    # 0.1 s a stage: the cancel could come once the last stage had started, too late to stop the job.)
    job_id = await submit(http, edge.url, "slow-c", sample("mlp", n=768, seed=9))
    await wait_until(lambda: _status(http, edge.url, job_id, "running"), 30, "stage 0 to start the job")
    async with http.delete(f"{edge.url}/v1/jobs/{job_id}") as resp:
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["status"] == "running"  # accepted mid-stage: the stage finishes first
    doc = await poll(http, edge.url, job_id)
    assert doc["status"] == "cancelled", doc
    events = [e for e in await ledger_events(synced) if e.job_id == job_id]
    assert not any(e.stage == "slow-c-s1" and e.status.value == "running" for e in events), "stage 1 ran a cancelled job"
    # Recorded by a worker at the boundary: stage 0's after its run, or stage 1's before it would start.
    assert any(e.status.value == "cancelled" and e.stage for e in events), events


async def _status(http: aiohttp.ClientSession, url: str, job_id: str, status: str) -> bool:
    return (await poll(http, url, job_id, wait=0))["status"] == status


async def _replacement_ran(settings: Settings, model: str, dead_pid: int) -> bool:
    return any(w["pid"] != dead_pid and w["stats"]["jobs"] > 0 for w in (await live_workers(settings, model)).values())


async def test_the_autoscaler_scales_each_stage_on_its_own_backlog(synced, spawn_autoscaler, spawn_edge, http) -> None:
    split(synced, "slow", "--cut", "t9", "--as", "slow-b")  # stage 0: 10 steps, stage 1: 3990: the bottleneck
    fast = dict(scale_up_stabilization_s=0, scale_down_stabilization_s=30, idle_before_zero_s=30)
    await set_policy(synced, "slow-b-s0", min_workers=0, max_workers=3, target_backlog_per_worker=20, **fast)
    await set_policy(synced, "slow-b-s1", min_workers=0, max_workers=3, target_backlog_per_worker=4, **fast)
    edge = await spawn_edge()
    job_ids = list(await asyncio.gather(*(submit(http, edge.url, "slow-b", sample("mlp", seed=i)) for i in range(40))))
    await spawn_autoscaler("slow-b,slow-b-s0,slow-b-s1")  # the pipeline record itself has no workers to scale
    peaks = {"slow-b-s0": 0, "slow-b-s1": 0}

    async def all_done() -> bool:
        for model in peaks:
            peaks[model] = max(peaks[model], len(await live_workers(synced, model)))
        docs = await asyncio.gather(*(poll(http, edge.url, j, wait=0) for j in job_ids))
        return all(d["status"] == "succeeded" for d in docs)

    await wait_until(all_done, 120, "every pipeline job to succeed", interval=0.3)
    assert peaks["slow-b-s1"] >= 2, f"the bottleneck stage got no more workers: {peaks}"
    assert peaks["slow-b-s0"] >= 1 and not await live_workers(synced, "slow-b")


def write_double(root: Path, name: str) -> None:
    """x float32[N,10] -> y = 2x: a second model to chain after the MLP (whose output is probs [N,10])."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["y"])], name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(np.array(2.0, np.float32), "two")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    (root / name / "1").mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(root / name / "1" / "model.onnx"))


async def test_a_chain_of_different_models_renames_outputs_to_inputs(synced, spawn_worker, spawn_edge, http, reference) -> None:
    write_double(synced.model_repository, "double")
    await sync_repository(synced)
    refused = subprocess.run([sys.executable, "-m", "inferq.cli", "models", "chain", "nomap", "mlp", "double", "--direct"],
                             cwd=ROOT, env=settings_env(synced), capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "stage 1 (double) needs ['x (from x)']: no pipeline input" in refused.stderr, refused.stderr
    done = subprocess.run([sys.executable, "-m", "inferq.cli", "models", "chain", "mlp-doubled", "mlp", "double:1",
                           "--map", "1:x=probs", "--direct"], cwd=ROOT, env=settings_env(synced), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "double:1  x<-probs -> y" in done.stdout, done.stdout
    await spawn_worker("mlp")
    await spawn_worker("double")
    edge = await spawn_edge()
    x = sample("mlp", n=3, seed=21)
    doc = await poll(http, edge.url, await submit(http, edge.url, "mlp-doubled", x))
    assert doc["status"] == "succeeded", doc
    assert doc["outputs"][0]["name"] == "y" and [st["stage"] for st in doc["stages"]] == ["mlp", "double"]
    np.testing.assert_allclose(output(doc), 2 * reference("mlp", x), rtol=1e-5, atol=1e-6)


async def test_an_amqp_job_to_a_pipeline_runs_through_its_stages_and_replies(synced, spawn_worker, spawn_edge, amqp,
                                                                            reference) -> None:
    split(synced, "mlp", "--stages", "2", "--as", "mlp-amqp")
    await spawn_worker("mlp-amqp-s0")
    await spawn_worker("mlp-amqp-s1")
    await spawn_edge()  # its router takes AMQP jobs for the pipeline to the first stage
    x = sample("mlp", n=2, seed=33)
    job_id = await amqp.submit("mlp-amqp", {"x": x})
    result = (await amqp.wait_results([job_id], 30))[job_id]
    assert result["status"] == "succeeded", result
    np.testing.assert_allclose(amqp.outputs(result)["probs"], reference("mlp", x), rtol=1e-5, atol=1e-6)
    assert amqp.reply_counts[job_id] == 1, "only the last stage replies"


async def test_models_split_through_the_edge_api_makes_a_pipeline_that_serves(synced, spawn_worker, spawn_edge, http,
                                                                             reference) -> None:
    edge = await spawn_edge()
    done = subprocess.run([sys.executable, "-m", "inferq.cli", "models", "split", "mlp", "--cut", "a1", "--as", "mlp-api",
                           "--url", edge.url], cwd=ROOT, env=settings_env(synced), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "mlp-api-s0:1  x -> a1" in done.stdout and "mlp-api-s1:1  a1 -> probs" in done.stdout, done.stdout
    async with http.get(f"{edge.url}/v1/models/mlp-api") as resp:
        described = await resp.json()
        assert resp.status == 200 and described["kind"] == "pipeline", described
        assert [(st["model"], st["inputs"]) for st in described["stages"]] == [("mlp-api-s0", {"x": "x"}), ("mlp-api-s1", {"a1": "a1"})]
    async with http.post(f"{edge.url}/v1/models/mlp/split", json={"stages": 2, "cut": ["a1"]}) as resp:
        assert resp.status == 422 and "not both" in (await resp.json())["error"]["message"]
    await spawn_worker("mlp-api-s0")
    await spawn_worker("mlp-api-s1")
    x = sample("mlp", n=4, seed=8)
    doc = await poll(http, edge.url, await submit(http, edge.url, "mlp-api", x))
    assert doc["status"] == "succeeded", doc
    np.testing.assert_allclose(output(doc), reference("mlp", x), rtol=1e-5, atol=1e-6)
