"""Tenant isolation over AMQP with auth on, on the real RabbitMQ (management API on), etcd, workers and edges.

Every tenant here is made by ``inferq tenant create`` (its library call or
the command), with a unique name and a broker user of its own, and is deleted
afterwards with its broker user; the guest user is never changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import aiohttp
import aiormq
import numpy as np
import pytest

from inferq.broker.admin import BrokerAdmin
from inferq.broker.codec import unpackb
from inferq.broker.connection import BrokerConnection
from inferq.broker.identity import reply_prefix
from inferq.broker.tail import LedgerTail
from inferq.broker.messages import TENANT_HEADER, TERMINAL, JobEvent, JobRequest
from inferq.broker.topology import Topology
from inferq.client.amqp import AmqpClient
from inferq.errors import NotFound
from inferq.settings import Settings
from inferq.tenants import NewTenant, create_tenant, delete_tenant, ensure_service_user
from tests.conftest import sample
from tests.test_edge import v2_input
from tests.support import ROOT, settings_env, wait_until

AUTH = {"INFERQ_EDGE_AUTH": "true"}
REFUSED = (aiormq.exceptions.ChannelAccessRefused, aio_pika.exceptions.ChannelClosed)


@pytest.fixture
async def tenants(synced: Settings) -> AsyncIterator[Callable[..., Any]]:
    """Make tenants with AMQP access (unique names); each is deleted, broker user included, afterwards."""
    made: list[str] = []

    async def make(prefix: str, rate: float = 0.0, burst: int = 0) -> NewTenant:
        name = f"{prefix}-{uuid.uuid4().hex[:6]}"
        made.append(name)
        return await create_tenant(synced, name, rate, burst, amqp=True)

    yield make
    for name in made:
        with contextlib.suppress(NotFound):
            await delete_tenant(synced, name)


class Ledger:
    """Every event of the namespace's ledger stream, read from its start, by job id."""

    def __init__(self) -> None:
        self.events: dict[str, list[JobEvent]] = {}

    def apply(self, events: list[JobEvent]) -> None:
        for event in events:
            self.events.setdefault(event.job_id, []).append(event)

    def final(self, job_id: str) -> list[JobEvent]:
        return [e for e in self.events.get(job_id, []) if e.status in TERMINAL]

    async def finals(self, job_ids: list[str], timeout: float) -> dict[str, JobEvent]:
        """The final event of each job once all have one; fails unless each has exactly one final state."""
        await wait_until(lambda: all(self.final(j) for j in job_ids), timeout, f"{len(job_ids)} jobs in the ledger")
        for job_id in job_ids:
            assert len({e.status for e in self.final(job_id)}) == 1, (job_id, self.final(job_id))
        return {j: self.final(j)[0] for j in job_ids}


@pytest.fixture
async def ledger(synced: Settings) -> AsyncIterator[Ledger]:
    found = Ledger()
    async with await BrokerConnection.open(synced.broker, "test-ledger") as connection:
        tail = await LedgerTail.open(connection, Topology(synced.namespace).ledger, found.apply)
        yield found
        await tail.aclose()


