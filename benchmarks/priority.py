"""Priority benchmark (``inferq bench --priority``): how long an urgent job waits behind a bulk backlog.

Issue 22's measure, on real processes. A 6-layer MLP (x float32[N,64] -> y float32[N,10],
weights from a fixed seed) is served by one worker. A backlog of ``jobs`` normal jobs of
512x64 floats is published over AMQP with confirms, as bulk work is, and the worker is started
on it. Once it is working through the backlog, ``probes`` one-row jobs are submitted over HTTP,
first as ``high`` and then, behind a second backlog, as ``normal``, to compare. For each probe the
run records its wait from submit to start and to its answer, and how many of the normal jobs still
waiting when it arrived started before it (the issue allows at most 10% for a high job).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import msgpack
import numpy as np

from inferq.benchmarks.procs import Children
from inferq.benchmarks.stack import Stack, run_async, until
from inferq.settings import Settings

MODEL = "deep6"
ROWS, WIDTH, LAYERS = 512, 64, 6
CONFIG = "[batching]\nmax_batch_size = 2048\nmax_queue_delay_ms = 2.0\n"
SEED = 22
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=300)


def say(line: str) -> None:
    print(line, flush=True)


def write_model(root: Path) -> None:
    """The 6-layer MLP as ``root/deep6/1/model.onnx`` with its config."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from inferq.runtime.demo import IR_VERSION, OPSET

    rng = np.random.default_rng(SEED)
    nodes, inits, last = [], [], "x"
    for i in range(LAYERS):
        out = 10 if i == LAYERS - 1 else WIDTH
        inits += [numpy_helper.from_array((rng.standard_normal((out, WIDTH)) / 8).astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(np.zeros(out, np.float32), f"b{i}")]
        nodes.append(helper.make_node("Gemm", [last, f"w{i}", f"b{i}"], [f"h{i}"], transB=1))
        if i < LAYERS - 1:
            nodes.append(helper.make_node("Relu", [f"h{i}"], [f"a{i}"]))
            last = f"a{i}"
    nodes[-1].output[0] = "y"
    graph = helper.make_graph(nodes, MODEL, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", WIDTH])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    path = root / MODEL / "1" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    (root / MODEL / "config.toml").write_text(CONFIG)


def run_priority(base: Settings, workdir: Path, jobs: int, probes: int) -> dict[str, Any]:
    """Both phases (high probes, then normal ones) on a stack of their own; the figures per phase."""
    children = Children()
    stack = Stack.create(base, f"bench{uuid.uuid4().hex[:10]}", workdir, ["mlp"], children)
    write_model(stack.settings.model_repository)
    results: dict[str, Any] = {"model": f"{MODEL}: {LAYERS} layers, x float32[N,{WIDTH}]", "backlog_jobs": jobs,
                               "backlog_rows_per_job": ROWS, "probes": probes, "phases": {}}
    try:
        stack.sync()
        stack.start_edge()
        for priority in ("high", "normal"):
            say(f"  {priority} probes: publishing {jobs} normal jobs of {ROWS}x{WIDTH} floats over AMQP ...")
            phase = run_async(_phase(stack, jobs, probes, priority))
            stack.stop_worker(MODEL)
            results["phases"][priority] = phase
            say(f"  -> {priority}: wait to start p50 {phase['wait_ms_p50']:.0f} ms (max {phase['wait_ms_max']:.0f}), "
                f"answer p50 {phase['answer_ms_p50']:.0f} ms; waiting normal jobs that started first: "
                f"{phase['ahead_pct_max']:.1f}% at most (of {phase['waiting_min']}-{phase['waiting_max']} waiting)")
    finally:
        children.stop_all()
        stack.remove_namespace()
    return results


async def _phase(stack: Stack, jobs: int, probes: int, priority: str) -> dict[str, Any]:
    from inferq.broker.connection import BrokerConnection
    from inferq.broker.topology import Topology

    s = stack.settings
    topology = Topology(s.namespace)
    queue = topology.model_queue(MODEL, "1")
    async with await BrokerConnection.open(s.broker, "bench-priority") as connection:
        channel = await connection.channel()
        replies = await channel.declare_queue(exclusive=True, auto_delete=True)
        answered: set[str] = set()
        all_in = asyncio.Event()

        async def on_reply(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            answered.add(message.correlation_id or "")
            if len(answered) >= jobs:
                all_in.set()

        await replies.consume(on_reply, no_ack=True)
        backlog = await _publish(connection, topology, replies.name, jobs)
        stack.spawn_worker(MODEL)
        await until(lambda: _ready_at_most(connection, queue, int(jobs * 0.9)), 120, interval=0.05)  # the worker is into it
        async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http:
            sent = await asyncio.gather(*(_probe(http, stack.url, priority, i) for i in range(probes)))
            await asyncio.wait_for(all_in.wait(), 600)
            starts = await _started_at(http, stack.url, backlog)
        await channel.close()
    return _figures(sent, starts)


async def _publish(connection: Any, topology: Any, reply_to: str, count: int) -> list[str]:
    rng = np.random.default_rng(SEED)
    x = rng.standard_normal((ROWS, WIDTH)).astype("<f4")
    body = msgpack.packb({"inputs": {"x": {"dtype": "float32", "shape": [ROWS, WIDTH], "data": x.tobytes()}}})
    ids = [uuid.uuid4().hex for _ in range(count)]
    for start in range(0, count, 100):
        await asyncio.gather(*(connection.publish(
            aio_pika.Message(body, message_id=job_id, correlation_id=job_id, reply_to=reply_to,
                             content_type="application/msgpack", delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            MODEL, topology.requests, mandatory=True) for job_id in ids[start:start + 100]))
    return ids


async def _probe(http: aiohttp.ClientSession, url: str, priority: str, index: int) -> dict[str, Any]:
    """One one-row job over HTTP with ``?wait=``: when it was sent, and its document."""
    x = np.random.default_rng(SEED + 1 + index).standard_normal((1, WIDTH)).astype(np.float32)
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, WIDTH], "data": x.ravel().tolist()}],
            "priority": priority}
    sent = time.time()
    async with http.post(f"{url}/v1/models/{MODEL}/jobs", params={"wait": "60"}, json=body) as resp:
        doc = await resp.json()
    while doc.get("status") in ("queued", "running"):  # a normal probe may wait out the whole backlog
        async with http.get(f"{url}/v1/jobs/{doc['job_id']}", params={"wait": "60"}) as resp:
            doc = await resp.json()
    answered = time.time()
    if doc.get("status") != "succeeded":
        raise RuntimeError(f"a {priority} probe did not succeed: {doc}")
    return {"sent": sent, "answered": answered, "started": _ts(doc["started_at"])}


