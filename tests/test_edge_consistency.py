"""Every edge answers from the ledger's order: cancels, expiry, idempotency, reconnects, and bounded costs.

Real edges, a real broker and etcd. The tests run in namespaces of their
own (a lagging ledger full of filler, a 3 s retention) so that no other test
file replays what they write. A fast unit layer covers the rules that decide
outcomes: the projection's retention and expiry, the rate-limited log.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aio_pika
import pytest
from aiohttp.test_utils import make_mocked_request

from inferq.broker.codec import packb
from inferq.broker.connection import BrokerConnection
from inferq.broker.ledger import LedgerWriter
from inferq.broker.messages import (EXPIRED, QUEUED, RUNNING, SUCCEEDED, JobEvent, join_packed_events, pack_event, pack_events,
                                    unpack_events)
from inferq.broker.ratelog import RateLimitedLog
from inferq.broker.tail import MARKER_HEADER, LedgerTail, retention_start
from inferq.broker.topology import Topology
from inferq.edge.auth import Authenticator, create_key
from inferq.edge.projection import JobProjection
from inferq.errors import EventTooLarge
from inferq.runtime.coordination import open_etcd
from inferq.runtime.demo import write_demo_repository
from inferq.runtime.loader import remove_namespace, sync_repository
from inferq.settings import JobSettings, Settings
from tests.conftest import sample
from tests.support import Process, live_workers, wait_until
from tests.test_edge import poll, submit, v2_input

MODEL = "held"  # no worker serves it unless a test starts one: its jobs wait in the queue


# ---------------------------------------------------------------------------------------------- unit layer

def test_a_finished_job_stays_visible_for_the_retention_counted_from_its_last_event() -> None:
    projection = JobProjection(max_jobs=100, ttl_s=10)
    now = time.time()
    projection.apply([JobEvent("late", QUEUED, "m", "1", ts=now - 30), JobEvent("late", SUCCEEDED, "m", "1", ts=now - 2)])
    projection.apply([JobEvent("old", QUEUED, "m", "1", ts=now - 30), JobEvent("old", SUCCEEDED, "m", "1", ts=now - 11)])
    projection.apply([JobEvent("quick", QUEUED, "m", "1", ts=now - 12, ttl_s=3600), JobEvent("quick", SUCCEEDED, "m", "1", ts=now - 11)])
    assert projection.get("late").status == SUCCEEDED
    assert projection.get("old") is None
    assert projection.get("quick") is None, "a finished job's own TTL no longer matters"


def test_a_queued_job_past_its_ttl_is_overdue_and_kept_until_it_is_decided() -> None:
    projection = JobProjection(max_jobs=100, ttl_s=3)
    now = time.time()
    projection.apply([JobEvent("j", QUEUED, "m", "1", ts=now - 5, ttl_s=3)])
    state = projection.get("j")
    assert state is not None and state.expires_at == pytest.approx(now - 2)
    assert state.overdue(now, grace_s=0.5) and not state.overdue(now - 2.2, grace_s=0.5)
    projection.apply([JobEvent("j", RUNNING, "m", "1", ts=now - 1)])
    assert not projection.get("j").overdue(now), "a started job never expires"


def test_the_least_recently_updated_job_is_forgotten_first() -> None:
    projection = JobProjection(max_jobs=2, ttl_s=600)
    projection.apply([JobEvent(j, QUEUED, "m", "1") for j in ("a", "b")])
    projection.apply([JobEvent("a", RUNNING, "m", "1")])
    projection.apply([JobEvent("c", QUEUED, "m", "1")])
    assert projection.get("b") is None and projection.get("a") is not None and projection.get("c") is not None


def test_a_queued_event_carries_the_jobs_ttl_and_a_bad_ttl_spoils_only_its_event() -> None:
    event = JobEvent("j", QUEUED, "m", "1", ttl_s=2.5)
    assert JobEvent.from_wire(event.to_wire()) == event
    good = {"job_id": "k", "status": "queued", "ts": 1.0, "ttl_s": 4, "from_a_newer_writer": 1}
    events, bad = unpack_events(packb([{**good, "job_id": "x", "ttl_s": "soon"}, {**good, "job_id": "y", "ttl_s": -1}, good]))
    assert bad == 2 and [(e.job_id, e.ttl_s) for e in events] == [("k", 4.0)]


@pytest.mark.parametrize("n", [0, 1, 15, 16, 70_000])
def test_events_packed_one_by_one_join_into_the_same_message_as_packed_together(n: int) -> None:
    events = [JobEvent(f"j{i}", QUEUED, ts=1.0) for i in range(n)]
    assert join_packed_events([pack_event(e) for e in events]) == pack_events(events)


def test_a_repeated_warning_is_logged_once_per_interval_with_a_count(caplog: pytest.LogCaptureFixture) -> None:
    clock = [100.0]
    ratelog = RateLimitedLog(logging.getLogger("inferq.test.ratelog"), 60.0, clock=lambda: clock[0])
    with caplog.at_level(logging.WARNING, "inferq.test.ratelog"):
        for _ in range(5413):
            ratelog.warning("could not catch up with the ledger: %s", "TimeoutError()")
        clock[0] += 60
        ratelog.warning("could not catch up with the ledger: %s", "TimeoutError()")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["could not catch up with the ledger: TimeoutError()",
                     "could not catch up with the ledger: TimeoutError() (repeated 5,412 times in the last 60 s)"]


# ---------------------------------------------------------------------------------------------- namespaces

@dataclasses.dataclass(frozen=True)
class Namespace:
    """A namespace of this module's own, with the env that points an edge at it."""

    settings: Settings

    @property
    def topology(self) -> Topology:
        return Topology(self.settings.namespace)

    @property
    def env(self) -> dict[str, str]:
        s = self.settings
        return {"INFERQ_NAMESPACE": s.namespace, "INFERQ_JOBS_TTL_S": repr(s.jobs.ttl_s),
                "INFERQ_MODEL_REPOSITORY": str(s.model_repository)}

    def queue(self) -> str:
        return self.topology.model_queue(MODEL, "1")


