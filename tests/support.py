"""Test helpers: real worker processes, an AMQP client with reply_to, waiting on conditions."""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aio_pika
import numpy as np

from inferq.broker.codec import decode_tensor_map, unpackb
from inferq.broker.connection import BrokerConnection
from inferq.broker.tail import MARKER_HEADER
from inferq.broker.messages import JobEvent, JobRequest, unpack_events
from inferq.broker.topology import Topology
from inferq.runtime.coordination import get_json_prefix, keys, open_etcd
from inferq.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


async def wait_until(predicate: Callable[[], Awaitable[Any] | Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Re-check ``predicate`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


def settings_env(settings: Settings) -> dict[str, str]:
    """Environment that makes a child process use ``settings``."""
    return {**os.environ, **settings.resolved().to_env(), "PYTHONUNBUFFERED": "1"}


class Process:
    """A real ``inferq`` child process, stopped (and reaped) by ``stop``/``kill``."""

    def __init__(self, args: list[str], settings: Settings, log_path: Path, extra_env: dict[str, str] | None = None) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")
        env = settings_env(settings)
        env.update(extra_env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "inferq.cli", *args], cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            self.proc.send_signal(sig)

    async def wait(self, timeout: float) -> int:
        """Wait for exit without blocking the loop."""
        await wait_until(lambda: self.proc.poll() is not None, timeout, f"process {self.pid} to exit")
        return self.proc.returncode

    async def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, then SIGKILL if it does not exit in time."""
        self.signal(signal.SIGTERM)
        try:
            return await self.wait(timeout)
        except AssertionError:
            self.kill()
            return await self.wait(5)
        finally:
            self._log.close()

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


async def live_workers(settings: Settings, model: str | None = None) -> dict[str, dict[str, Any]]:
    """Membership records in etcd (optionally of one model)."""
    async with open_etcd(settings.etcd) as client:
        records = await get_json_prefix(client, keys(settings.namespace).workers, 5)
    return {k: v for k, v in records.items() if model is None or v.get("model") == model}


class AmqpClient:
    """Publishes jobs straight to the exchange and collects results on an exclusive reply queue."""

    def __init__(self, connection: BrokerConnection, topology: Topology) -> None:
        self.connection = connection
        self.topology = topology
        self.results: dict[str, dict[str, Any]] = {}
        self.reply_counts: collections.Counter[str] = collections.Counter()
        self._arrived = asyncio.Event()
        self.reply_queue: str = ""

    @classmethod
    async def open(cls, settings: Settings) -> AmqpClient:
        connection = await BrokerConnection.open(settings.broker, "test-client")
        self = cls(connection, Topology(settings.namespace))
        channel = await connection.channel(prefetch=1000)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        self.reply_queue = queue.name
        await queue.consume(self._on_reply, no_ack=True)
        return self

    async def _on_reply(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        result = unpackb(message.body)
        result["correlation_id"] = message.correlation_id
        self.results[result["job_id"]] = result
        self.reply_counts[result["job_id"]] += 1
        self._arrived.set()

    async def submit(self, model: str, inputs: dict[str, np.ndarray], job_id: str | None = None, **kwargs: Any) -> str:
        """Publish one job with reply_to; return its id once the broker confirmed it."""
        job_id = job_id or uuid.uuid4().hex
        request = JobRequest(job_id, inputs, reply_to=self.reply_queue, correlation_id=f"c-{job_id}", **kwargs)
        await self.connection.publish(request.to_message(), model, self.topology.requests, mandatory=True)
        return job_id

    async def queue_counts(self, queue: str) -> tuple[int, int] | None:
        """(ready, consumers) of ``queue`` now."""
        return await self.connection.queue_counts(queue)

    async def publish_raw(self, model: str, message: aio_pika.Message) -> None:
        await self.connection.publish(message, model, self.topology.requests, mandatory=True)

    async def wait_results(self, job_ids: list[str], timeout: float) -> dict[str, dict[str, Any]]:
        """Results of ``job_ids`` once all have arrived."""
        await wait_until(lambda: all(j in self.results for j in job_ids), timeout, f"{len(job_ids)} results")
        return {j: self.results[j] for j in job_ids}

    @staticmethod
    def outputs(result: dict[str, Any]) -> dict[str, np.ndarray]:
        return decode_tensor_map(result["outputs"], what="outputs")

    async def aclose(self) -> None:
        await self.connection.aclose()


async def ledger_events(settings: Settings, url: str | None = None, timeout: float = 60) -> list[JobEvent]:
    """Every event in the namespace's ledger stream, in stream order: the durable truth tests count against."""
    connection = await aio_pika.connect(url or settings.broker.url, timeout=10)
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=1000)
        stream = await channel.declare_queue(Topology(settings.namespace).ledger, passive=True)
        events: list[JobEvent] = []
        marker, done = uuid.uuid4().hex, asyncio.Event()

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            if (message.headers or {}).get(MARKER_HEADER) == marker:
                done.set()
            elif not (message.headers or {}).get(MARKER_HEADER):
                events.extend(unpack_events(message.body)[0])
            await message.ack()

        await stream.consume(on_message, arguments={"x-stream-offset": "first"})
        await channel.default_exchange.publish(aio_pika.Message(b"", headers={MARKER_HEADER: marker}), stream.name)
        await asyncio.wait_for(done.wait(), timeout)
        return events
    finally:
        await connection.close()


def final_states(events: list[JobEvent]) -> dict[str, list[str]]:
    """Each job's final statuses in ledger order (a job may be recorded more than once: at-least-once)."""
    finals: dict[str, list[str]] = collections.defaultdict(list)
    for event in events:
        if event.status.terminal:
            finals[event.job_id].append(event.status.value)
    return finals


def assert_each_ended_once(events: list[JobEvent], job_ids: list[str]) -> dict[str, str]:
    """Every job has a final state in the ledger and no two that disagree; returns each job's final status."""
    finals = final_states(events)
    missing = [j for j in job_ids if j not in finals]
    assert not missing, f"{len(missing)} of {len(job_ids)} jobs have no final state in the ledger: {missing[:5]}"
    conflicting = {j: finals[j] for j in job_ids if len(set(finals[j])) > 1}
    assert not conflicting, f"jobs with conflicting final states: {dict(list(conflicting.items())[:5])}"
    return {j: finals[j][0] for j in job_ids}


async def declared(connection: Any, kind: str, name: str) -> bool:
    """Whether the broker has the queue or exchange ``name`` (``kind``: "queue"/"exchange"); ``connection.channel()`` opens a probe."""
    probe = await connection.channel()  # a passive declare of something missing closes its channel
    try:
        if kind == "queue":
            await probe.declare_queue(name, passive=True)
        else:
            await probe.get_exchange(name, ensure=True)
        return True
    except aio_pika.exceptions.ChannelNotFoundEntity:
        return False
    finally:
        if not probe.is_closed:
            await probe.close()
