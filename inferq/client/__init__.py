"""The Python SDK: submit jobs to inferq over HTTP (:class:`Client`, :class:`AsyncClient`) or AMQP (:class:`AmqpClient`).

It needs only the base dependencies (aiohttp, numpy, msgpack, aio-pika), never
onnxruntime. Names are loaded on first use, so ``import inferq`` stays cheap
and a pure HTTP user never imports aio-pika::

    inferq.client.sync      Client       blocking, on a private event loop thread
    inferq.client.http      AsyncClient  asyncio
    inferq.client.amqp      AmqpClient   asyncio, straight to RabbitMQ with confirms and reply_to
    inferq.client.job       Job, AsyncJob
    inferq.client.document  JobStatus, JobDocument
    inferq.client.retry     RetryPolicy
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

EXPORTS = {
    "Client": "inferq.client.sync",
    "AsyncClient": "inferq.client.http",
    "AmqpClient": "inferq.client.amqp",
    "Job": "inferq.client.job",
    "AsyncJob": "inferq.client.job",
    "JobStatus": "inferq.client.document",
    "JobDocument": "inferq.client.document",
    "RetryPolicy": "inferq.client.retry",
}
__all__ = sorted(EXPORTS)

if TYPE_CHECKING:
    from inferq.client.amqp import AmqpClient
    from inferq.client.document import JobDocument, JobStatus
    from inferq.client.http import AsyncClient
    from inferq.client.job import AsyncJob, Job
    from inferq.client.retry import RetryPolicy
    from inferq.client.sync import Client


def __getattr__(name: str) -> Any:
    if name not in EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(EXPORTS))
