"""The result spool: finished jobs the ledger could not take are kept on disk and flushed once, never run again."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace
from pathlib import Path

import aio_pika
import numpy as np
import pytest

from inferq.actors.shard import spool_dir
from inferq.actors.spool import Spool
from inferq.broker.codec import encode_tensor
from inferq.broker.connection import BrokerConnection
from inferq.broker.ledger import LedgerWriter
from inferq.broker.messages import RUNNING, SUCCEEDED, JobEvent, JobRequest
from inferq.broker.topology import Topology
from inferq.errors import BrokerUnavailable
from inferq.runtime.loader import sync_repository
from inferq.runtime.rabbitnode import RabbitNode
from inferq.settings import Settings
from tests.conftest import sample
from tests.support import AmqpClient, final_states, ledger_events, wait_until

pytestmark = pytest.mark.faults  # the fault suite: make test-faults (CI runs it after make test)

SENTINEL = np.full((1, 10), 7.0, np.float32)  # no model computes this: an output equal to it was not recomputed


def event(job_id: str, worker: str = "earlier-run", model: str = "mlp") -> JobEvent:
    return JobEvent(job_id, SUCCEEDED, model, "1", outputs={"probs": encode_tensor(SENTINEL)}, worker=worker, run="r1", ts=1_700_000_000.0,
                    timings={"inference_ms": 1.0, "batch_size": 1})


def spooled_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".spool"))


@pytest.fixture
async def ledger(synced: Settings):
    """A real LedgerWriter on the test namespace's ledger stream."""
    connection = await BrokerConnection.open(synced.broker, "test-spool")
    writer = await LedgerWriter.open(connection, Topology(synced.namespace).ledger)
    try:
        yield writer
    finally:
        await writer.aclose()
        await connection.aclose()


# Unit layer: the files.

async def test_spooled_events_outlive_their_writer_and_are_recalled_whole(tmp_path: Path) -> None:
    first = await Spool.open(tmp_path, 1 << 20)
    assert await first.put([event("a"), event("b")]) and await first.put([event("c")])
    again = await Spool.open(tmp_path, 1 << 20)  # a restarted worker of the same version
    assert again.pending == 2 and all(again.holds(j) for j in "abc") and not again.holds("d")
    recalled = await again.recall(["a", "c", "d"])
    assert set(recalled) == {"a", "c"}
    assert recalled["a"] == event("a")


