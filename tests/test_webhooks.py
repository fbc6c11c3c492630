"""Webhooks: signed, retried, durable deliveries to real HTTP receivers on 127.0.0.1, and the SSRF guard."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from standardwebhooks.webhooks import Webhook

from inferq.broker.codec import packb
from inferq.client.amqp import AmqpClient
from inferq.edge.auth import create_key
from inferq.runtime.coordination import keys, open_etcd
from inferq.tenants import webhook_secret
from tests.conftest import free_port, sample
from tests.support import wait_until
from tests.test_edge import poll, v2_input

pytestmark = pytest.mark.features  # a feature suite that starts many processes: make test-features (CI runs it after make test)

SECRET = "whsec_" + base64.b64encode(b"inferq-test-webhook-secret-32by!").decode()
ALLOWED = {"INFERQ_WEBHOOKS_SECRET": SECRET, "INFERQ_WEBHOOKS_ALLOW_HOSTS": "127.0.0.1"}


@dataclass
class Received:
    """One request a receiver got, and what it answered."""

    headers: dict[str, str]
    body: bytes
    answered: int

    @property
    def doc(self) -> dict:
        return json.loads(self.body)


@dataclass
class Receiver:
    """A webhook receiver: answers ``plan`` in order (then 200) and verifies every signature with standardwebhooks."""

    url: str
    plan: list[int] = field(default_factory=list)
    got: list[Received] = field(default_factory=list)
    bad_signatures: int = 0
    secret: str = SECRET

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        try:
            Webhook(self.secret).verify(body, headers)
        except Exception:
            self.bad_signatures += 1
        status = self.plan.pop(0) if self.plan else 200
        self.got.append(Received(headers, body, status))
        return web.Response(status=status)

    def delivered(self, event_id: str) -> list[Received]:
        return [r for r in self.got if r.headers["webhook-id"] == event_id and r.answered == 200]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    port = free_port()
    rx = Receiver(f"http://127.0.0.1:{port}/hook?token=s3cret")
    app = web.Application()
    app.router.add_post("/hook", rx.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield rx
    await runner.cleanup()


async def submit(http, edge, model: str, webhook: str, events: list[str] | None = None, seed: int = 0) -> str:
    body: dict = {"inputs": [v2_input(sample("mlp", seed=seed))], "webhook": webhook}
    if events is not None:
        body["webhook_events_filter"] = events
    async with http.post(f"{edge.url}/v1/models/{model}/jobs", json=body) as resp:
        assert resp.status == 202, await resp.text()
        return (await resp.json())["job_id"]


async def test_a_failing_receiver_gets_every_event_signed_and_retried_until_it_answers(
        spawn_worker, spawn_edge, http, receiver) -> None:
    await spawn_worker("mlp")
    edge = await spawn_edge(env=ALLOWED)
    receiver.plan = [500, 503]  # the first two deliveries fail, whichever event they carry
    job_id = await submit(http, edge, "mlp", receiver.url, ["start", "completed"])
    start, completed = f"msg_{job_id}_start", f"msg_{job_id}_completed"
    await wait_until(lambda: receiver.delivered(start) and receiver.delivered(completed), 30, "both events delivered")
    assert receiver.bad_signatures == 0
    assert {r.headers["webhook-id"] for r in receiver.got} == {start, completed}
    final = receiver.delivered(completed)[0].doc
    assert final["status"] == "succeeded" and final["outputs"] and final["job_id"] == job_id
    assert receiver.delivered(start)[0].doc["status"] == "running"

    async def settled() -> dict | None:
        doc = await poll(http, edge, job_id, wait=0)
        return doc if doc["webhook"]["state"] == "delivered" else None

    doc = await wait_until(settled, 10, "the document to show the delivery")
    assert doc["webhook"]["url"] == receiver.url.replace("token=s3cret", "***")
    assert doc["webhook"]["last_status"] == 200 and doc["webhook"]["attempts"] >= 1
    async with http.get(f"{edge.url}/metrics") as resp:
        metrics = await resp.text()
    assert 'inferq_webhook_deliveries_total{outcome="delivered"} 2.0' in metrics
    assert 'inferq_webhook_deliveries_total{outcome="retried"} 2.0' in metrics
    assert 'inferq_webhook_attempts_bucket{le="+Inf"} 2.0' in metrics


async def test_gone_stops_the_retries_at_once_and_the_document_says_failed(spawn_worker, spawn_edge, http, receiver) -> None:
    await spawn_worker("mlp")
    edge = await spawn_edge(env=ALLOWED)
    receiver.plan = [410]
    job_id = await submit(http, edge, "mlp", receiver.url)

    async def failed() -> dict | None:
        doc = await poll(http, edge, job_id, wait=0)
        return doc if doc.get("webhook", {}).get("state") == "failed" else None

    doc = await wait_until(failed, 30, "the webhook to fail")
    assert doc["webhook"]["last_status"] == 410 and doc["webhook"]["attempts"] == 1
    assert len(receiver.got) == 1


async def test_an_edge_killed_in_mid_backoff_loses_no_delivery_and_the_retry_keeps_its_webhook_id(
        spawn_worker, spawn_edge, http, receiver) -> None:
    await spawn_worker("mlp")
    edge = await spawn_edge(env={**ALLOWED, "INFERQ_METRICS_REFRESH_S": "0.2"})
    receiver.plan = [500, 500]  # after the second failure the delivery waits 4-6 s in RabbitMQ
    job_id = await submit(http, edge, "mlp", receiver.url)
    await wait_until(lambda: len(receiver.got) == 2, 30, "two failed attempts")

    async def pending() -> bool:
        async with http.get(f"{edge.url}/metrics") as resp:
            return "inferq_webhook_pending 1.0\n" in await resp.text()

    await wait_until(pending, 4, "the delivery to wait in a retry queue")
    edge.process.kill()
    await spawn_edge(env=ALLOWED)  # the only webhook sender left
    event_id = f"msg_{job_id}_completed"
    await wait_until(lambda: receiver.delivered(event_id), 30, "the delivery after the restart")
    assert {r.headers["webhook-id"] for r in receiver.got} == {event_id}
    assert receiver.bad_signatures == 0


async def test_amqp_publishers_ask_for_webhooks_with_headers(synced, spawn_worker, spawn_edge, receiver) -> None:
    await spawn_worker("mlp")
    await spawn_edge(env=ALLOWED)
    async with await AmqpClient.open(synced.broker.url, namespace=synced.namespace) as client:
        job = await client.submit("mlp", {"x": sample("mlp")}, webhook=receiver.url, webhook_events_filter=["start"])
        await job.wait(30)
    await wait_until(lambda: receiver.delivered(f"msg_{job.id}_start"), 30, "the AMQP job's webhook")
    assert receiver.delivered(f"msg_{job.id}_start")[0].doc["status"] == "running"
    assert [r.headers["webhook-id"] for r in receiver.got] == [f"msg_{job.id}_start"], "only the events it asked for"


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:9/hook", "http://[::1]:9/hook", "http://169.254.169.254/latest/meta-data/",
    "http://10.1.2.3/hook", "http://192.168.0.1/hook", "http://224.0.0.1/hook", "http://localhost:9/hook",
    "http://[::ffff:127.0.0.1]/hook",
])
async def test_webhooks_to_internal_addresses_are_refused_at_submit(spawn_edge, http, url) -> None:
    edge = await spawn_edge(env={"INFERQ_WEBHOOKS_SECRET": SECRET})
    body = {"inputs": [v2_input(sample("mlp"))], "webhook": url}
    async with http.post(f"{edge.url}/v1/models/mlp/jobs", json=body) as resp:
        assert resp.status == 422
        assert (await resp.json())["error"]["code"] == "webhook_not_allowed"


@pytest.mark.parametrize("body", [
    {"webhook": "ftp://example.com/hook"}, {"webhook": "not a url"}, {"webhook": 42},
    {"webhook": "http://127.0.0.1/hook", "webhook_events_filter": ["finished"]},
    {"webhook_events_filter": ["completed"]},
])
async def test_malformed_webhooks_are_refused_with_422(spawn_edge, http, body) -> None:
    edge = await spawn_edge(env=ALLOWED)
    async with http.post(f"{edge.url}/v1/models/mlp/jobs", json={"inputs": [v2_input(sample("mlp"))], **body}) as resp:
        assert resp.status == 422, await resp.text()
        assert (await resp.json())["error"]["code"] == "invalid_input"


async def test_a_receiver_that_hangs_holds_back_neither_jobs_nor_webhooks_to_other_hosts(
        spawn_worker, spawn_edge, http, receiver) -> None:
    release = asyncio.Event()
    hung: list[str] = []

    async def hang(request: web.Request) -> web.Response:
        hung.append(request.headers["webhook-id"])
        await release.wait()
        return web.Response(status=200)

    port = free_port()
    app = web.Application()
    app.router.add_post("/hook", hang)
    runner = web.AppRunner(app, shutdown_timeout=1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        await spawn_worker("mlp")
        env = {**ALLOWED, "INFERQ_WEBHOOKS_ALLOW_HOSTS": "127.0.0.1,::1,localhost", "INFERQ_WEBHOOKS_TIMEOUT_S": "60",
               "INFERQ_WEBHOOKS_PER_HOST": "2"}
        edge = await spawn_edge(env=env)
        slow = [await submit(http, edge, "mlp", f"http://localhost:{port}/hook", seed=i) for i in range(8)]
        await wait_until(lambda: len(hung) == 2, 30, "the hung receiver to hold its two attempts")
        fast = await submit(http, edge, "mlp", receiver.url)
        await wait_until(lambda: receiver.delivered(f"msg_{fast}_completed"), 15, "the other host's webhook")
        assert [(await poll(http, edge, j))["status"] for j in slow] == ["succeeded"] * len(slow)  # jobs never waited
        assert len(hung) == 2, "the hung host got more attempts at once than webhooks.per_host"
    finally:
        release.set()
        await runner.cleanup()


async def test_a_tenant_s_own_secret_signs_its_webhooks_and_msgpack_bodies_carry_the_fields(
        synced, spawn_worker, spawn_edge, http, receiver) -> None:
    async with open_etcd(synced.etcd) as etcd:
        key = await create_key(etcd, synced.namespace, "acme-hooks", 0, 0, 5)
    receiver.secret = (await webhook_secret(synced, "acme-hooks")).current
    await spawn_worker("mlp")
    edge = await spawn_edge(env={**ALLOWED, "INFERQ_EDGE_AUTH": "true"})
    x = sample("mlp")
    body = packb({"inputs": {"x": {"dtype": "float32", "shape": list(x.shape), "data": x.tobytes()}},
                  "webhook": receiver.url, "webhook_events_filter": ["completed"]})
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/msgpack"}
    async with http.post(f"{edge.url}/v1/models/mlp/jobs", data=body, headers=headers) as resp:
        assert resp.status == 202, await resp.text()
        job_id = (await resp.json())["job_id"]
    await wait_until(lambda: receiver.delivered(f"msg_{job_id}_completed"), 30, "the tenant's webhook")
    assert receiver.bad_signatures == 0, "signed with the tenant's secret, not the deployment's"
    refused = packb({"inputs": {"x": {"dtype": "float32", "shape": list(x.shape), "data": x.tobytes()}},
                     "webhook": "http://10.0.0.1/hook"})
    async with http.post(f"{edge.url}/v1/models/mlp/jobs", data=refused, headers=headers) as resp:
        assert resp.status == 422 and (await resp.json())["error"]["code"] == "webhook_not_allowed"


async def test_an_event_whose_claiming_edge_died_before_queueing_it_is_queued_by_another(
        synced, spawn_worker, spawn_edge, http, receiver) -> None:
    edge = await spawn_edge(env={**ALLOWED, "INFERQ_WEBHOOKS_CLAIM_S": "2"})
    job_id = await submit(http, edge, "slow", receiver.url, ["start"])  # no worker yet: nothing is due
    event_id = f"msg_{job_id}_start"
    async with open_etcd(synced.etcd) as etcd:  # what an edge killed right after its claim leaves behind
        lease = await etcd.lease(6)  # still there when the job starts: the edge must look again, not give up
        await etcd.put(f"{keys(synced.namespace).root}/webhooks/{event_id}".encode(), b"claimed", lease=lease)
    await spawn_worker("slow")
    await wait_until(lambda: receiver.delivered(event_id), 30, "the event the dead edge had claimed")
    assert [r.headers["webhook-id"] for r in receiver.got] == [event_id]


async def test_retries_stop_at_max_age_and_the_document_keeps_the_last_answer(spawn_worker, spawn_edge, http, receiver) -> None:
    await spawn_worker("mlp")
    edge = await spawn_edge(env={**ALLOWED, "INFERQ_WEBHOOKS_MAX_AGE_S": "3"})
    receiver.plan = [500] * 10
    job_id = await submit(http, edge, "mlp", receiver.url)

    async def given_up() -> dict | None:
        doc = await poll(http, edge, job_id, wait=0)
        return doc if doc.get("webhook", {}).get("state") == "failed" else None

    doc = await wait_until(given_up, 30, "the webhook to be given up")
    # 1-1.5 s after the first failure comes the second attempt; the next one (4-6 s later) would be past 3 s.
    assert doc["webhook"]["attempts"] == 2 and doc["webhook"]["last_status"] == 500
    assert doc["webhook"]["last_error"] == "HTTP 500" and len(receiver.got) == 2


async def test_an_edge_without_a_signing_secret_refuses_webhooks(spawn_edge, http) -> None:
    edge = await spawn_edge(env={"INFERQ_WEBHOOKS_ALLOW_HOSTS": "127.0.0.1"})
    body = {"inputs": [v2_input(sample("mlp"))], "webhook": "http://127.0.0.1:9/hook"}
    async with http.post(f"{edge.url}/v1/models/mlp/jobs", json=body) as resp:
        assert resp.status == 422
        assert "signing secret" in (await resp.json())["error"]["message"]
