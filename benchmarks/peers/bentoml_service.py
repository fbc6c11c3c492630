"""The BentoML peer: the same ONNX model file behind BentoML 1.4's two APIs, configured for throughput.

Runs in its own virtualenv (``.venv-bench-bentoml``, made by ``make bench``), without inferq:
``bentoml serve bentoml_service:MlpApi --working-dir benchmarks/peers``. Environment:
``BENCH_MODEL_PATH``, ``BENCH_ORT_THREADS``, ``BENCH_BENTOML_WORKERS``, ``BENCH_BENTOML_MAX_BATCH``.
"""

from __future__ import annotations

import os
from typing import Any

import bentoml
import numpy as np


def _session() -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    # one ORT thread per worker process: BentoML scales by processes (workers), as Celery's prefork does
    options.intra_op_num_threads = int(os.environ.get("BENCH_ORT_THREADS", "1"))
    options.inter_op_num_threads = 1
    return ort.InferenceSession(os.environ["BENCH_MODEL_PATH"], options, providers=["CPUExecutionProvider"])


# workers=2: BentoML's docs recommend one worker process per CPU core for CPU-bound models (2 cores here).
# No access log: a log line per request is CPU the other systems do not spend (inferq logs no request either).
@bentoml.service(workers=int(os.environ.get("BENCH_BENTOML_WORKERS", "2")), traffic={"timeout": 60},
                 logging={"access": {"enabled": False}})
class MlpApi:
    """The synchronous API: one request, one answer; adaptive batching merges concurrent requests."""

    def __init__(self) -> None:
        self.session = _session()

    # batchable: BentoML's adaptive batching, its documented way to throughput for small models.
    # max_latency_ms: the batcher answers 503 "process is overloaded" to a request it expects to miss this
    # bound; 64 requests in flight on 2 cores wait ~100 ms, and inferq sheds no job, so the bound is generous.
    @bentoml.api(batchable=True, batch_dim=0, max_batch_size=int(os.environ.get("BENCH_BENTOML_MAX_BATCH", "64")),
                 max_latency_ms=10_000)
    def infer(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"x": x.astype(np.float32, copy=False)})[0]


# workers=1: with 2 workers the task API's SQLite task store answers "database is locked" (BentoML #5525).
@bentoml.service(workers=1, traffic={"timeout": 60}, logging={"access": {"enabled": False}})
class MlpTask:
    """The task API (submit, then poll status and get the result): the closest to inferq's async jobs."""

    def __init__(self) -> None:
        self.session = _session()

    @bentoml.task
    def infer_task(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"x": x.astype(np.float32, copy=False)})[0]