async def _started_at(http: aiohttp.ClientSession, url: str, ids: list[str]) -> list[float]:
    """When each backlog job started, from the ledger (through the edge)."""
    limit = asyncio.Semaphore(32)

    async def one(job_id: str) -> float:
        async with limit, http.get(f"{url}/v1/jobs/{job_id}") as resp:
            doc = await resp.json()
        if doc.get("status") != "succeeded":
            raise RuntimeError(f"backlog job {job_id} ended {doc.get('status')}: {doc.get('error')}")
        return _ts(doc["started_at"])

    return list(await asyncio.gather(*(one(j) for j in ids)))


def _figures(probes: list[dict[str, Any]], starts: list[float]) -> dict[str, Any]:
    """Per probe: its waits, and the share of the normal jobs waiting at its arrival that started before it."""
    rows = []
    for p in probes:
        waiting = [t for t in starts if t > p["sent"]]
        ahead = sum(1 for t in waiting if t < p["started"])
        rows.append({"wait_ms": round((p["started"] - p["sent"]) * 1000, 1),
                     "answer_ms": round((p["answered"] - p["sent"]) * 1000, 1),
                     "waiting": len(waiting), "ahead": ahead,
                     "ahead_pct": round(100 * ahead / len(waiting), 2) if waiting else 0.0})
    waits, answers = sorted(r["wait_ms"] for r in rows), sorted(r["answer_ms"] for r in rows)
    return {"probes": rows, "wait_ms_p50": waits[len(waits) // 2], "wait_ms_max": waits[-1],
            "answer_ms_p50": answers[len(answers) // 2], "answer_ms_max": answers[-1],
            "ahead_pct_max": max(r["ahead_pct"] for r in rows),
            "waiting_min": min(r["waiting"] for r in rows), "waiting_max": max(r["waiting"] for r in rows),
            "backlog_seconds": round(max(starts) - min(starts), 2)}


def _ts(iso: str) -> float:
    import datetime

    return datetime.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


async def _ready_at_most(connection: Any, queue: str, n: int) -> bool:
    counts = await connection.queue_counts(queue)
    return counts is not None and counts[0] <= n
