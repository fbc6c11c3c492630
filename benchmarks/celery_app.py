"""The Celery peer: one task running the same ONNX model file, one sample per task.

Configured from the environment so the worker (``celery -A benchmarks.celery_app worker``)
and the load generator agree: ``BENCH_CELERY_BROKER``, ``BENCH_CELERY_QUEUE``,
``BENCH_MODEL_PATH``, ``BENCH_ORT_THREADS``. Prefork pool, msgpack, rpc:// results.

``BENCH_CELERY_DURABLE=1`` gives Celery the guarantees inferq has (Celery 5.5+): the task queue is a
quorum queue, every publish is confirmed, and a task is acked only after it ran (so a worker that dies
mid-task has it delivered again). Without it: Celery's defaults (classic queue, no confirms, early ack).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from celery import Celery, signals
from kombu import Exchange, Queue

QUEUE = os.environ.get("BENCH_CELERY_QUEUE", "inferq-bench-celery")
DURABLE = os.environ.get("BENCH_CELERY_DURABLE") == "1"

app = Celery("inferq_bench", broker=os.environ.get("BENCH_CELERY_BROKER", "amqp://guest:guest@127.0.0.1:5672//"), backend="rpc://")
app.conf.update(
    task_serializer="msgpack",
    result_serializer="msgpack",
    accept_content=["msgpack"],
    task_default_queue=QUEUE,
    task_default_exchange=QUEUE,
    task_default_routing_key=QUEUE,
    task_create_missing_queues=True,
    worker_prefetch_multiplier=int(os.environ.get("BENCH_CELERY_PREFETCH", "4")),
    worker_enable_remote_control=False,  # no pidbox queues left behind; readiness is read from the queue
    worker_send_task_events=False,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    result_persistent=False,
    task_ignore_result=False,
)
if DURABLE:
    app.conf.update(
        # the queue replicated and fsynced by RabbitMQ's Raft log, as inferq's request queues are
        task_queues=[Queue(QUEUE, Exchange(QUEUE, type="direct"), routing_key=QUEUE, queue_arguments={"x-queue-type": "quorum"})],
        # quorum queues refuse a global QoS: Celery 5.5 then sets the prefetch per consumer
        worker_detect_quorum_queues=True,
        # the worker's own publishes (its results) wait for the broker's confirm, like inferq's ledger writes
        broker_transport_options={"confirm_publish": True},
        # ack after the task ran, and give a task back when its prefork child dies: at-least-once, as inferq
        task_acks_late=True,
        task_reject_on_worker_lost=True,
    )

_session: Any = None


def _load() -> Any:
    global _session
    if _session is None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = int(os.environ.get("BENCH_ORT_THREADS", "1"))
        options.inter_op_num_threads = 1
        _session = ort.InferenceSession(os.environ["BENCH_MODEL_PATH"], options, providers=["CPUExecutionProvider"])
    return _session


@signals.worker_process_init.connect
def _warm(**_: Any) -> None:
    """Each prefork child loads the model once, before it takes tasks."""
    if "BENCH_MODEL_PATH" in os.environ:
        _load()


@app.task(name="bench.infer")
def infer(data: bytes, shape: list[int]) -> tuple[bytes, list[int]]:
    """One sample in (raw float32 bytes + shape), the first output back the same way."""
    x = np.frombuffer(data, dtype=np.float32).reshape(shape)
    y = _load().run(None, {"x": x})[0]
    return y.tobytes(), list(y.shape)
