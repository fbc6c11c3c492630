"""The edge process: HTTP API, v2 gRPC endpoint, ledger projection, dead-letter reaper, registry API, AMQP router."""

from __future__ import annotations

import asyncio
import logging
import os
import time

from aiohttp import web

from inferq.broker.deadletter import DeadLetterReaper
from inferq.broker.connection import BrokerConnection
from inferq.broker.control import send, worker_key
from inferq.broker.ledger import LedgerWriter
from inferq.broker.recall import StreamRecall
from inferq.broker.tail import LedgerTail, retention_start
from inferq.broker.topology import Topology
from inferq.edge.agent_api import AgentAPI
from inferq.edge.auth import Authenticator, load_keys_file
from inferq.edge.bodies import BodyParser
from inferq.edge.control import ModelControl
from inferq.edge.grpc_server import GrpcEdge
from inferq.edge.group import PID_HEADER
from inferq.edge.http import EdgeAPI, webhook_body
from inferq.edge.idempotency import IdempotencyStore
from inferq.edge.inventory import Inventory
from inferq.edge.jobs import JobService
from inferq.edge.metrics import EdgeMetrics
from inferq.edge.models import ModelDirectory
from inferq.edge.overview import Overview
from inferq.edge.health import VersionHealth
from inferq.edge.projection import JobProjection, JobState
from inferq.edge.results import ResultReader
from inferq.edge.registry_api import RegistryAPI
from inferq.edge.router import UnpinnedRouter
from inferq.edge.routing import Routing
from inferq.edge.spans import open_job_spans
from inferq.edge.shadow import ShadowMirror, ShadowTracker
from inferq.edge.serving import Serving
from inferq.edge.stats import InferenceStats
from inferq.edge.ui import StatusPage
from inferq.edge.v2_routes import V2Routes
from inferq.edge.webhook_sender import WebhookSender
from inferq.edge.webhooks import WebhookTrigger
from inferq.runtime.actor import Actor
from inferq.runtime.artifacts import open_store
from inferq.runtime.coordination import follow, keys, open_etcd
from inferq.runtime.loader import store_options
from inferq.runtime.registry import Registry
from inferq.runtime.signing import TenantSecrets
from inferq.runtime.tenancy import Tenancy
from inferq.settings import Settings

log = logging.getLogger("inferq.edge")
PID = str(os.getpid())

CATCH_UP_TIMEOUT_S = 120.0