async def _namespace(base: Settings, root: Path, ttl_s: float) -> Namespace:
    repo = write_demo_repository(root / "models", {"mlp": MODEL})
    settings = dataclasses.replace(base, namespace=f"{base.namespace}c{uuid.uuid4().hex[:6]}", model_repository=repo,
                                   jobs=JobSettings(ttl_s=ttl_s))
    await sync_repository(settings)
    return Namespace(settings)


@pytest.fixture(scope="module")
async def lagging(synced: Settings, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Namespace]:
    """A namespace whose ledger the tests fill with filler events (removed with the module)."""
    ns = await _namespace(synced, tmp_path_factory.mktemp("lagging"), 600)
    yield ns
    await remove_namespace(ns.settings)


@pytest.fixture
async def crowded(synced: Settings, tmp_path: Path) -> AsyncIterator[Namespace]:
    """A namespace of one test's own, for a ledger flood that no later edge should replay."""
    ns = await _namespace(synced, tmp_path, 600)
    yield ns
    await remove_namespace(ns.settings)


@pytest.fixture(scope="module")
async def brief(synced: Settings, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Namespace]:
    """A namespace whose jobs and ledger live 3 s (jobs.ttl_s = 3)."""
    ns = await _namespace(synced, tmp_path_factory.mktemp("brief"), 3)
    yield ns
    await remove_namespace(ns.settings)


@pytest.fixture(scope="module")
async def broker(synced: Settings) -> AsyncIterator[BrokerConnection]:
    connection = await BrokerConnection.open(synced.broker, f"test-consistency-{uuid.uuid4().hex[:6]}")
    yield connection
    await connection.aclose()


@pytest.fixture
async def ledger(broker: BrokerConnection, lagging: Namespace) -> AsyncIterator[LedgerWriter]:
    writer = await LedgerWriter.open(broker, lagging.topology.ledger)
    yield writer
    await writer.aclose()


@pytest.fixture
async def spawn_held_worker(tmp_path: Path) -> AsyncIterator[Callable[..., asyncio.Future]]:
    """A real worker for MODEL in one of this module's namespaces, registered when returned."""
    started: list[Process] = []

    async def spawn(ns: Namespace) -> Process:
        proc = Process(["worker", "--model", MODEL], ns.settings, tmp_path / f"worker-{len(started)}.log")
        started.append(proc)

        async def registered() -> bool:
            assert proc.alive(), proc.output()
            return any(v["pid"] == proc.pid for v in (await live_workers(ns.settings, MODEL)).values())

        await wait_until(registered, 30, "the worker to register")
        return proc

    yield spawn
    await asyncio.gather(*(p.stop() for p in started))


