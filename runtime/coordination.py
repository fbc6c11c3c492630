"""etcd access: a client factory and the translation of aetcd errors.

Key layout (``<ns>`` is the namespace, ``inferq`` by default)::

    /<ns>/workers/<worker-id>   JSON membership record, attached to the worker's lease
    /<ns>/models/<model>        JSON model metadata (versions, signature, batching, scaling)
    /<ns>/policies/<model>      JSON scaling-policy overrides, changeable at run time
    /<ns>/autoscaler/leader     the acting autoscaler (lease-backed; fencing by create revision)
    /<ns>/autoscaler/decisions/<model>.<version>   the last scaling decision and its inputs
    /<ns>/nodes/<node>          edge-node agents: providers offered, capacity (lease-backed)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aetcd
import aetcd.exceptions

from runtime.errors import CoordinationError
from runtime.settings import EtcdSettings

ETCD_ERRORS = (aetcd.exceptions.ClientError, OSError, TimeoutError)


def open_etcd(settings: EtcdSettings) -> aetcd.Client:
    """An etcd client; it connects lazily on its first call, each call bounded by ``timeout_s``."""
    return aetcd.Client(
        host=settings.host,
        port=settings.port,
        username=settings.username or None,
        password=settings.password or None,
        timeout=settings.timeout_s,
    )


@contextlib.asynccontextmanager
async def translated(what: str) -> AsyncIterator[None]:
    """Re-raise aetcd and network errors as CoordinationError."""
    try:
        yield
    except ETCD_ERRORS as exc:
        raise CoordinationError(f"etcd: {what} failed: {exc!r}") from exc


def keys(namespace: str) -> _Keys:
    """The key layout of ``namespace``."""
    return _Keys(namespace)


class _Keys:
    def __init__(self, namespace: str) -> None:
        self.root = f"/{namespace}"

    @property
    def workers(self) -> str:
        return f"{self.root}/workers/"

    def worker(self, worker_id: str) -> str:
        return f"{self.workers}{worker_id}"

    @property
    def models(self) -> str:
        return f"{self.root}/models/"

    def model(self, name: str) -> str:
        return f"{self.models}{name}"

    @property
    def policies(self) -> str:
        return f"{self.root}/policies/"

    def policy(self, model: str) -> str:
        return f"{self.policies}{model}"

    @property
    def leader(self) -> str:
        return f"{self.root}/autoscaler/leader"

    @property
    def decisions(self) -> str:
        return f"{self.root}/autoscaler/decisions/"

    @property
    def nodes(self) -> str:
        return f"{self.root}/nodes/"

    def node(self, name: str) -> str:
        return f"{self.nodes}{name}"


async def get_json_prefix(client: aetcd.Client, prefix: str, timeout: float) -> dict[str, Any]:
    """Every key under ``prefix`` decoded as JSON, keyed by the rest of the key."""
    async with translated(f"reading {prefix}"):
        result = await asyncio.wait_for(client.get_prefix(prefix.encode()), timeout)
    out = {}
    for kv in result:
        try:
            out[kv.key.decode()[len(prefix):]] = json.loads(kv.value)
        except ValueError:
            continue
    return out
