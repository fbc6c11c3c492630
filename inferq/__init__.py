"""inferq: async inference on RabbitMQ and ONNX Runtime.

The installed package is ``inferq`` and nothing else. Its subpackages live in
the repository's top-level folders (``pyproject.toml`` maps them)::

    inferq            this folder: the public face (CLI, ``up``, errors, settings, client SDK)
    inferq.edge       edge/      the HTTP gateway
    inferq.actors     actors/    shard worker, autoscaler, edge-node agent
    inferq.runtime    runtime/   actor base, ONNX sessions, etcd, model repository
    inferq.broker     broker/    RabbitMQ topology, codec, wire messages, ledger
    inferq.benchmarks benchmarks/ the ``inferq bench`` harness

Imports flow one way: ``inferq.cli``/``inferq.up`` -> edge, actors (siblings)
-> runtime -> broker; ``inferq.errors`` and ``inferq.settings`` are the ground
everyone may import. ``tests/test_layering.py`` enforces it.

The client SDK is here too, loaded only when one of its names is used, because
every server process imports ``inferq.errors`` and ``inferq.settings``::

    from inferq import Client, AsyncClient, AmqpClient
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

if sys.version_info < (3, 11):  # pragma: no cover (Python 3.10: JetPack 6's, for the agent and worker)
    import asyncio
    import asyncio.exceptions

    # 3.11 made asyncio's TimeoutError the builtin one; the code catches the builtin. asyncio.wait_for
    # looks the class up when it raises, so binding the builtin here makes 3.10 behave the same.
    asyncio.TimeoutError = asyncio.exceptions.TimeoutError = TimeoutError  # type: ignore[misc]

__version__ = "0.2.0"

CLIENT_NAMES = frozenset({"Client", "AsyncClient", "AmqpClient", "Job", "AsyncJob", "JobStatus", "JobDocument", "RetryPolicy"})
__all__ = sorted(CLIENT_NAMES | {"__version__"})

if TYPE_CHECKING:
    from inferq.client import AmqpClient, AsyncClient, AsyncJob, Client, Job, JobDocument, JobStatus, RetryPolicy


def __getattr__(name: str) -> Any:
    if name in CLIENT_NAMES:
        import inferq.client

        return getattr(inferq.client, name)
    raise AttributeError(f"module 'inferq' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | CLIENT_NAMES)
