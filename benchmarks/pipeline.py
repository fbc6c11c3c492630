"""Pipeline benchmark (``inferq bench --pipeline``): the transformer demo split in 2 stages vs the whole model.

Three rows, each a closed loop of HTTP jobs (``?wait=``, msgpack) through a real edge and
real workers: the whole model on 1 worker, on 2 workers, and the 2-stage pipeline with one
worker per stage. On a machine whose cores the workers share, a split adds a broker hop
and a second batch wait per job and buys no compute; it pays off where the stages run on
separate devices (a model too large for one, or a slow stage on an accelerator).
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from inferq.benchmarks.procs import Children, python_argv
from inferq.benchmarks.stack import Stack, run_async
from inferq.broker.codec import encode_tensor, packb
from inferq.settings import Settings

MODEL, PIPELINE = "transformer", "transformer-p2"


def run_pipeline(base: Settings, workdir: Path, jobs: int, concurrency: int) -> dict[str, Any]:
    """Measure the three rows; return ``{"rows": [{name, workers, jobs_per_s, p50_ms, p95_ms, failed}]}``."""
    children = Children()
    stack = Stack.create(base, f"bench{uuid.uuid4().hex[:10]}", workdir, [MODEL], children)
    rows = []
    try:
        stack.sync()
        split = subprocess.run(python_argv("-m", "inferq.cli", "--log-level", "warning", "models", "split", MODEL,
                                           "--stages", "2", "--as", PIPELINE, "--direct"),
                               env=stack.env(), capture_output=True, text=True, timeout=120)
        if split.returncode != 0:
            raise RuntimeError(f"models split failed: {split.stderr[-2000:]}")
        stack.start_edge()
        x = _sample(stack.model_path(MODEL))
        for name, target, workers in ((f"{MODEL} whole, 1 worker", MODEL, [MODEL]),
                                      (f"{MODEL} whole, 2 workers", MODEL, [MODEL, MODEL]),
                                      (f"{PIPELINE} (2 stages, 1 worker each)", PIPELINE, [f"{PIPELINE}-s0", f"{PIPELINE}-s1"])):
            procs = [stack.start_worker(m) for m in workers]
            row = run_async(_load(stack.url, target, x, jobs, concurrency))
            rows.append({"name": name, "workers": len(procs), **row})
            print(f"  {name:42s} {row['jobs_per_s']:8.1f} jobs/s  p50 {row['p50_ms']:7.1f} ms  p95 {row['p95_ms']:7.1f} ms"
                  f"  failed {row['failed']}", flush=True)
            for proc in list(stack.workers.values()):
                children.stop(proc, grace_s=15)
            stack.workers.clear()
    finally:
        children.stop_all()
        stack.remove_namespace()
    return {"model": MODEL, "jobs": jobs, "concurrency": concurrency, "rows": rows}


def _sample(path: Path) -> np.ndarray:
    import onnx

    dims = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    shape = [d.dim_value or 1 for d in dims]
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


async def _load(url: str, model: str, x: np.ndarray, jobs: int, concurrency: int) -> dict[str, Any]:
    body = packb({"inputs": {"x": encode_tensor(x)}})
    headers = {"Content-Type": "application/msgpack"}
    latencies: list[float] = []
    failed = 0
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(jobs):
        queue.put_nowait(i)

    async def worker(http: aiohttp.ClientSession) -> None:
        nonlocal failed
        while not queue.empty():
            queue.get_nowait()
            t0 = time.perf_counter()
            async with http.post(f"{url}/v1/models/{model}/jobs", params={"wait": "60"}, data=body, headers=headers) as resp:
                doc = await resp.json()
            if resp.status == 200 and doc.get("status") == "succeeded":
                latencies.append(time.perf_counter() - t0)
            else:
                failed += 1

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        for _ in range(10):  # warm up
            async with http.post(f"{url}/v1/models/{model}/jobs", params={"wait": "60"}, data=body, headers=headers) as resp:
                await resp.read()
        started = time.perf_counter()
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    ms = sorted(v * 1000 for v in latencies) or [0.0]
    return {"jobs_per_s": round(len(latencies) / elapsed, 1), "p50_ms": round(statistics.median(ms), 1),
            "p95_ms": round(ms[int(len(ms) * 0.95) - 1 if len(ms) > 1 else 0], 1), "failed": failed}