class TenantClient:
    """A tenant's own AMQP connection: publishes as its broker user and reads one reply queue of its own."""

    def __init__(self, connection: aio_pika.abc.AbstractConnection, tenant: NewTenant, namespace: str) -> None:
        self.connection = connection
        self.tenant = tenant
        self.namespace = namespace
        self.reply_queue = ""
        self.replies: list[dict[str, Any]] = []
        self.closed_by: list[BaseException | None] = []  # why the connection closed, once it has
        connection.close_callbacks.add(lambda _sender, exc=None: self.closed_by.append(exc))

    @classmethod
    async def open(cls, tenant: NewTenant, namespace: str) -> TenantClient:
        self = cls(await aio_pika.connect(tenant.amqp_url, timeout=10), tenant, namespace)
        channel = await self.connection.channel()
        queue = await channel.declare_queue(f"{reply_prefix(namespace, tenant.name)}{uuid.uuid4().hex}", exclusive=True)
        self.reply_queue = queue.name
        await queue.consume(self._on_reply, no_ack=True)
        return self

    async def _on_reply(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        self.replies.append(unpackb(message.body))

    def reply(self, job_id: str) -> dict[str, Any] | None:
        return next((r for r in self.replies if r["job_id"] == job_id), None)

    async def submit(self, x: np.ndarray, model: str = "mlp", *, reply_to: str | None = "", user_id: str | None = "",
                     headers: dict[str, Any] | None = None, ttl_s: float | None = None) -> str:
        """Publish one job (confirmed) as this tenant; ``user_id``/``reply_to`` default to its own, None leaves them out."""
        job_id = uuid.uuid4().hex
        request = JobRequest(job_id, {"x": x}, reply_to=self.reply_queue if reply_to == "" else reply_to, correlation_id=job_id,
                             ttl_s=ttl_s)
        message = request.to_message(user_id=self.tenant.amqp_user if user_id == "" else user_id)
        message.headers.update(headers or {})
        channel = await self.connection.channel(publisher_confirms=True)
        try:
            exchange = await channel.get_exchange(f"{self.namespace}.requests", ensure=False)
            await exchange.publish(message, model, mandatory=True)
        finally:
            if not channel.is_closed:
                await channel.close()
        return job_id

    async def aclose(self) -> None:
        if not self.connection.is_closed:
            await self.connection.close()


@pytest.fixture
async def connect(synced: Settings) -> AsyncIterator[Callable[..., Any]]:
    opened: list[TenantClient] = []

    async def open_as(tenant: NewTenant) -> TenantClient:
        opened.append(await TenantClient.open(tenant, synced.namespace))
        return opened[-1]

    yield open_as
    for client in opened:
        with contextlib.suppress(Exception):
            await client.aclose()


async def ignore(message: aio_pika.abc.AbstractIncomingMessage) -> None:
    """A consumer that is never meant to get anything."""


def bearer(tenant: NewTenant | str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tenant if isinstance(tenant, str) else tenant.api_key}"}


async def job_doc(http: aiohttp.ClientSession, edge: Any, key: NewTenant | str, job_id: str) -> tuple[int, Any]:
    async with http.get(f"{edge.url}/v1/jobs/{job_id}", headers=bearer(key)) as resp:
        return resp.status, await resp.json()


async def final_doc(http: aiohttp.ClientSession, edge: Any, key: NewTenant, job_id: str, timeout: float = 30) -> dict[str, Any]:
    """The job's document once it is final (an AMQP job is unknown to edges until a worker takes it)."""
    async def final() -> dict[str, Any] | None:
        status, doc = await job_doc(http, edge, key, job_id)
        return doc if status == 200 and doc["status"] in TERMINAL else None
    return await wait_until(final, timeout, f"job {job_id} to be final for tenant {key.name}", interval=0.2)


async def test_a_tenants_broker_user_cannot_read_the_ledger_or_reach_model_queues_or_the_control_exchange(synced, tenants) -> None:
    acme = await tenants("acme")
    topology = Topology(synced.namespace)
    connection = await aio_pika.connect(acme.amqp_url, timeout=10)
    try:
        async def consume(stream: str) -> None:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=10)
            queue = await channel.declare_queue(stream, passive=True)
            await queue.consume(ignore, arguments={"x-stream-offset": "first"})

        async def publish(exchange: str, routing_key: str) -> None:
            channel = await connection.channel(publisher_confirms=True)
            target = channel.default_exchange if exchange == "" else await channel.get_exchange(exchange, ensure=False)
            await target.publish(aio_pika.Message(b"{}", user_id=acme.amqp_user), routing_key)

        attempts = {
            "consume the ledger": lambda: consume(topology.ledger),
            "consume the cancel stream": lambda: consume(topology.cancels),
            "consume a model queue": lambda: consume(topology.model_queue("mlp", "1")),
            "publish to a model queue": lambda: publish("", topology.model_queue("mlp", "1")),
            "publish to the control exchange": lambda: publish(topology.control, "worker.anyone"),
            "publish a routing key that is no model's": lambda: publish(topology.requests, "mlp.1.retry"),
        }
        for what, attempt in attempts.items():
            with pytest.raises(REFUSED) as refused:
                await asyncio.wait_for(attempt(), 10)
            assert "ACCESS_REFUSED" in str(refused.value), f"{what}: {refused.value!r}"
    finally:
        await connection.close()


async def test_a_spoofed_tenant_header_is_ignored_a_spoofed_user_id_refused_and_a_job_without_one_fails(
        synced, tenants, connect, ledger, spawn_worker, spawn_edge, http) -> None:
    acme, evil = await tenants("acme"), await tenants("evil")
    await spawn_worker("mlp", env=AUTH)
    edge = await spawn_edge(env=AUTH)
    client = await connect(evil)

    posing = await client.submit(sample("mlp"), headers={TENANT_HEADER: acme.name})
    await wait_until(lambda: client.reply(posing), 30, "the reply on evil's own queue")
    assert client.reply(posing)["status"] == "succeeded"
    assert (await job_doc(http, edge, acme, posing))[0] == 404, "acme's key does not see a job that only claims to be acme's"
    assert (await final_doc(http, edge, evil, posing))["status"] == "succeeded", "the job is evil's, the real publisher's"

    # A dead letter is judged as a job is: this one expires in a queue no worker takes from (cnn).
    expired = await client.submit(sample("cnn"), "cnn", headers={TENANT_HEADER: acme.name}, ttl_s=0.2)
    assert (await final_doc(http, edge, evil, expired))["status"] == "expired"
    assert (await job_doc(http, edge, acme, expired))[0] == 404
    await wait_until(lambda: client.reply(expired), 10, "the dead letter's reply on evil's queue")

    with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed, match="user_id property set to"):
        await client.submit(sample("mlp"), user_id=acme.amqp_user)

    anonymous = await client.submit(sample("mlp"), user_id=None, headers={TENANT_HEADER: acme.name})
    final = (await ledger.finals([anonymous], 30))[anonymous]
    assert final.status == "failed" and final.error["code"] == "unauthenticated" and final.tenant is None
    assert (await job_doc(http, edge, acme, anonymous))[0] == 404
    later = await client.submit(sample("mlp"))  # replies go out in order: once this one is here, any other would be
    await wait_until(lambda: client.reply(later), 30, "the reply to a later job")
    assert client.reply(anonymous) is None, "a job nobody can be held to gets no reply"


