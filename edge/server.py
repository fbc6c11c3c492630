"""The edge process: HTTP API, ledger projection, dead-letter reaper."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

from actors.deadletter import DeadLetterReaper
from broker.connection import BrokerConnection
from broker.ledger import LedgerTail, LedgerWriter
from broker.topology import Topology
from edge.auth import Authenticator, load_keys_file
from edge.http import EdgeAPI
from edge.inventory import Inventory
from edge.jobs import JobService
from edge.models import ModelDirectory
from edge.projection import JobProjection
from runtime.actor import Actor
from runtime.coordination import open_etcd
from runtime.errors import BrokerError
from runtime.settings import Settings

log = logging.getLogger("inferq.edge")

CATCH_UP_TIMEOUT_S = 120.0


class EdgeServer(Actor):
    """Serves HTTP once its projection has caught up with the ledger."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(f"edge:{settings.edge.host}:{settings.edge.port}")
        self.settings = settings
        self.topology = Topology(settings.namespace)
        self.projection = JobProjection(settings.edge.max_jobs_in_memory, settings.jobs.ttl_s)
        self._resources: list[Any] = []
        self._connection: BrokerConnection | None = None
        self._runner: web.AppRunner | None = None
        self._caught_up = False
        self.port: int | None = None

    async def on_start(self) -> None:
        s = self.settings
        self._connection = await BrokerConnection.open(s.broker, self.name)
        await self.topology.declare_shared(self._connection.publisher, s.jobs.ttl_s)
        ledger = await self._own(LedgerWriter(self._connection, self.topology.ledger).__aenter__())
        cancels = await self._own(LedgerWriter(self._connection, self.topology.cancels).__aenter__())
        tail = await self._own(LedgerTail.start(self._connection, self.topology.ledger, self.projection.apply))
        await self._own(DeadLetterReaper.start(self._connection, self.topology.dead, ledger, self.topology.model_queue_prefix))
        etcd = open_etcd(s.etcd)
        self._resources.append(_EtcdCloser(etcd))
        directory = ModelDirectory(etcd, s.namespace, s.etcd.timeout_s)
        await directory.refresh()
        self.spawn(directory.refresh_forever(), "model-refresh")
        await self._catch_up(tail)
        service = JobService(self._connection, self.topology, directory, self.projection, tail, ledger, cancels, s.jobs.ttl_s)
        auth = Authenticator(s.edge.auth, load_keys_file(s.edge.api_keys_file), etcd, s.namespace, s.etcd.timeout_s,
                             s.edge.rate_per_s, s.edge.burst)
        api = EdgeAPI(service, Inventory(etcd, self._connection, self.topology, s.etcd.timeout_s), s.edge, self.is_ready, auth)
        self._runner = web.AppRunner(api.app(), access_log=None, shutdown_timeout=5.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, s.edge.host, s.edge.port, reuse_address=True)
        await site.start()
        self.port = self._runner.addresses[0][1]
        log.info("edge listening on http://%s:%s (%d jobs in the projection)", s.edge.host, self.port, len(self.projection))

    async def _own(self, resource: Any) -> Any:
        resource = await resource if asyncio.iscoroutine(resource) else resource
        self._resources.append(resource)
        return resource

    async def _catch_up(self, tail: LedgerTail) -> None:
        try:
            await asyncio.wait_for(tail.sync(), CATCH_UP_TIMEOUT_S)
            self._caught_up = True
        except (BrokerError, TimeoutError) as exc:
            log.warning("ledger replay not confirmed (%r); serving what is known so far", exc)
            self._caught_up = True

    def is_ready(self) -> bool:
        """Ready: replayed the ledger and connected to the broker."""
        return self._caught_up and self._connection is not None and self._connection.connected

    async def on_drain(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def on_close(self) -> None:
        for resource in reversed(self._resources):
            await resource.aclose()
        self._resources.clear()
        if self._connection is not None:
            await self._connection.aclose()


class _EtcdCloser:
    def __init__(self, client: Any) -> None:
        self._client = client

    async def aclose(self) -> None:
        await self._client.close()
