"""etcd access: a client factory and the translation of aetcd errors.

Key layout (``<ns>`` is the namespace, ``inferq`` by default); the value
types are the records of :mod:`inferq.runtime.records`::

    /<ns>/workers/<worker-id>   WorkerRecord, attached to the worker's lease
    /<ns>/models/<model>        ModelRecord: the registry entry (versions with content hashes, aliases,
                                traffic split, shadow, config); changed only by compare-and-swap transactions
    /<ns>/history/<model>/<seq> HistoryEntry: every registry change, written in the same transaction
    /<ns>/removals/<model>/<version>   RemovalRecord: a removed version whose queued jobs the autoscaler fails
    /<ns>/policies/<model>      ScalingPolicy overrides, changeable at run time
    /<ns>/autoscaler/leader     the acting autoscaler (lease-backed; fencing by create revision)
    /<ns>/autoscaler/decisions/<model>.<version>   Decision: the last scaling decision and its inputs
    /<ns>/nodes/<node>          NodeRecord of an edge-node agent (lease-backed)
    /<ns>/apikeys/<sha256>      an API key's tenant and limits (edge.auth)
    /<ns>/jointokens/<sha256>   JoinTokenRecord: an agent join token's expiry and node-name prefix (never the token)
    /<ns>/agents/<node>         AgentRecord: the node credentials a join gave out (API key hash, broker user)
    /<ns>/starts/<job-id>       starts of a suspect job that killed its worker (actors.attempts)
    /<ns>/idempotency/<job-id>  who queued an Idempotency-Key's job (edge.idempotency; on a lease >= jobs.ttl_s)
    /<ns>/brokerusers/<user>    BrokerUserRecord: the tenant of a RabbitMQ user (inferq tenant create --amqp)
    /<ns>/meters/<tenant>       MeterRecord: a tenant's token bucket for AMQP jobs, shared by the workers
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, TypeVar

from pathlib import Path

import aetcd
import aetcd.exceptions
import grpc
from aetcd import rpc
from aetcd import watcher as aetcd_watcher

from inferq.broker.failover import Rotation
from inferq.errors import CodecError, ConfigError, CoordinationError
from inferq.settings import EtcdSettings

log = logging.getLogger("inferq.etcd")
R = TypeVar("R")

ETCD_ERRORS = (aetcd.exceptions.ClientError, OSError, TimeoutError)


# Errors after which a client moves to the next member: the member is gone or does not answer in time
# (a member cut off from its quorum lets requests time out, or answers "no leader").
FAILOVER_ERRORS = (aetcd.exceptions.ConnectionFailedError, aetcd.exceptions.ConnectionTimeoutError)
# Each RPC gets this share of ``timeout_s``: the callers bound the same calls by ``timeout_s``, and the
# RPC's own deadline must fire first, or a hanging member would never be left.
RPC_SHARE = 0.8


def open_etcd(settings: EtcdSettings) -> EtcdClient:
    """An etcd client over ``settings.members``; it connects lazily on its first call.

    Each call is bounded by ``timeout_s``. With ``ca_file`` set it speaks TLS
    (and presents ``cert_file``/``key_file`` if given). On a member's failure
    it moves to the next one (see :class:`EtcdClient`).
    """
    credentials = _credentials(settings) if settings.ca_file else None
    return EtcdClient(
        settings.members, credentials,
        username=settings.username or None,
        password=settings.password or None,
        timeout=settings.timeout_s * RPC_SHARE,
    )


def _credentials(settings: EtcdSettings) -> grpc.ChannelCredentials:
    def read(path: str) -> bytes | None:
        return Path(path).read_bytes() if path else None

    try:
        return grpc.ssl_channel_credentials(read(settings.ca_file), read(settings.key_file), read(settings.cert_file))
    except OSError as exc:
        raise ConfigError(f"cannot read etcd TLS files: {exc}") from exc


def _failing_over(name: str, retry: bool) -> Callable[..., Any]:
    """aetcd.Client's method ``name``, moving to the next member when the call fails for want of its member.

    ``retry``: the call is idempotent (a read, a lease refresh) and is made once
    more at once, on the next member. Other calls (writes, transactions, lease
    grants) raise, and their caller decides; the next call goes to the next member.
    """
    original = getattr(aetcd.Client, name)

    @functools.wraps(original)
    async def call(self: EtcdClient, *args: Any, **kwargs: Any) -> Any:
        tries = 2 if retry and len(self.members) > 1 else 1
        for attempt in range(1, tries + 1):
            try:
                return await self.call_once(original, *args, **kwargs)
            except FAILOVER_ERRORS:
                if attempt == tries:
                    raise
        raise AssertionError("unreachable")

    return call


class EtcdClient(aetcd.Client):
    """aetcd.Client over the members of a cluster, plaintext or TLS.

    aetcd takes one host and port. This client talks to one member at a time;
    when a call fails because that member is gone or cut off (``FAILOVER_ERRORS``),
    it closes the channel and the next call opens one to the next member. Once
    every member has failed in a row, opening a channel waits a backoff first.
    Leases and watches are cluster-wide in etcd, so a lease granted through one
    member is refreshed through another.
    """

    BACKOFF_S = 0.2

    def __init__(self, members: Sequence[tuple[str, int]], credentials: grpc.ChannelCredentials | None = None,
                 **kwargs: Any) -> None:
        if not members:
            raise ConfigError("etcd needs at least one endpoint")
        self.members = tuple(members)
        self.rotation = Rotation(len(self.members), self.BACKOFF_S, max(self.BACKOFF_S, (kwargs.get("timeout") or 5) / 2))
        host, port = self.members[0]
        super().__init__(host=host, port=port, **kwargs)
        self._credentials = credentials
        self.generation = 0  # channels opened so far: a failure moves on only from the channel it happened on

    @property
    def endpoint(self) -> str:
        """The member in use (or tried next), ``host:port``."""
        return f"{self._host}:{self._port}"

    async def connect(self) -> None:
        """What aetcd.Client.connect does, on the current member, insecure or over TLS.

        With etcd auth, connecting makes a call (Authenticate): a member that
        does not answer it is left for the next, until one does.
        """
        if self._connected.is_set():
            return
        if self._is_connecting:  # another task is opening the channel
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        self._is_connecting = True
        try:
            if self.rotation.failures >= len(self.members):
                await asyncio.sleep(self.rotation.pause)
            for left in range(len(self.members), 0, -1):
                self._open_channel()
                try:
                    await self._authenticate()
                    break
                except FAILOVER_ERRORS as exc:
                    await self._discard_channel()
                    if len(self.members) > 1:
                        self._move_on(exc)
                    if left == 1:
                        raise
            self._connected.set()
        finally:
            self._is_connecting = False

    async def _authenticate(self) -> None:
        if self._username is None or self._password is None:
            return
        async with _rpc_errors():
            request = rpc.AuthenticateRequest(name=self._username, password=self._password)
            response = await rpc.AuthStub(self.channel).Authenticate(request, timeout=self._timeout)
        self.metadata = (("token", response.token),)

    def _open_channel(self) -> None:
        target = self.endpoint
        if self._credentials is not None:
            self.channel = grpc.aio.secure_channel(target, self._credentials, options=self._options.items())
        else:
            self.channel = rpc.insecure_channel(target, options=self._options.items())
        self.generation += 1
        self.kvstub = rpc.KVStub(self.channel)
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self._watcher = aetcd_watcher.Watcher(rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata)

    async def call_once(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``method`` (of aetcd.Client) on the current member; on a failure of that member, move on and raise."""
        await self.connect()
        generation = self.generation
        try:
            result = await method(self, *args, **kwargs)
        except FAILOVER_ERRORS as exc:
            await self.fail_over(generation, exc)
            raise
        self.rotation.connected()
        return result

    async def fail_over(self, generation: int, exc: BaseException) -> None:
        """Leave the current member (if the failure happened on the channel still open) for the next one."""
        if generation != self.generation or len(self.members) == 1:
            return  # already moved on; or a lone member, whose gRPC channel reconnects by itself
        self._move_on(exc)
        await self._discard_channel()

    def _move_on(self, exc: BaseException) -> None:
        was = self.endpoint
        self._host, self._port = self.members[self.rotation.failed()]
        self.generation += 1  # from here on, failures of calls on the old channel change nothing
        log.warning("etcd member %s failed (%s); moving to %s", was, _short(exc), self.endpoint)

    async def _discard_channel(self) -> None:
        """Close the channel and its watches (their iterators end); the next call opens a new channel."""
        channel, watcher = self.channel, self._watcher
        self._init_channel_attrs()
        self._connected.clear()
        try:
            if watcher is not None:
                await asyncio.wait_for(watcher.shutdown(), self._connect_wait_timeout)
            if channel is not None:
                await asyncio.wait_for(channel.close(), self._connect_wait_timeout)
        except (*ETCD_ERRORS, grpc.RpcError) as exc:
            log.debug("closing an etcd channel: %r", exc)

    get = _failing_over("get", retry=True)
    get_prefix = _failing_over("get_prefix", retry=True)
    get_range = _failing_over("get_range", retry=True)
    get_all = _failing_over("get_all", retry=True)
    refresh_lease = _failing_over("refresh_lease", retry=True)
    get_lease_info = _failing_over("get_lease_info", retry=True)
    status = _failing_over("status", retry=True)
    put = _failing_over("put", retry=False)
    delete = _failing_over("delete", retry=False)
    delete_prefix = _failing_over("delete_prefix", retry=False)
    delete_range = _failing_over("delete_range", retry=False)
    transaction = _failing_over("transaction", retry=False)
    lease = _failing_over("lease", retry=False)
    revoke_lease = _failing_over("revoke_lease", retry=False)
    watch = _failing_over("watch", retry=False)
    watch_once = _failing_over("watch_once", retry=False)


