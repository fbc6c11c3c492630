"""Scaling benchmark (``inferq bench --scaling``): how fast the autoscaler reacts, on real processes.

Two figures, on the demo MLP with the local launcher:

* **cold start**: from a job published to a model with zero workers to its result
  (autoscaler activation + worker start + model load + inference);
* **scale-up**: from a backlog appearing in a queue served by one worker to a
  second worker consuming it (the queue's consumer count reaching 2).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

import aio_pika
import msgpack
import numpy as np

from inferq.benchmarks.procs import Children, python_argv
from inferq.benchmarks.stack import Stack, run_async, until
from inferq.settings import Settings


def say(line: str) -> None:
    print(line, flush=True)


def run_scaling(base: Settings, workdir: Path, interval_s: float, repeats: int) -> dict[str, Any]:
    """Run both measurements ``repeats`` times; return the figures (seconds)."""
    children = Children()
    stack = Stack.create(base, f"bench{uuid.uuid4().hex[:10]}", workdir, ["mlp"], children)
    results: dict[str, Any] = {"interval_s": interval_s, "cold_start_s": [], "scale_up_s": []}
    try:
        stack.sync()
        for i in range(repeats):
            cold, up = run_async(_round(stack, children, interval_s, i))
            results["cold_start_s"].append(round(cold, 3))
            results["scale_up_s"].append(round(up, 3))
            say(f"  round {i + 1}: cold start {cold:.2f} s, backlog to second worker consuming {up:.2f} s")
    finally:
        children.stop_all()
        stack.remove_namespace()
    for key in ("cold_start_s", "scale_up_s"):
        values = sorted(results[key])
        results[key + "_median"] = values[len(values) // 2] if values else None
    return results


async def _round(stack: Stack, children: Children, interval_s: float, index: int) -> tuple[float, float]:
    from inferq.broker.connection import BrokerConnection
    from inferq.broker.topology import Topology
    from inferq.runtime.coordination import keys, open_etcd

    s = stack.settings
    topology, queue = Topology(s.namespace), Topology(s.namespace).model_queue("mlp", "1")
    policy = {"min_workers": 0, "max_workers": 2, "target_backlog_per_worker": 200,
              "scale_up_stabilization_s": 0, "scale_down_stabilization_s": 600, "idle_before_zero_s": 600}
    async with open_etcd(s.etcd) as etcd:
        await etcd.put(keys(s.namespace).policy("mlp").encode(), json.dumps(policy).encode())
    env = {**stack.env(), "INFERQ_AUTOSCALER_INTERVAL_S": str(interval_s)}
    argv = python_argv("-m", "inferq.cli", "--log-level", "warning", "autoscaler", "--launcher", "local")
    scaler = children.start("autoscaler", argv, env, stack.logs / f"autoscaler-{index}.log")
    try:
        async with await BrokerConnection.open(s.broker, "bench-scaling") as connection:
            await until(lambda: _consumers(connection, queue, 0), 30)
            await asyncio.sleep(interval_s * 2)  # the autoscaler is up and has seen zero workers
            cold = await _cold_start(connection, topology)
            up = await _scale_up(connection, topology, queue)
    finally:
        children.stop(scaler, grace_s=30)  # drains the workers it started
    return cold, up


async def _cold_start(connection: Any, topology: Any) -> float:
    channel = await connection.channel()
    replies = await channel.declare_queue(exclusive=True, auto_delete=True)
    done: asyncio.Future[float] = asyncio.get_running_loop().create_future()
    await replies.consume(lambda m: done.done() or done.set_result(time.perf_counter()), no_ack=True)
    started = time.perf_counter()
    await connection.publish(_job(reply_to=replies.name), "mlp", topology.requests, mandatory=True)
    finished = await asyncio.wait_for(done, 60)
    await channel.close()
    return finished - started


async def _scale_up(connection: Any, topology: Any, queue: str) -> float:
    publishing = asyncio.create_task(_flood(connection, topology, 20_000))
    try:
        # The backlog "appears" when the ready count first exceeds one worker's target.
        await until(lambda: _ready_over(connection, queue, 200), 60, interval=0.01)
        appeared = time.perf_counter()
        await until(lambda: _consumers(connection, queue, 2), 60, interval=0.01)
        return time.perf_counter() - appeared
    finally:
        publishing.cancel()
        await asyncio.gather(publishing, return_exceptions=True)
        channel = await connection.channel()
        await (await channel.declare_queue(queue, passive=True)).purge()
        await channel.close()


async def _flood(connection: Any, topology: Any, count: int) -> None:
    for _ in range(count // 100):
        await asyncio.gather(*(connection.publish(_job(), "mlp", topology.requests) for _ in range(100)))


def _job(reply_to: str | None = None) -> aio_pika.Message:
    x = np.full((1, 256), 0.1, dtype="<f4")
    body = msgpack.packb({"inputs": {"x": {"dtype": "float32", "shape": [1, 256], "data": x.tobytes()}}})
    return aio_pika.Message(body, message_id=uuid.uuid4().hex, content_type="application/msgpack",
                            reply_to=reply_to, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)


async def _consumers(connection: Any, queue: str, n: int) -> bool:
    counts = await connection.queue_counts(queue)
    return counts is not None and counts[1] == n if n == 0 else counts is not None and counts[1] >= n


async def _ready_over(connection: Any, queue: str, n: int) -> bool:
    counts = await connection.queue_counts(queue)
    return counts is not None and counts[0] > n