async def test_acmes_amqp_job_is_pollable_with_acmes_key_and_unknown_to_evils(
        synced, tenants, spawn_worker, spawn_edge, http, reference) -> None:
    acme, evil = await tenants("acme"), await tenants("evil")
    await spawn_worker("mlp", env=AUTH)
    edge = await spawn_edge(env=AUTH)
    x = sample("mlp", seed=3)
    # The SDK as a tenant uses it: its user_id is the URL's user, its reply queue under the tenant's prefix.
    async with await AmqpClient.open(acme.amqp_url, namespace=synced.namespace, tenant=acme.name, edge_url=edge.url,
                                     api_key=acme.api_key) as client:
        job = await client.submit("mlp", {"x": x})
        outputs = await job.result(timeout=30)
        np.testing.assert_allclose(outputs["probs"], reference("mlp", x), rtol=1e-5)
        assert client.reply_queue.startswith(reply_prefix(synced.namespace, acme.name))
    assert (await final_doc(http, edge, acme, job.id))["status"] == "succeeded"
    assert (await job_doc(http, edge, evil, job.id))[0] == 404


async def test_amqp_metering_holds_under_a_burst_shared_by_two_workers_and_loses_nothing(
        synced, tenants, connect, ledger, spawn_worker) -> None:
    rate, burst, jobs = 1.0, 4, 24
    metered = await tenants("burst", rate=rate, burst=burst)
    await spawn_worker("mlp", env=AUTH)
    await spawn_worker("mlp", env=AUTH)
    client = await connect(metered)
    started = time.monotonic()
    ids = await asyncio.gather(*(client.submit(sample("mlp", seed=i)) for i in range(jobs)))
    finals = await ledger.finals(list(ids), 60)
    elapsed = time.monotonic() - started

    statuses = [e.status for e in finals.values()]
    ran = statuses.count("succeeded")
    limited = [e for e in finals.values() if e.status == "failed" and e.error["code"] == "rate_limited"]
    assert ran + len(limited) == jobs, statuses
    assert burst <= ran <= burst + int(rate * elapsed) + 1, (ran, elapsed)
    assert all(metered.name in e.error["message"] and e.tenant == metered.name for e in limited)
    workers = {e.worker for job_id in ids for e in ledger.events[job_id] if e.worker}
    assert len(workers) == 2, "both workers took jobs, from one bucket"
    await wait_until(lambda: all(client.reply(j) for j in ids), 30, "a reply for every job")
    assert {client.reply(j)["status"] for j in ids} == {"succeeded", "failed"}


async def test_a_reply_to_naming_another_tenants_queue_fails_and_sends_nothing_there(
        synced, tenants, connect, spawn_worker, spawn_edge, http) -> None:
    acme, evil = await tenants("acme"), await tenants("evil")
    await spawn_worker("mlp", env=AUTH)
    edge = await spawn_edge(env=AUTH)
    victim, attacker = await connect(acme), await connect(evil)

    stolen = await attacker.submit(sample("mlp"), reply_to=victim.reply_queue)
    doc = await final_doc(http, edge, evil, stolen)
    assert doc["status"] == "failed" and doc["error"]["code"] == "forbidden", doc
    assert victim.reply_queue in doc["error"]["message"]
    # One worker sends every reply on one channel, in order: had it answered the forbidden job, that reply
    # would reach acme's queue before the reply to acme's own later job.
    own = await victim.submit(sample("mlp"))
    await wait_until(lambda: victim.reply(own), 30, "acme's own reply")
    assert [r["job_id"] for r in victim.replies] == [own]


