"""The shard worker: consumes one model version's queue, batches, runs ONNX Runtime, records results.

Per batch: decode and validate each job (a bad job fails alone), mark the
good ones ``running``, run each group of compatible jobs once, write every
final event to the ledger in one confirmed message, send ``reply_to``
results, and only then ack. A crash before the ack means redelivery
(at-least-once); the ledger keeps the first final state per job id.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import aio_pika

from actors.acks import AckTracker, settle
from actors.batcher import Batcher
from actors.cancels import CancelSet
from actors.deadletter import DeadLetterReaper
from actors.planner import Group, plan
from broker.codec import encode_tensor
from broker.connection import BrokerConnection, close_channel
from broker.control import ControlListener, worker_key
from broker.ledger import LedgerWriter
from broker.replies import send_reply
from broker.messages import CANCELLED, EXPIRED, FAILED, RUNNING, SUCCEEDED, JobEvent, JobRequest, check_job_id, error_dict, submitted_at
from broker.topology import Topology
from runtime.actor import Actor
from runtime.coordination import keys, open_etcd
from runtime.errors import BrokerError, CodecError, CoordinationError, InferenceError
from runtime.membership import MembershipLease
from runtime.repository import ModelEntry
from runtime.session import ModelSession
from runtime.settings import Settings

log = logging.getLogger("inferq.shard")

Delivery = aio_pika.abc.AbstractIncomingMessage


@dataclass
class WorkerStats:
    """The worker's own counters (also published in its membership record)."""

    jobs: int = 0
    failed: int = 0
    batches: int = 0
    max_batch: int = 0
    inflight: int = 0
    batch_sizes: dict[int, int] = field(default_factory=dict)

    def record_batch(self, size: int) -> None:
        self.batches += 1
        self.max_batch = max(self.max_batch, size)
        self.batch_sizes[size] = self.batch_sizes.get(size, 0) + 1

    def to_dict(self) -> dict[str, Any]:
        mean = sum(k * v for k, v in self.batch_sizes.items()) / self.batches if self.batches else 0.0
        return {"jobs": self.jobs, "failed": self.failed, "batches": self.batches,
                "max_batch": self.max_batch, "mean_batch": round(mean, 2), "inflight": self.inflight}