# ---------------------------------------------------------------------------------------------- helpers

async def flood(broker: BrokerConnection, stream: str, messages: int, events: int) -> None:
    """``messages`` ledger messages of ``events`` finished events each, published at once: every reader has work to do."""
    body = pack_events([JobEvent(f"flood-{uuid.uuid4().hex[:6]}-{i}", SUCCEEDED, MODEL, "1", attempt=1) for i in range(events)])
    await asyncio.gather(*(broker.publish(aio_pika.Message(body), stream) for _ in range(messages)))


async def fill(writer: LedgerWriter, jobs: int, prefix: str = "fill") -> None:
    """``jobs`` finished jobs' events (queued, running, succeeded) in the ledger, none of them in a queue."""
    tag = uuid.uuid4().hex[:6]
    events = [JobEvent(f"{prefix}-{tag}-{i}", status, MODEL, "1", attempt=1)
              for i in range(jobs) for status in (QUEUED, RUNNING, SUCCEEDED)]
    await writer.write(events)


async def ledger_events(connection: BrokerConnection, stream: str, job_id: str) -> list[JobEvent]:
    """Every event of ``job_id`` in the stream, read from its start."""
    seen: list[JobEvent] = []
    tail = await LedgerTail.open(connection, stream, lambda events: seen.extend(e for e in events if e.job_id == job_id))
    try:
        await asyncio.wait_for(tail.wait_caught_up(), 60)
    finally:
        await tail.aclose()
    return seen


async def depth(broker: BrokerConnection, queue: str) -> int:
    counts = await broker.queue_counts(queue)
    assert counts is not None
    return counts[0]


async def status_of(http, url: str, job_id: str, method: str = "GET") -> tuple[int, str]:
    """(HTTP status, job status or error code) of a GET or DELETE."""
    async with http.request(method, f"{url}/v1/jobs/{job_id}") as resp:
        body = await resp.json()
        return resp.status, body["status"] if resp.status == 200 else body["error"]["code"]


def close_broker_connections(name: str) -> int:
    """Cut the broker connections a client opened under ``name``, as a network fault would (others untouched)."""
    listing = subprocess.run(["rabbitmqctl", "-q", "list_connections", "pid", "client_properties"],
                             check=True, capture_output=True, text=True, timeout=60).stdout
    pids = [line.split("\t")[0] for line in listing.splitlines() if f'{{"connection_name","{name}"}}' in line]
    for pid in pids:
        subprocess.run(["rabbitmqctl", "close_connection", pid, "test: connection cut"], check=True, capture_output=True, timeout=60)
    return len(pids)


async def ready(http, url: str) -> bool:
    async with http.get(f"{url}/v2/health/ready") as resp:
        return resp.status == 200


async def metric(http, url: str, name: str) -> float:
    async with http.get(f"{url}/metrics") as resp:
        for line in (await resp.text()).splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


def keyed(key: str) -> dict[str, str]:
    return {"Idempotency-Key": key}


async def scratch_stream(broker: BrokerConnection, ns: Namespace) -> str:
    name = f"{ns.settings.namespace}.scratch-{uuid.uuid4().hex[:6]}"
    await broker.publisher.declare_queue(name, durable=True, arguments={"x-queue-type": "stream", "x-max-age": "600s"})
    return name


async def delete_queue(broker: BrokerConnection, name: str) -> None:
    channel = await broker.channel()
    try:
        await channel.queue_delete(name)
    finally:
        await channel.close()


