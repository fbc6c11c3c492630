"""The Ray Serve peer: the same ONNX model file behind one Serve deployment with ``@serve.batch``.

Runs in its own virtualenv (``.venv-bench-ray``, made by ``make bench``), without inferq:
``python benchmarks/peers/ray_serve.py PORT TEMP_DIR``; prints READY once the deployment answers,
runs until SIGTERM, then shuts Serve and Ray down. Environment: ``BENCH_MODEL_PATH``, ``BENCH_ORT_THREADS``.
Start it with ``RAY_worker_niceness=0``: Ray starts its workers at nice 15 otherwise, and on a busy
2-core machine they would lose every contest for CPU with the load generator.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

import numpy as np
import ray
from ray import serve


# 1 replica of 1 CPU: the HTTP proxy (a Python actor of its own) needs the other core; with 2 replicas
# on 2 cores they and the proxy only take CPU from each other.
# max_ongoing_requests 128: Serve's default (5) would cap each batch at 5; it must be >= max_batch_size.
@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 1}, max_ongoing_requests=128)
class Mlp:
    def __init__(self, path: str, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    # @serve.batch: Serve's documented way to throughput for small models; the wait bounds the added latency.
    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def infer(self, xs: list[np.ndarray]) -> list[list[Any]]:
        y = self.session.run(None, {"x": np.concatenate(xs)})[0]
        return [row[None].tolist() for row in y]

    async def __call__(self, request: Any) -> list[Any]:
        doc = await request.json()
        return await self.infer(np.asarray(doc["x"], dtype=np.float32))


def main(port: int, temp_dir: str) -> int:
    stop = threading.Event()
    # num_cpus=2: the machine's cores, no more; no dashboard: it is a process of its own and costs CPU
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp_dir, configure_logging=False, log_to_driver=False)
    # after ray.init, which installs a SIGTERM handler of its own that would leave Ray's processes running
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(Mlp.bind(os.environ["BENCH_MODEL_PATH"], int(os.environ.get("BENCH_ORT_THREADS", "1"))), route_prefix="/")
        print("READY", flush=True)
        while not stop.wait(0.5):  # a timed wait, so the handler runs promptly
            pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), sys.argv[2]))