@contextlib.asynccontextmanager
async def _rpc_errors() -> AsyncIterator[None]:
    """aetcd's translation of a raw gRPC error (for the calls we make ourselves)."""
    try:
        yield
    except rpc.AioRpcError as exc:
        aetcd.exceptions._handle_exception(exc)


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"


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

    def history(self, model: str) -> str:
        """The prefix of one model's history entries (keys sort in time order)."""
        return f"{self.root}/history/{model}/"

    @property
    def removals(self) -> str:
        return f"{self.root}/removals/"

    def removal(self, model: str, version: str) -> str:
        return f"{self.removals}{model}/{version}"

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

    @property
    def starts(self) -> str:
        return f"{self.root}/starts/"

    @property
    def apikeys(self) -> str:
        return f"{self.root}/apikeys/"

    @property
    def jointokens(self) -> str:
        """``/<ns>/jointokens/<sha256 of a join token's secret>``: JoinTokenRecord (inferq agent token create)."""
        return f"{self.root}/jointokens/"

    @property
    def agents(self) -> str:
        """``/<ns>/agents/<node>``: AgentRecord, the node credential a join gave out (inferq agent revoke)."""
        return f"{self.root}/agents/"

    @property
    def brokerusers(self) -> str:
        return f"{self.root}/brokerusers/"

    def brokeruser(self, user: str) -> str:
        return f"{self.brokerusers}{user}"

    @property
    def meters(self) -> str:
        return f"{self.root}/meters/"

    def meter(self, tenant: str) -> str:
        return f"{self.meters}{tenant}"