async def stream_bodies(broker: BrokerConnection, stream: str) -> list[bytes]:
    """The bodies of every event message in ``stream`` (markers left out), read from its start."""
    bodies: list[bytes] = []
    probe = uuid.uuid4().hex
    seen = asyncio.Event()
    channel = await broker.channel(prefetch=100)

    async def keep(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        marker = (message.headers or {}).get(MARKER_HEADER)
        if marker is None:
            bodies.append(message.body)
        elif marker == probe:
            seen.set()
        await message.ack()

    try:
        queue = await channel.declare_queue(stream, passive=True)
        await queue.consume(keep, arguments={"x-stream-offset": "first"}, robust=False)
        await broker.publish(aio_pika.Message(b"", headers={MARKER_HEADER: probe}), stream)
        await asyncio.wait_for(seen.wait(), 30)
    finally:
        await channel.close()
    return bodies


# ---------------------------------------------------------------------------------------------- ledger writer and tail

async def test_ledger_messages_stay_within_the_byte_budget_and_an_event_too_large_is_refused(broker, lagging) -> None:
    stream = await scratch_stream(broker, lagging)
    writer = await LedgerWriter.open(broker, stream, batch_bytes=1_000_000, max_bytes=3_000_000)

    def big(job: str, n: int) -> JobEvent:
        return JobEvent(job, SUCCEEDED, MODEL, "1", outputs={"y": {"dtype": "uint8", "shape": [n], "data": bytes(n)}})

    try:
        await asyncio.gather(writer.write([big(f"a{i}", 400_000) for i in range(3)]),
                             writer.write([big(f"b{i}", 400_000) for i in range(3)]), writer.write([big("c", 1_500_000)]))
        with pytest.raises(EventTooLarge) as refused:
            await writer.write([big("small", 100), big("huge", 3_100_000)])
        assert refused.value.job_ids == ("huge",) and refused.value.code == "output_too_large"
        bodies = await stream_bodies(broker, stream)
    finally:
        await writer.aclose()
        await delete_queue(broker, stream)
    jobs = sorted(e.job_id for body in bodies for e in unpack_events(body)[0])
    assert jobs == sorted(["a0", "a1", "a2", "b0", "b1", "b2", "c"]), "nothing of the refused write is stored"
    assert max(len(b) for b in bodies if len(b) < 1_500_000) <= 1_000_000, [len(b) for b in bodies]
    assert len(bodies) >= 4


async def test_writes_queued_without_awaiting_their_confirms_reach_the_stream_in_the_order_they_were_queued(broker, lagging) -> None:
    # A worker queues a batch's running events and, without waiting for their confirm, its final events:
    # the stream must still hold every job's running event before its final one.
    stream = await scratch_stream(broker, lagging)
    writer = await LedgerWriter.open(broker, stream)
    order = []
    try:
        pending = []
        for i in range(150):
            for status in (RUNNING, SUCCEEDED):
                pending.append(writer.enqueue([JobEvent(f"j{i}", status, MODEL, "1")]))
                order.append((f"j{i}", status))
            if i % 10 == 0:
                await asyncio.sleep(0)  # let the flusher send some while more are queued
        await asyncio.gather(*pending)
        bodies = await stream_bodies(broker, stream)
    finally:
        await writer.aclose()
        await delete_queue(broker, stream)
    assert [(e.job_id, e.status) for body in bodies for e in unpack_events(body)[0]] == order
    assert 1 < len(bodies) < len(order), "some writes went out alone, some were coalesced"


async def test_a_tail_resumes_after_its_last_offset_when_its_connection_is_cut(synced, broker, lagging) -> None:
    stream = await scratch_stream(broker, lagging)
    writer = await LedgerWriter.open(broker, stream)
    name = f"test-tail-{uuid.uuid4().hex[:6]}"
    connection = await BrokerConnection.open(synced.broker, name)
    seen: list[str] = []
    tail = await LedgerTail.open(connection, stream, lambda events: seen.extend(e.job_id for e in events))
    expected = [f"j{i}" for i in range(150)]
    try:
        for i in range(0, 100, 10):
            await writer.write([JobEvent(j, QUEUED) for j in expected[i:i + 10]])
        await wait_until(lambda: len(seen) >= 100 and tail.caught_up, 30, "the first 100 events")
        assert await asyncio.to_thread(close_broker_connections, name) == 1
        await wait_until(lambda: not tail.caught_up, 10, "the tail to notice")
        await wait_until(lambda: tail.caught_up, 30, "the tail to follow again")
        await writer.write([JobEvent(j, QUEUED) for j in expected[100:]])
        await wait_until(lambda: len(seen) >= 150, 30, "the next 50 events")
        await asyncio.wait_for(tail.sync(), 10)
        assert seen == expected, "each event handled once, in order: no replay after the reconnect"
        assert tail.subscriptions == 2
    finally:
        await tail.aclose()
        await connection.aclose()
        await writer.aclose()
        await delete_queue(broker, stream)


async def test_a_fresh_tail_starts_at_the_retention_window_not_at_the_streams_first_message(broker, lagging) -> None:
    stream = await scratch_stream(broker, lagging)
    writer = await LedgerWriter.open(broker, stream)
    seen: list[str] = []
    try:
        await writer.write([JobEvent("before", QUEUED)])
        await asyncio.sleep(2.5)  # time itself is the input: the first message must fall out of a 1.5 s window
        await writer.write([JobEvent("within", QUEUED)])
        tail = await LedgerTail.open(broker, stream, lambda events: seen.extend(e.job_id for e in events), retention_start(1.5))
        try:
            await asyncio.wait_for(tail.wait_caught_up(), 30)
        finally:
            await tail.aclose()
    finally:
        await writer.aclose()
        await delete_queue(broker, stream)
    assert seen == ["within"]


async def test_the_auth_cache_holds_a_bounded_number_of_tokens(synced) -> None:

    def bearer(token: str):
        return make_mocked_request("GET", "/v1/jobs/x", headers={"Authorization": f"Bearer {token}"})

    async with open_etcd(synced.etcd) as etcd:
        auth = Authenticator(True, {}, etcd, synced.namespace, 5)
        auth.cache_max = 50
        valid = await create_key(etcd, synced.namespace, "acme", 0, 0, 5)
        assert (await auth.principal(bearer(valid))).tenant == "acme"
        for i in range(200):
            assert await auth.principal(bearer(f"random-{i}")) is None
        assert auth.cached <= 50
        assert (await auth.principal(bearer(valid))).tenant == "acme"


# ---------------------------------------------------------------------------------------------- DELETE (A3)

@pytest.mark.parametrize("last, answer", [(SUCCEEDED, (200, "succeeded")), (RUNNING, (409, "conflict"))])
async def test_a_cancel_on_a_lagging_edge_is_decided_by_the_ledgers_order_on_every_edge(
        spawn_edge, http, crowded, broker, last, answer) -> None:
    first, second = await spawn_edge(env=crowded.env), await spawn_edge(env=crowded.env)
    job_id = f"race-{uuid.uuid4().hex}"
    ledger = await LedgerWriter.open(broker, crowded.topology.ledger)
    try:
        await ledger.write([JobEvent(job_id, QUEUED, MODEL, "1")])
        for edge in (first, second):
            assert await status_of(http, edge.url, job_id) == (200, "queued")
        await flood(broker, crowded.topology.ledger, 200, 512)  # the first edge is still busy with these at the DELETE
        await ledger.write([JobEvent(job_id, last, MODEL, "1", attempt=1, worker="w-test")])
    finally:
        await ledger.aclose()
    assert await status_of(http, first.url, job_id, "DELETE") == answer
    final = (200, str(last))
    assert await status_of(http, first.url, job_id) == final
    # The other edge may still be behind: it must come to the same state, never to "cancelled".
    await wait_until(lambda: _status_is(http, second.url, job_id, final), 30, f"the other edge to show {last}")
    await first.process.stop()
    restarted = await spawn_edge(port=first.port, env=crowded.env)
    assert await status_of(http, restarted.url, job_id) == final


async def _status_is(http, url: str, job_id: str, expected: tuple[int, str]) -> bool:
    got = await status_of(http, url, job_id)
    assert got in (expected, (200, "queued")), got
    return got == expected


# ---------------------------------------------------------------------------------------------- reconnects (A4)

async def test_after_a_lost_connection_the_edge_resumes_the_ledger_and_never_answers_404_for_a_job(
        spawn_edge, http, lagging, ledger, broker) -> None:
    env = {**lagging.env, "INFERQ_EDGE_MAX_JOBS_IN_MEMORY": "1000"}
    edge, other = await spawn_edge(env=env), await spawn_edge(env=lagging.env)
    await fill(ledger, 3000)  # 9000 events: a replay would push the edge's recent jobs out of its 1000
    key = keyed(f"resume-{uuid.uuid4().hex}")
    x = sample("mlp", seed=8)
    accepted = await submit(http, edge, MODEL, x, key)
    assert await status_of(http, edge.url, uuid.uuid4().hex) == (404, "not_found")  # caught up with the filler
    applied = await metric(http, edge.url, "inferq_edge_ledger_events_total")
    queued = await depth(broker, lagging.queue())
    readiness: list[bool] = []

    async def watch() -> None:
        while True:
            readiness.append(await ready(http, edge.url))
            await asyncio.sleep(0.02)

    watcher = asyncio.create_task(watch())
    try:
        assert await asyncio.to_thread(close_broker_connections, f"edge:127.0.0.1:{edge.port}") == 1
        elsewhere = await submit(http, other, MODEL, x)  # accepted by another edge while this one reconnects
        assert await status_of(http, edge.url, elsewhere["job_id"]) in ((200, "queued"), (503, "not_ready"))
        assert await status_of(http, edge.url, accepted["job_id"]) == (200, "queued")
        again = await submit(http, edge, MODEL, x, key)
        assert again["job_id"] == accepted["job_id"]
        await wait_until(lambda: readiness and readiness[-1] and False in readiness, 30, "the edge to be ready again")
    finally:
        watcher.cancel()
    assert await status_of(http, edge.url, elsewhere["job_id"]) == (200, "queued")
    assert await depth(broker, lagging.queue()) == queued + 1, "only the other edge's job was queued"
    replayed = await metric(http, edge.url, "inferq_edge_ledger_events_total") - applied
    assert replayed < 100, f"{replayed:.0f} events applied again after the reconnect: the ledger was replayed"


# ---------------------------------------------------------------------------------------------- idempotency (A6)

@pytest.mark.parametrize("edges", [1, 2])
async def test_ten_concurrent_submits_with_one_key_queue_exactly_one_job(spawn_edge, http, lagging, broker, edges) -> None:
    fleet = [await spawn_edge(env=lagging.env) for _ in range(edges)]
    key = keyed(f"burst-{uuid.uuid4().hex}")
    body = {"inputs": [v2_input(sample("mlp", seed=4))]}
    before = await depth(broker, lagging.queue())

    async def one(i: int) -> tuple[int, str]:
        async with http.post(f"{fleet[i % edges].url}/v1/models/{MODEL}/jobs", json=body, headers=key) as resp:
            return resp.status, (await resp.json())["job_id"]

    answers = await asyncio.gather(*(one(i) for i in range(10)))
    assert {status for status, _ in answers} == {202} and len({job for _, job in answers}) == 1, answers
    assert await depth(broker, lagging.queue()) == before + 1


async def test_a_finished_jobs_key_never_queues_it_again_after_the_edge_forgot_it(spawn_edge, http, lagging, ledger, broker) -> None:
    edge = await spawn_edge(env={**lagging.env, "INFERQ_EDGE_MAX_JOBS_IN_MEMORY": "100"})
    key = keyed(f"forgotten-{uuid.uuid4().hex}")
    x = sample("mlp", seed=5)
    first = await submit(http, edge, MODEL, x, key)
    await ledger.write([JobEvent(first["job_id"], SUCCEEDED, MODEL, "1", attempt=1, worker="w-test")])
    await fill(ledger, 300)  # more jobs than the edge keeps in memory

    async def forgotten() -> bool:
        return await status_of(http, edge.url, first["job_id"]) == (404, "not_found")

    await wait_until(forgotten, 30, "the edge to forget the job")
    before = await depth(broker, lagging.queue())
    again = await submit(http, edge, MODEL, x, key)
    assert again["job_id"] == first["job_id"]
    assert await depth(broker, lagging.queue()) == before


async def test_the_same_key_with_another_request_is_refused_with_idempotency_mismatch(spawn_edge, http, lagging, broker) -> None:
    a, b = await spawn_edge(env=lagging.env), await spawn_edge(env=lagging.env)
    key = keyed(f"mismatch-{uuid.uuid4().hex}")
    await submit(http, a, MODEL, sample("mlp", seed=1), key)
    before = await depth(broker, lagging.queue())
    for edge, body in ((a, {"inputs": [v2_input(sample("mlp", seed=2))]}),
                       (b, {"inputs": [v2_input(sample("mlp", seed=1))], "parameters": {"temperature": 2}})):
        async with http.post(f"{edge.url}/v1/models/{MODEL}/jobs", json=body, headers=key) as resp:
            doc = await resp.json()
            assert resp.status == 422 and doc["error"]["code"] == "idempotency_mismatch", doc
    assert await depth(broker, lagging.queue()) == before


# ---------------------------------------------------------------------------------------------- expiry (issue 20, A9)

async def test_a_job_past_its_ttl_polls_expired_on_every_edge_and_never_runs(
        spawn_edge, spawn_held_worker, http, lagging, broker) -> None:
    a, b = await spawn_edge(env=lagging.env), await spawn_edge(env=lagging.env)
    async with http.post(f"{a.url}/v1/models/{MODEL}/jobs?ttl=2", json={"inputs": [v2_input(sample("mlp"))]}) as resp:
        assert resp.status == 202
        job_id = (await resp.json())["job_id"]
    started = time.monotonic()
    doc = await poll(http, a, job_id, wait=10)
    assert doc["status"] == "expired" and doc["error"]["code"] == "expired", doc
    assert time.monotonic() - started < 3.5
    assert (await poll(http, b, job_id, wait=0))["status"] == "expired"
    await spawn_held_worker(lagging)
    await wait_until(lambda: _empty(broker, lagging), 60, "the worker to drain the queue")
    events = await ledger_events(broker, lagging.topology.ledger, job_id)
    assert [e.status for e in events][:2] == [QUEUED, EXPIRED], events
    assert {e.status for e in events} <= {QUEUED, EXPIRED}, "the job never ran"
    assert (await poll(http, a, job_id, wait=0))["status"] == "expired"


async def _empty(broker: BrokerConnection, ns: Namespace) -> bool:
    return await depth(broker, ns.queue()) == 0


async def test_with_the_default_ttl_an_expired_job_stays_visible_as_expired(spawn_edge, http, brief) -> None:
    edge = await spawn_edge(env=brief.env)
    accepted = await submit(http, edge, MODEL, sample("mlp"))
    assert (await poll(http, edge, accepted["job_id"], wait=6))["status"] == "expired"
    await asyncio.sleep(2)  # time is the input: past created_at + jobs.ttl_s, still inside the expiry's retention
    assert (await poll(http, edge, accepted["job_id"], wait=0))["status"] == "expired"


# ---------------------------------------------------------------------------------------------- liveness (A18)

async def test_an_edge_whose_stream_consumer_is_cancelled_is_not_ready_until_it_follows_again(
        spawn_edge, http, brief, broker) -> None:
    edge = await spawn_edge(env=brief.env)
    await delete_queue(broker, brief.topology.ledger)  # the broker cancels every consumer of the stream
    await wait_until(lambda: _not(ready(http, edge.url)), 10, "the edge to say it is not ready")
    await brief.topology.declare_shared(broker.publisher, brief.settings.jobs)
    await wait_until(lambda: ready(http, edge.url), 30, "the edge to follow the new stream")
    accepted = await submit(http, edge, MODEL, sample("mlp"))
    assert (await poll(http, edge, accepted["job_id"], wait=0))["status"] == "queued"


async def _not(awaitable) -> bool:
    return not await awaitable


# ---------------------------------------------------------------------------------------------- bounded costs (A12)

async def test_a_flood_of_polls_for_unknown_jobs_writes_few_sync_markers(spawn_edge, http, lagging, broker) -> None:
    edge = await spawn_edge(env=lagging.env)
    markers: list[str] = []
    channel = await broker.channel(prefetch=1000)
    queue = await channel.declare_queue(lagging.topology.ledger, passive=True)

    async def count(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        marker = (message.headers or {}).get(MARKER_HEADER)
        if marker is not None:
            markers.append(str(marker))
        await message.ack()

    await queue.consume(count, arguments={"x-stream-offset": "next"}, robust=False)

    async def client() -> list[tuple[int, str]]:
        return [await status_of(http, edge.url, uuid.uuid4().hex) for _ in range(6)]

    try:  # 50 clients at once, 6 polls one after the other each: a miss joins the marker in flight, or the next
        answers = [a for answers in await asyncio.gather(*(client() for _ in range(50))) for a in answers]
        assert set(answers) == {(404, "not_found")}
        probe = uuid.uuid4().hex
        await broker.publish(aio_pika.Message(b"", headers={MARKER_HEADER: probe}), lagging.topology.ledger)
        await wait_until(lambda: probe in markers, 30, "the probe marker")
    finally:
        await channel.close()
    # Without sharing, every miss would write its own marker: 300. Shared rounds need about two per poll a client
    # makes in sequence (12) when all 50 clients keep in step; a loaded machine spreads their polls over more rounds,
    # so the bound is a quarter of the polls, still far from one marker per poll.
    assert len(markers) - 1 <= 75, f"{len(markers) - 1} sync markers for 300 polls"