async def inferq(settings: Settings, *args: str) -> str:
    """Run the ``inferq`` command; its output (it must succeed)."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "inferq.cli", *args, cwd=ROOT, env=settings_env(settings),
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, out.decode()
    return out.decode()


async def test_tenant_delete_cuts_off_http_and_amqp_at_once_and_rotate_replaces_a_key(
        synced, connect, ledger, spawn_worker, spawn_edge, http) -> None:
    name = f"gone-{uuid.uuid4().hex[:6]}"
    try:
        made = dict(line.split(": ", 1) for line in (await inferq(synced, "tenant", "create", name, "--amqp")).splitlines()
                    if ": " in line)
        tenant = NewTenant(name, made["api_key"], made["amqp_user"], made["amqp_password"], made["amqp_url"])
        edge = await spawn_edge(env=AUTH)

        async def status(key: str) -> int:
            async with http.get(f"{edge.url}/v1/models", headers=bearer(key)) as resp:
                return resp.status

        assert await status(tenant.api_key) == 200
        rotated = (await inferq(synced, "apikey", "rotate", "--tenant", name)).split()[-1]
        await wait_until(async_equals(status, tenant.api_key, 401), 2, "the old key to stop working")
        assert await status(rotated) == 200

        client = await connect(tenant)
        queued = await client.submit(sample("mlp"))  # no worker yet: it waits in the queue
        await inferq(synced, "tenant", "delete", name)
        await wait_until(async_equals(status, rotated, 401), 2, "the key to stop working")
        await wait_until(lambda: client.closed_by, 2, "RabbitMQ to close the tenant's connection")
        assert "CONNECTION_FORCED" in repr(client.closed_by[0])
        with pytest.raises(aio_pika.exceptions.ProbableAuthenticationError):
            await aio_pika.connect(tenant.amqp_url, timeout=10)
        assert name not in await inferq(synced, "tenant", "list")

        await spawn_worker("mlp", env=AUTH)
        final = (await ledger.finals([queued], 30))[queued]
        assert final.status == "failed" and final.error["code"] == "unauthenticated", "its queued jobs do not run either"
    finally:
        with contextlib.suppress(NotFound):
            await delete_tenant(synced, name)


def async_equals(probe: Callable[[str], Any], arg: str, expected: int) -> Callable[[], Any]:
    async def check() -> bool:
        return await probe(arg) == expected
    return check


@pytest.fixture
async def service_user(synced: Settings) -> AsyncIterator[Settings]:
    """A service user of this test's own, made by ``inferq tenant service-user``: the settings that use it."""
    user, password = f"{synced.namespace}-svc-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
    broker = urlsplit(synced.broker.url)
    url = f"amqp://{user}:{password}@{broker.hostname}:{broker.port or 5672}/"
    own = dataclasses.replace(synced, broker=dataclasses.replace(synced.broker, url=url))
    assert await ensure_service_user(own) == user
    yield own
    async with await BrokerAdmin.open(synced.tenancy.management_url, "/", 10) as admin:
        await admin.delete_user(user)


async def test_inferqs_processes_run_as_a_service_user_with_only_its_permissions(
        synced, service_user, tenants, connect, spawn_worker, spawn_edge, http) -> None:
    acme = await tenants("acme")
    await inferq(service_user, "models", "sync")  # declares (and binds) every queue again: the same rights as at first
    env = {**AUTH, "INFERQ_BROKER_URL": service_user.broker.url}
    await spawn_worker("mlp", env=env)
    edge = await spawn_edge(env=env)
    async with http.post(f"{edge.url}/v1/models/mlp/jobs?wait=30", json={"inputs": [v2_input(sample("mlp"))]},
                         headers=bearer(acme)) as resp:
        assert resp.status == 200 and (await resp.json())["status"] == "succeeded", "the edge's job, with its tenant header"
    client = await connect(acme)
    job_id = await client.submit(sample("mlp"))
    await wait_until(lambda: client.reply(job_id), 30, "the reply to a tenant's AMQP job")
    assert client.reply(job_id)["status"] == "succeeded"
    assert (await final_doc(http, edge, acme, job_id))["status"] == "succeeded"


async def test_the_readme_tenant_example_runs_as_a_tenant_user(synced, tenants, spawn_worker) -> None:
    acme = await tenants("acme")
    await spawn_worker("mlp", env=AUTH)
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Tenants"):readme.index("## Security")]
    (block,) = re.findall(r"```python\n(.*?)```", section, re.S)
    code = (block.replace('"amqp://inferq-acme:PASSWORD@127.0.0.1:5672/"', repr(acme.amqp_url))
            .replace('NAMESPACE, TENANT = "inferq", "acme"', f"NAMESPACE, TENANT = {synced.namespace!r}, {acme.name!r}"))
    assert repr(acme.amqp_url) in code and f"TENANT = {synced.namespace!r}, {acme.name!r}" in code, "the example's settings moved"
    done = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[1:] == ["succeeded", "None"], done.stdout