class ShardWorker(Actor):
    """Serves one version of one model from its queue."""

    def __init__(self, settings: Settings, entry: ModelEntry, version: str | None = None) -> None:
        self.settings = settings
        self.entry = entry
        self.version = entry.version(version)
        self.topology = Topology(settings.namespace)
        self.worker_id = f"{settings.node}-{entry.name}-{self.version.version}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        super().__init__(f"shard:{self.worker_id}")
        cfg = entry.config.batching
        self.batcher = Batcher(self.mailbox, cfg.max_batch_size, cfg.max_queue_delay_ms / 1000)
        self.stats = WorkerStats()
        self.acks = AckTracker()
        self._slots = asyncio.Semaphore(2)
        self._batches: set[asyncio.Task[None]] = set()
        self._computing = 0  # batches between decode and result write: "busy" for the batcher
        self._connection: BrokerConnection | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._queue: aio_pika.abc.AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self._ledger: LedgerWriter | None = None
        self._cancels: CancelSet | None = None
        self._reaper: DeadLetterReaper | None = None
        self._session: ModelSession | None = None
        self._etcd: Any = None
        self._lease: MembershipLease | None = None
        self._control: ControlListener | None = None

    async def on_start(self) -> None:
        s = self.settings
        self._session = await ModelSession.open(self.version, self.entry.config, s.state_dir / "trt-cache")
        self._connection = await BrokerConnection.open(s.broker, self.name)
        await self.topology.declare_shared(self._connection.publisher, s.jobs.ttl_s)
        await self.topology.declare_model(
            self._connection.publisher, self.entry.name, [self.version.version], self.entry.default_version, self.entry.config.queue
        )
        self._ledger = await LedgerWriter(self._connection, self.topology.ledger).__aenter__()
        self._cancels = await CancelSet.follow(self._connection, self.topology.cancels, s.jobs.ttl_s)
        self._reaper = await DeadLetterReaper.start(self._connection, self.topology.dead, self._ledger, self.topology.model_queue_prefix)
        self._control = await ControlListener.start(
            self._connection, self.topology.control, [worker_key(self.worker_id)], self._on_command
        )
        self.spawn(self._batch_loop(), "batches")
        await self._consume()
        # Registered only once consuming: "ready" in etcd means jobs are being taken.
        self._etcd = open_etcd(s.etcd)
        self._lease = await MembershipLease.acquire(
            self._etcd, keys(s.namespace).worker(self.worker_id), self._record(), s.etcd.lease_ttl_s, s.etcd.timeout_s
        )
        self.spawn(self._report_stats(), "stats")

    def _record(self) -> dict[str, Any]:
        return {
            "worker_id": self.worker_id, "model": self.entry.name, "version": self.version.version,
            "node": self.settings.node, "pid": os.getpid(), "providers": self._session.providers if self._session else [],
            "state": "ready", "started_at": time.time(), "queue": self.topology.model_queue(self.entry.name, self.version.version),
            "stats": self.stats.to_dict(),
        }

    async def _consume(self) -> None:
        prefetch = self.batcher.max_size * 2
        self._channel = await self._connection.channel(prefetch=prefetch)
        self._queue = await self._channel.declare_queue(self.topology.model_queue(self.entry.name, self.version.version), passive=True)
        self._consumer_tag = await self._queue.consume(self._on_delivery, consumer_tag=self.worker_id)

    async def _on_delivery(self, message: Delivery) -> None:
        self.acks.track(message)
        self.mailbox.put_nowait(message)

    async def _batch_loop(self) -> None:
        while True:
            await self._slots.acquire()
            # An idle worker runs what it has at once; a busy one lets the next batch fill up meanwhile.
            batch = await self.batcher.next_batch(wait=self._computing > 0)
            task = asyncio.create_task(self._run_batch(batch), name=f"{self.name}:batch")
            self._batches.add(task)
            task.add_done_callback(self._batch_done)

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._batches.discard(task)
        self._slots.release()
        if not task.cancelled() and task.exception() is not None:
            log.error("batch failed unexpectedly: %r", task.exception(), exc_info=task.exception())

    async def _run_batch(self, deliveries: list[Delivery]) -> None:
        self.stats.inflight += len(deliveries)
        try:
            await self._process(deliveries)
        except Exception:  # a bug of ours must not leave jobs unacked forever (and block later acks)
            log.exception("batch failed unexpectedly; handing its jobs back")
        finally:
            self.stats.inflight -= len(deliveries)
            # Deliveries not yet acked or handed back (error, lost connection) go back now:
            # one left unfinished would hold up every later ack.
            left = self.acks.pending(deliveries)
            if left:
                await asyncio.shield(self._hand_back(left))

    async def _hand_back(self, deliveries: list[Delivery]) -> None:
        for delivery in deliveries:
            await settle(delivery, requeue=True)
        await self.acks.finish(settled=deliveries)

    async def _process(self, deliveries: list[Delivery]) -> None:
        started = time.time()
        # A batch that is only writing results no longer makes the next one wait to fill up.
        self._computing += 1
        try:
            jobs, final, bad = self._decode(deliveries)
            groups, rejected = plan(jobs, self.version, self.entry.config.allow_nan)
            for delivery, request, exc in rejected:
                final.append(self._event(request, FAILED, delivery, error=error_dict(exc.code, str(exc))))
            runnable = [(d, r) for g in groups for d, r in zip(g.jobs, g.requests)]
            running = asyncio.ensure_future(self._ledger.write([self._event(r, RUNNING, d) for d, r in runnable]))
            retries: list[tuple[Delivery, JobRequest]] = []
            for group in groups:
                final.extend(await self._run_group(group, started, retries))
        finally:
            self._computing -= 1
        await asyncio.shield(self._finish(deliveries, bad, final, running, retries))

    def _decode(self, deliveries: list[Delivery]) -> tuple[list[tuple[Delivery, JobRequest]], list[JobEvent], list[Delivery]]:
        """Decoded jobs, failure events of malformed ones, and the malformed deliveries.

        Cancelled jobs are left out: they are acked without running.
        """
        jobs, final, bad = [], [], []
        for delivery in deliveries:
            try:
                request = JobRequest.from_message(delivery)
            except CodecError as exc:
                bad.append(delivery)
                final.extend(self._malformed_event(delivery, exc))
                continue
            if request.job_id in self._cancels:
                # The edge recorded the cancellation too; repeating it is harmless (first final state wins)
                # and covers an edge that died between the cancel stream and the ledger.
                final.append(self._event(request, CANCELLED, delivery))
                continue
            if _expired(delivery):
                final.append(JobEvent(request.job_id, EXPIRED, self.entry.name, self.version.version, tenant=request.tenant,
                                      error=error_dict("expired", "job was not started within its TTL"), worker=self.worker_id))
                continue
            jobs.append((delivery, request))
        return jobs, final, bad

    def _malformed_event(self, delivery: Delivery, exc: CodecError) -> list[JobEvent]:
        log.warning("rejecting malformed job %r: %s", delivery.message_id, exc)
        try:
            job_id = check_job_id(delivery.message_id)
        except CodecError:
            return []
        return [JobEvent(job_id, FAILED, self.entry.name, self.version.version, error=error_dict(exc.code, str(exc)), worker=self.worker_id)]

    async def _run_group(self, group: Group, started: float, retries: list[tuple[Delivery, JobRequest]]) -> list[JobEvent]:
        self.stats.record_batch(len(group.requests))
        t0 = time.perf_counter()
        try:
            outputs = await self._session.run(group.feed(), list(group.requests[0].outputs or []) or None)
        except InferenceError as exc:
            if len(group.requests) > 1:
                # One job can break a batched run: run each alone so only that job fails.
                return [e for single in group.singles() for e in await self._run_group(single, started, retries)]
            return self._failed_run(group.jobs[0], group.requests[0], exc, retries)
        timings = {"inference_ms": round((time.perf_counter() - t0) * 1000, 3), "batch_size": len(group.requests)}
        events = []
        for delivery, request, out in zip(group.jobs, group.requests, group.split(outputs)):
            wire = {name: encode_tensor(value) for name, value in out.items()}
            events.append(self._event(request, SUCCEEDED, delivery, outputs=wire, timings=dict(timings, **_queue_ms(delivery, started))))
        return events

    def _failed_run(self, delivery: Delivery, request: JobRequest, exc: InferenceError, retries: list[tuple[Delivery, JobRequest]]) -> list[JobEvent]:
        retry = self.entry.config.retry
        if retry.is_transient(str(exc)) and request.attempt < retry.max_attempts:
            log.warning("job %s attempt %d hit a transient error, retrying: %s", request.job_id, request.attempt, exc)
            retries.append((delivery, request))
            return []
        return [self._event(request, FAILED, delivery, error=error_dict(exc.code, str(exc)))]

    def _event(self, request: JobRequest, status: str, delivery: Delivery, **extra: Any) -> JobEvent:
        return JobEvent(
            request.job_id, status, self.entry.name, self.version.version, tenant=request.tenant,
            attempt=request.attempt, worker=self.worker_id, **extra,
        )

    async def _finish(self, deliveries: list[Delivery], bad: list[Delivery], final: list[JobEvent],
                      running: asyncio.Future[None], retries: list[tuple[Delivery, JobRequest]]) -> None:
        try:
            await running
            await self._ledger.write(final)
        except BrokerError as exc:
            log.warning("could not record %d results (%s); handing the jobs back", len(final), exc)
            for delivery in deliveries:
                await settle(delivery, requeue=True)
            await self.acks.finish(settled=deliveries)
            return
        self.stats.jobs += sum(1 for e in final if e.status == SUCCEEDED)
        self.stats.failed += sum(1 for e in final if e.status == FAILED)
        await self._reply(deliveries, final)
        skip = {id(d) for d in bad} | {id(d) for d, _ in retries}
        for delivery in bad:
            await settle(delivery, requeue=False)
        await self.acks.finish(acked=[d for d in deliveries if id(d) not in skip], settled=bad)
        if retries:
            attempt = max(r.attempt for _, r in retries)
            await asyncio.sleep(self.entry.config.retry.backoff_s * 2 ** (attempt - 1))
            for delivery, _ in retries:
                await settle(delivery, requeue=True)
            await self.acks.finish(settled=[d for d, _ in retries])

    async def _reply(self, deliveries: list[Delivery], final: list[JobEvent]) -> None:
        by_id = {e.job_id: e for e in final}
        await asyncio.gather(*(
            send_reply(self._connection, d, by_id[d.message_id]) for d in deliveries if d.reply_to and d.message_id in by_id
        ))

    async def _on_command(self, command: dict[str, Any]) -> None:
        if command["command"] == "drain":
            log.info("drain requested over the control exchange")
            self.request_stop()
        else:
            log.warning("unknown command %r", command["command"])

    async def _report_stats(self) -> None:
        last: dict[str, Any] = {}
        while True:
            await asyncio.sleep(1.0)
            # Prefetched jobs waiting in the mailbox are in flight too: the autoscaler counts them as backlog.
            current = dict(self.stats.to_dict(), inflight=self.stats.inflight + self.mailbox.qsize())
            if current != last:
                try:
                    await self._lease.update(stats=current)
                    last = current
                except CoordinationError as exc:  # etcd down: the keeper reports it; stats are best effort
                    log.debug("stats update failed: %r", exc)

    async def on_drain(self) -> None:
        """Stop pulling: mark draining, cancel the consumer, hand back unbatched jobs."""
        if self._lease is not None:
            try:
                await self._lease.update(state="draining")
            except CoordinationError as exc:  # etcd may be down while we stop; draining goes on
                log.warning("could not mark draining: %r", exc)
        if self._queue is not None and self._consumer_tag is not None:
            try:
                await asyncio.wait_for(self._queue.cancel(self._consumer_tag), 5)
            except (aio_pika.exceptions.AMQPError, OSError, TimeoutError) as exc:
                log.warning("cancelling the consumer: %r", exc)
        loops = [t for t in self._tasks if t.get_name().endswith(":batches")]
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)  # it must not batch anything after this
        unstarted = self.batcher.take_all()
        for delivery in unstarted:
            await settle(delivery, requeue=True)
        await self.acks.finish(settled=unstarted)

    async def wait_idle(self) -> None:
        while self._batches:
            await asyncio.gather(*list(self._batches), return_exceptions=True)

    async def on_close(self) -> None:
        for batch in list(self._batches):
            batch.cancel()
        await asyncio.gather(*list(self._batches), return_exceptions=True)
        for closer in (self._lease, self._control, self._reaper, self._cancels, self._ledger):
            if closer is not None:
                await closer.aclose()
        await close_channel(self._channel, "consumer")
        if self._connection is not None:
            await self._connection.aclose()
        if self._etcd is not None:
            await self._etcd.close()
        if self._session is not None:
            await self._session.aclose()


def _expired(delivery: Delivery) -> bool:
    """Whether a job's TTL (AMQP expiration, counted from its submission) ran out before it could start."""
    submitted, slack = submitted_at(delivery)
    if delivery.expiration is None or submitted is None:
        return False
    return submitted + delivery.expiration + slack < time.time()


def _queue_ms(delivery: Delivery, started: float) -> dict[str, float]:
    submitted, _ = submitted_at(delivery)
    if submitted is None:
        return {}
    return {"queue_ms": round(max(0.0, started - submitted) * 1000, 3)}
