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

from pathlib import Path

import aetcd
import aetcd.exceptions
import grpc
from aetcd import rpc
from aetcd import watcher as aetcd_watcher

from runtime.errors import ConfigError, CoordinationError
from runtime.settings import EtcdSettings

ETCD_ERRORS = (aetcd.exceptions.ClientError, OSError, TimeoutError)


def open_etcd(settings: EtcdSettings) -> aetcd.Client:
    """An etcd client; it connects lazily on its first call, each call bounded by ``timeout_s``.

    With ``ca_file`` set it speaks TLS (and presents ``cert_file``/``key_file`` if given).
    """
    kwargs = dict(
        host=settings.host,
        port=settings.port,
        username=settings.username or None,
        password=settings.password or None,
        timeout=settings.timeout_s,
    )
    if settings.ca_file:
        return TlsClient(_credentials(settings), **kwargs)
    return aetcd.Client(**kwargs)


def _credentials(settings: EtcdSettings) -> grpc.ChannelCredentials:
    def read(path: str) -> bytes | None:
        return Path(path).read_bytes() if path else None

    try:
        return grpc.ssl_channel_credentials(read(settings.ca_file), read(settings.key_file), read(settings.cert_file))
    except OSError as exc:
        raise ConfigError(f"cannot read etcd TLS files: {exc}") from exc


class TlsClient(aetcd.Client):
    """aetcd.Client over TLS: aetcd itself only opens plaintext channels."""

    def __init__(self, credentials: grpc.ChannelCredentials, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._credentials = credentials

    async def connect(self) -> None:
        """What aetcd.Client.connect does, on a secure channel."""
        if self._connected.is_set():
            return
        self.channel = grpc.aio.secure_channel(f"{self._host}:{self._port}", self._credentials, options=self._options.items())
        if self._username is not None and self._password is not None:
            request = rpc.AuthenticateRequest(name=self._username, password=self._password)
            response = await rpc.AuthStub(self.channel).Authenticate(request, timeout=self._timeout)
            self.metadata = (("token", response.token),)
        self.kvstub = rpc.KVStub(self.channel)
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self._watcher = aetcd_watcher.Watcher(rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata)
        self._connected.set()


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