async def test_a_torn_temporary_file_is_ignored_and_removed_once_its_writer_is_dead(tmp_path: Path) -> None:
    (tmp_path / ".00001-dead.spool.999999999.tmp").write_bytes(b"\x92\x81half")  # pid that cannot exist
    (tmp_path / ".00002-live.spool.1.tmp").write_bytes(b"\x92")  # pid 1 lives: its writer may be mid-write
    spool = await Spool.open(tmp_path, 1 << 20)
    assert spool.pending == 0 and spooled_files(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == [".00002-live.spool.1.tmp"]


async def test_a_full_spool_refuses_a_batch_and_writes_nothing_of_it(tmp_path: Path) -> None:
    spool = await Spool.open(tmp_path, 600)
    assert await spool.put([event("a")])
    assert not await spool.put([event("b"), event("c")])
    assert spool.pending == 1 and not spool.holds("b") and len(spooled_files(tmp_path)) == 1


async def test_an_unreadable_spool_file_is_moved_aside_not_flushed_for_ever(tmp_path: Path) -> None:
    (tmp_path / "00000000000000000001-bad.spool").write_bytes(b"\xc1 not msgpack")
    spool = await Spool.open(tmp_path, 1 << 20)
    assert spool.pending == 0 and spooled_files(tmp_path) == []
    assert (tmp_path / "00000000000000000001-bad.corrupt").exists()


# Flushing to a real ledger stream.

async def test_a_flush_writes_each_spooled_event_to_the_ledger_once_and_deletes_its_file(synced, ledger, tmp_path) -> None:
    ids = [f"spool-{uuid.uuid4().hex[:8]}-{i}" for i in range(5)]
    spool = await Spool.open(tmp_path, 1 << 20)
    await spool.put([event(j) for j in ids[:3]])
    await spool.put([event(j) for j in ids[3:]])
    sibling = await Spool.open(tmp_path, 1 << 20)  # another worker of the version: one flusher at a time
    written = await asyncio.gather(spool.flush(ledger), sibling.flush(ledger))
    assert sum(written) == 5 and spooled_files(tmp_path) == [] and spool.pending == sibling.pending == 0
    events = [e for e in await ledger_events(synced) if e.job_id in ids]
    assert sorted(e.job_id for e in events) == sorted(ids)
    assert all(e == event(e.job_id) for e in events)
    # A redelivery that arrives after the flush still finds the event, so the job is not run again.
    assert set(await spool.recall(ids[:3])) == set(ids[:3]) or set(await sibling.recall(ids[:3])) == set(ids[:3])


async def test_a_ledger_that_refuses_writes_leaves_the_spool_as_it_was(synced, tmp_path) -> None:
    connection = await BrokerConnection.open(synced.broker, "test-spool-closed")
    writer = await LedgerWriter.open(connection, Topology(synced.namespace).ledger)
    await writer.aclose()
    try:
        spool = await Spool.open(tmp_path, 1 << 20)
        await spool.put([event("x")])
        with pytest.raises(BrokerUnavailable):
            await spool.flush(writer)
        assert spool.pending == 1 and len(spooled_files(tmp_path)) == 1 and spool.holds("x")
    finally:
        await connection.aclose()


# The worker, a real process.

async def test_a_restarted_worker_flushes_what_it_spooled_before_and_does_not_run_those_jobs_again(
        synced, spawn_worker, amqp, reference, tmp_path) -> None:
    state = tmp_path / "state"
    spooled = [f"spooled-{uuid.uuid4().hex[:8]}-{i}" for i in range(4)]
    fresh = [f"fresh-{uuid.uuid4().hex[:8]}-{i}" for i in range(3)]
    spool = await Spool.open(spool_dir(replace(synced, state_dir=state), "mlp", "1"), 1 << 20)
    await spool.put([event(j) for j in spooled[:2]])
    await spool.put([event(j) for j in spooled[2:]])
    # The earlier run could not ack them either (its broker link was gone): the broker still has them queued.
    for i, job_id in enumerate(spooled + fresh):
        await amqp.submit("mlp", {"x": sample("mlp", seed=i)}, job_id=job_id)
    await spawn_worker("mlp", env={"INFERQ_STATE_DIR": str(state)})
    results = await amqp.wait_results(spooled + fresh, timeout=30)
    for job_id in spooled:
        np.testing.assert_array_equal(amqp.outputs(results[job_id])["probs"], SENTINEL)
    for i, job_id in enumerate(fresh, start=len(spooled)):
        np.testing.assert_allclose(amqp.outputs(results[job_id])["probs"], reference("mlp", sample("mlp", seed=i)),
                                   rtol=1e-5, atol=1e-6)
    await wait_until(lambda: spooled_files(spool.directory) == [], 10, "the spool to be flushed")
    events = [e for e in await ledger_events(synced) if e.job_id in spooled]
    assert final_states(events) == {j: ["succeeded"] for j in spooled}  # exactly one final state each
    assert {e.worker for e in events} == {"earlier-run"}, "a spooled job was run again"
    assert all(amqp.reply_counts[j] == 1 for j in spooled)


async def test_a_broker_cut_mid_batch_spools_the_results_and_the_redelivered_job_is_not_run_again(
        synced, own_broker: RabbitNode, spawn_worker, reference, tmp_path) -> None:
    state = tmp_path / "state"
    mine = replace(synced, broker=replace(synced.broker, url=own_broker.url), state_dir=state)
    env = {"INFERQ_BROKER_URL": own_broker.url, "INFERQ_STATE_DIR": str(state), "INFERQ_BROKER_RECONNECT_INTERVAL_S": "0.5",
           "INFERQ_BROKER_RECONNECT_MAX_INTERVAL_S": "1"}
    await sync_repository(mine)
    worker = await spawn_worker("slow", env=env)
    job_id, x = f"cut-{uuid.uuid4().hex[:8]}", np.random.default_rng(3).standard_normal((1500, 256)).astype(np.float32)
    await _publish(mine, "slow", JobRequest(job_id, {"x": x}))  # a few seconds of inference
    await wait_until(lambda: _has_status(mine, job_id, RUNNING), 30, "the job to be running", interval=0.2)
    directory = spool_dir(mine, "slow", "1")
    await asyncio.to_thread(own_broker.kill)  # at once, while the inference still runs (a rabbitmqctl call may not be)
    try:
        await wait_until(lambda: directory.exists() and spooled_files(directory), 30, "the results to be spooled")
    finally:
        await own_broker.astart()
    await wait_until(lambda: _has_status(mine, job_id, SUCCEEDED), 30, "the spooled result in the ledger", interval=0.5)
    events = [e for e in await ledger_events(mine, own_broker.url) if e.job_id == job_id]
    assert final_states(events) == {job_id: ["succeeded"]}
    assert [e.status for e in events].count(RUNNING) == 1, "the job ran twice"
    (final,) = [e for e in events if e.status == SUCCEEDED]
    assert final.run == next(e.run for e in events if e.status == RUNNING)
    np.testing.assert_allclose(_decoded(final)["y"], reference("slow", x), rtol=1e-4, atol=1e-5)
    assert spooled_files(directory) == []
    await worker.stop()  # a job it had not acked would be back in the queue now
    assert await _ready_count(mine, "slow") == 0


async def _publish(settings: Settings, model: str, request: JobRequest) -> None:
    connection = await BrokerConnection.open(settings.broker, "test-spool-publish")
    try:
        await connection.publish(request.to_message(), model, Topology(settings.namespace).requests, mandatory=True)
    finally:
        await connection.aclose()


async def _has_status(settings: Settings, job_id: str, status) -> bool:
    try:
        return any(e.job_id == job_id and e.status == status for e in await ledger_events(settings, timeout=5))
    except (aio_pika.exceptions.AMQPError, OSError, asyncio.TimeoutError):
        return False


async def _ready_count(settings: Settings, model: str) -> int:
    connection = await aio_pika.connect(settings.broker.url, timeout=5)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(Topology(settings.namespace).model_queue(model, "1"), passive=True)
        return queue.declaration_result.message_count
    finally:
        await connection.close()


def _decoded(event: JobEvent) -> dict[str, np.ndarray]:
    return AmqpClient.outputs({"outputs": event.outputs})