async def get_json_prefix(client: aetcd.Client, prefix: str, timeout: float) -> dict[str, Any]:
    """Every key under ``prefix`` decoded as JSON, keyed by the rest of the key (undecodable values are skipped)."""
    async with translated(f"reading {prefix}"):
        result = await asyncio.wait_for(client.get_prefix(prefix.encode()), timeout)
    out = {}
    for kv in result:
        try:
            out[kv.key.decode()[len(prefix):]] = json.loads(kv.value)
        except ValueError:
            continue
    return out


async def get_records(client: aetcd.Client, prefix: str, from_json: Callable[[bytes], R], timeout: float) -> dict[str, R]:
    """Every record under ``prefix``, keyed by the rest of the key; a malformed one is logged and skipped."""
    async with translated(f"reading {prefix}"):
        result = await asyncio.wait_for(client.get_prefix(prefix.encode()), timeout)
    out: dict[str, R] = {}
    for kv in result:
        key = kv.key.decode()
        try:
            out[key[len(prefix):]] = from_json(kv.value)
        except CodecError as exc:
            log.warning("ignoring %s: %s", key, exc)
    return out


async def follow(client: aetcd.Client, prefix: str, on_change: Callable[[str | None], None], timeout: float,
                 pause_s: float = 1.0) -> None:
    """Call ``on_change`` with the rest of the key on every change under ``prefix``, until cancelled.

    ``on_change(None)`` comes each time the watch is (re)opened: changes made
    while it was down are not replayed, so a cache forgets everything then.
    """
    while True:
        try:
            watch = await asyncio.wait_for(client.watch_prefix(prefix.encode()), timeout)
            on_change(None)
            async for event in watch:
                on_change(event.kv.key.decode()[len(prefix):])
        except ETCD_ERRORS as exc:
            log.debug("watch on %s ended (%r); opening it again", prefix, exc)
        await asyncio.sleep(pause_s)