class EdgeServer(Actor):
    """Serves HTTP once its projection has caught up with the ledger."""

    def __init__(self, settings: Settings, member: int | None = None) -> None:
        where = f"{settings.edge.host}:{settings.edge.port}"
        super().__init__(f"edge:{where}" if member is None else f"edge:{where}#{member}")
        self.settings = settings
        self.member = member  # one of an edge group (edge/group.py): its ports are shared with SO_REUSEPORT
        self.topology = Topology(settings.namespace, settings.broker.replicas)
        self.stats = InferenceStats()
        self.metrics = EdgeMetrics()  # fed during the ledger replay too: counters cover the retention window
        self.spans = open_job_spans(settings.metrics.otlp_endpoint)
        self.projection = JobProjection(settings.edge.max_jobs_in_memory, settings.jobs.ttl_s, self._on_final,
                                        settings.edge.max_projection_bytes, settings.jobs.inline_result_bytes)
        self.shadow_stats = ShadowTracker(self.projection.get)
        self._connection: BrokerConnection | None = None
        self._tail: LedgerTail | None = None
        self._runner: web.AppRunner | None = None
        self.port: int | None = None
        self._secrets: TenantSecrets | None = None

    async def on_start(self) -> None:
        s = self.settings
        self._connection = connection = await self.own(BrokerConnection.open(s.broker, self.name))
        await self.topology.declare_shared(connection.publisher, s.jobs)
        ledger = await self.own(LedgerWriter.open(connection, self.topology.ledger))
        cancels = await self.own(LedgerWriter.open(connection, self.topology.cancels))
        etcd = open_etcd(s.etcd)
        self.on_stop(etcd.close)
        tenancy = await self.own(Tenancy.open(s, etcd))
        await self.own(DeadLetterReaper.open(connection, self.topology.dead, ledger, self.topology.model_queue_prefix,
                                             tenancy.identify))
        directory = ModelDirectory(etcd, s.namespace, s.etcd.timeout_s)
        await directory.refresh()
        self.spawn(directory.refresh_forever(), "model-refresh")
        health = VersionHealth(etcd, s.namespace, s.etcd.timeout_s)
        await health.refresh()
        self.spawn(health.refresh_forever(), "worker-health")
        webhooks = await self._open_webhooks(connection, etcd, ledger)
        # Last, once everything else is open: the replay keeps the loop busy. The retention
        # window only, never the stream's whole history (segments can hold more).
        self._tail = tail = await self.own(
            LedgerTail.open(connection, self.topology.ledger, self.projection.apply, retention_start(s.jobs.ttl_s),
                            prefetch=s.edge.ledger_prefetch, with_offset=True))
        await self._catch_up(tail)
        if self.spans is not None:  # jobs from now on; the replayed ones were exported when they finished
            self.spans.live = True
            self.on_stop(lambda: asyncio.to_thread(self.spans.shutdown))
        idempotency = IdempotencyStore(etcd, s.namespace, s.jobs.ttl_s, s.etcd.timeout_s,
                                       stale_s=2 * s.broker.publish_timeout_s + s.etcd.timeout_s)
        routing, shadows = Routing(directory, health), ShadowMirror(connection, self.topology, ledger)
        results = ResultReader(StreamRecall(connection, self.topology.ledger, s.broker.publish_timeout_s), s.edge.result_cache_bytes)
        self.on_stop(results.aclose)
        self.projection.on_held_out = results.keep  # a waited-on large result is answered without a read back
        service = JobService(connection, self.topology, directory, self.projection, tail, ledger, cancels, s.jobs.ttl_s,
                             idempotency, routing, shadows, results)
        consuming = await self.own(BrokerConnection.open(s.broker, f"{self.name}:router"))
        await self.own(UnpinnedRouter.open(connection, consuming, self.topology, directory, routing, ledger, shadows))
        auth = Authenticator(s.edge.auth, load_keys_file(s.edge.api_keys_file), etcd, s.namespace, s.etcd.timeout_s,
                             s.edge.rate_per_s, s.edge.burst)
        if s.edge.auth:  # a revoked key (inferq tenant delete, apikey rotate) stops working at once
            self.spawn(follow(etcd, keys(s.namespace).apikeys, auth.forget, s.etcd.timeout_s), "apikey-follow")
        store = open_store(s.registry.store, s.model_repository, store_options(s))
        registry = RegistryAPI(Registry(etcd, s.namespace, s.etcd.timeout_s, store), directory, health, self.shadow_stats,
                               connection, self.topology, s, s.edge.auth)
        inventory = Inventory(etcd, connection, self.topology, s.etcd.timeout_s)
        serving = Serving(service, inventory, ModelControl(etcd, s.namespace, s.etcd.timeout_s), self.stats,
                          s.edge.sync_timeout_s, self.is_ready)
        if s.edge.grpc_port:
            await self.own(GrpcEdge.open(serving, auth, s.edge.host, s.edge.grpc_port, s.edge.max_body_bytes,
                                         shared=self.member is not None))
        overview = Overview(directory, inventory, self.projection, s.metrics.refresh_s)
        await overview.refresh()
        self.spawn(overview.refresh_forever(), "overview-refresh")
        self.spawn(webhooks.count_pending_forever(s.metrics.refresh_s), "webhook-pending")
        self.metrics.serve(overview, self.projection, registry, webhooks, results_read=lambda: service.results_read)
        bodies = BodyParser()  # one helper process for the large bodies of /v1 and /v2
        self.on_stop(bodies.aclose)
        app = EdgeAPI(service, inventory, s.edge, auth, registry, AgentAPI(s, etcd), self.metrics, overview, s.webhooks,
                      self._webhook_secrets, bodies).app()
        V2Routes(serving, s.edge, bodies).register(app)
        async def drain_worker(worker_id: str) -> None:
            await send(connection, self.topology.control, worker_key(worker_id), {"command": "drain"})

        StatusPage(overview, self.projection, self.is_ready, drain_worker, s.edge.auth, service.cancel).register(app)
        if self.member is not None:
            app.on_response_prepare.append(_pid_header)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=5.0)
        await self._runner.setup()
        # A group's members share the port: the kernel hands each new connection to one of them.
        site = web.TCPSite(self._runner, s.edge.host, s.edge.port, reuse_address=True, reuse_port=self.member is not None)
        await site.start()
        self.port = self._runner.addresses[0][1]
        member = "" if self.member is None else f", member {self.member} of an edge group, pid {PID}"
        log.info("edge listening on http://%s:%s (%d jobs in the projection%s)", s.edge.host, self.port, len(self.projection), member)

    async def _open_webhooks(self, connection: BrokerConnection, etcd: object, ledger: LedgerWriter) -> WebhookSender:
        """The trigger (hooked on the projection before its replay) and this edge's webhook sender."""
        s = self.settings
        self._secrets = TenantSecrets(etcd, s.namespace, s.etcd.timeout_s)
        trigger = WebhookTrigger(etcd, s.namespace, s.jobs.ttl_s, s.etcd.timeout_s, connection, self.topology.webhooks,
                                 lambda state: webhook_body(state, s.webhooks.max_body_bytes), s.webhooks.claim_s)
        consuming = await self.own(BrokerConnection.open(s.broker, f"{self.name}:webhooks"))
        sender = await self.own(WebhookSender.open(connection, consuming, self.topology, s.webhooks, ledger,
                                                   self._webhook_secrets))
        self.projection.on_change = trigger.changed
        self.spawn(trigger.run(), "webhook-trigger")
        return sender

    async def _webhook_secrets(self, tenant: str | None) -> list[str]:
        """A tenant's own secrets (both during a rotation) when it has some, else ``webhooks.secret``."""
        if tenant is not None and self._secrets is not None:
            record = await self._secrets.get(tenant)
            if record is not None:
                return record.signing(time.time())
        secret = self.settings.webhooks.secret
        return [secret] if secret else []

    async def _catch_up(self, tail: LedgerTail) -> None:
        try:
            await asyncio.wait_for(tail.wait_caught_up(), CATCH_UP_TIMEOUT_S)
        except TimeoutError:
            log.warning("still reading the ledger after %.0f s; serving, but not ready until caught up", CATCH_UP_TIMEOUT_S)

    def _on_final(self, state: JobState) -> None:
        self.stats.record(state)
        self.metrics.record(state)
        if self.spans is not None:
            self.spans.record(state)
        self.shadow_stats.record(state)

    def is_ready(self) -> bool:
        """Ready: connected to the broker and caught up with the ledger (after a start or a reconnect)."""
        connected = self._connection is not None and self._connection.connected
        return connected and self._tail is not None and self._tail.caught_up

    async def on_drain(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


async def _pid_header(request: web.Request, response: web.StreamResponse) -> None:
    """Which member of an edge group answered (a client, a test or a load balancer log can tell them apart)."""
    response.headers[PID_HEADER] = PID
