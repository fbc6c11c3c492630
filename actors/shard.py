"""The shard worker: consumes one model version's queue, batches, runs ONNX Runtime, records results.

Per batch (:mod:`inferq.actors.batchrun`): decode and validate each job (a bad
job fails alone), mark the good ones ``running``, run each group of compatible
jobs once, write every final event to the ledger in one confirmed message,
send ``reply_to`` results, and only then ack. A crash before the ack means
redelivery (at-least-once); the ledger keeps the first final state per job id.

Jobs the worker gives back without having failed them (a drain, a lost ledger
write, a retry's backoff) are republished and acked (:mod:`inferq.broker.handback`),
so RabbitMQ's delivery count is not spent on them. Deliveries are consumed on a
connection of their own: a memory alarm blocks publishing connections, and acks
must still get through.

A batch whose events the ledger cannot take (the broker gone, or refusing writes
past LEDGER_HOLD_S) is spooled on disk (:mod:`inferq.actors.spool`) and flushed
when the ledger is back; its jobs, when redelivered, end with their spooled events.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any

import aio_pika
import aiormq
from prometheus_client import CollectorRegistry

from inferq.actors.attempts import StartBook
from inferq.actors.batcher import Batcher
from inferq.actors.batchrun import BatchRun, Context, Outcome
from inferq.actors.cancels import CancelSet
from inferq.actors.mailbox import Mailbox
from inferq.actors.spool import Spool
from inferq.broker.acks import AckTracker, settle
from inferq.broker.connection import BrokerConnection, close_channel, tolerant
from inferq.broker.control import ControlListener, worker_key
from inferq.broker.deadletter import DeadLetterReaper
from inferq.broker.handback import republish
from inferq.broker.ledger import LedgerWriter
from inferq.broker.identity import broker_user
from inferq.broker.messages import FAILED, RETRIES_HEADER, STARTS_HEADER, SUCCEEDED, SUSPECT_HEADER, error_dict, header_int, is_suspect
from inferq.broker.replies import send_reply
from inferq.broker.topology import HIGH, PRIORITY_HEADER, Topology
from inferq.broker.trace import trace_id
from inferq.errors import BrokerError, BrokerRejected, CoordinationError, EventTooLarge, Unroutable
from inferq.runtime.actor import Actor
from inferq.runtime.device import engine_cache_dir
from inferq.runtime.coordination import keys, open_etcd
from inferq.runtime.membership import MembershipLease
from inferq.runtime.metrics import JobMetrics, advertised, gauge, open_endpoint
from inferq.runtime.records import WorkerRecord, WorkerState, WorkerStats
from inferq.runtime.repository import ModelEntry
from inferq.runtime.session import ModelSession
from inferq.runtime.tenancy import Tenancy
from inferq.runtime.warmup import warm_up
from inferq.settings import Settings

log = logging.getLogger("inferq.shard")

Delivery = aio_pika.abc.AbstractIncomingMessage
PAUSE_MAX_S = 10.0
LEDGER_HOLD_S = 300.0
LAST_FLUSH_S = 10.0  # a stopping worker's last try to flush its spool
EVENT_OVERHEAD_BYTES = 64 * 1024  # how long finished jobs are held while the broker refuses ledger writes


class Recorded(Enum):
    """Where a batch's final events went: the ledger, or the spool (flushed to the ledger later)."""

    WRITTEN = "written"
    SPOOLED = "spooled"


@dataclass
class Counters:
    """The worker's own counters (published in its membership record as :class:`WorkerStats`)."""

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

    def snapshot(self, waiting: int = 0) -> WorkerStats:
        """The published form; ``waiting`` prefetched jobs count as in flight (the autoscaler's backlog)."""
        mean = sum(k * v for k, v in self.batch_sizes.items()) / self.batches if self.batches else 0.0
        return WorkerStats(self.jobs, self.failed, self.batches, self.max_batch, round(mean, 2), self.inflight + waiting)


class ShardWorker(Actor):
    """Serves one version of one model from its queue."""

    def __init__(self, settings: Settings, entry: ModelEntry, version: str | None = None, id_suffix: str | None = None,
                 variant: str = "") -> None:
        self.settings = settings
        self.entry = entry
        self.variant = variant  # the device variant whose file ``entry`` holds ("": the default)
        self.version = entry.version(version)
        self.topology = Topology(settings.namespace, settings.broker.replicas)
        suffix = id_suffix or uuid.uuid4().hex[:6]  # a launcher passes its own: the worker's log file is named with it
        self.worker_id = f"{settings.node}-{entry.name}-{self.version.version}-{os.getpid()}-{suffix}"
        super().__init__(f"shard:{self.worker_id}")
        cfg = entry.config.batching
        self.mailbox: Mailbox[Delivery] = Mailbox()
        self.batcher = Batcher(self.mailbox, max(1, cfg.max_batch_size), cfg.max_queue_delay_ms / 1000)
        self.stats = Counters()
        self.acks = AckTracker()
        self.queue_name = self.topology.model_queue(entry.name, self.version.version)
        self.high_queue_name = self.topology.high_queue(entry.name, self.version.version)
        self._slots = asyncio.Semaphore(2)
        self._batches: set[asyncio.Task[None]] = set()
        self._computing = 0  # batches between decode and result write: "busy" for the batcher
        self._pause_s = 0.0  # after a failed ledger write, the next batch waits this long
        self._connection: BrokerConnection | None = None
        self._consumers: list[tuple[aio_pika.abc.AbstractQueue, str]] = []
        self._context: Context | None = None
        self._spool: Spool | None = None
        self._lease: MembershipLease | None = None
        self._batch_loop_task: asyncio.Task[None] | None = None
        self._started_at = time.time()
        self._user_id = broker_user(settings.broker.url)  # a next stage's job is published as this worker's user
        self._warmup_error: str | None = None  # None until the warm-up ran; "" when it succeeded
        self.registry = CollectorRegistry()  # this process's own: tests run several workers' code in one process
        self.job_metrics = JobMetrics(self.registry, "this worker")
        self.registry.register(WorkerCollector(self))
        self._metrics_address = ""

    async def on_start(self) -> None:
        s = self.settings
        endpoint = await open_endpoint(self.registry, s.metrics)
        if endpoint is not None:
            self.on_stop(endpoint.aclose)
            self._metrics_address = advertised(endpoint, s.metrics)
        engines = await asyncio.to_thread(engine_cache_dir, s.state_dir, self.version.path, s.agent.sysroot)
        session = await self.own(ModelSession.open(self.version, self.entry.config, engines))
        self._connection = connection = await self.own(BrokerConnection.open(s.broker, self.name))
        await self.topology.declare_shared(connection.publisher, s.jobs)
        # Its own queues only: where the unpinned routing key points is the registry's business (the autoscaler's).
        await self.topology.declare_model(connection.publisher, self.entry.name, [self.version.version], self.entry.config.queue)
        ledger = await self.own(LedgerWriter.open(connection, self.topology.ledger))
        self._spool = await Spool.open(spool_dir(s, self.entry.name, self.version.version), s.jobs.spool_max_bytes)
        self.spawn(self._spool.run(ledger), "spool")  # what a previous run of this version left is flushed too
        cancels = await self.own(CancelSet.open(connection, self.topology.cancels, s.jobs.ttl_s))
        etcd = open_etcd(s.etcd)
        self.on_stop(etcd.close)
        tenancy = await self.own(Tenancy.open(s, etcd))
        await self.own(DeadLetterReaper.open(connection, self.topology.dead, ledger, self.topology.model_queue_prefix,
                                             tenancy.identify))
        await self.own(ControlListener.open(connection, self.topology.control, [worker_key(self.worker_id)], self._on_command))
        # Warming: registered (and drainable), not consuming. Its version's traffic gate opens only on a warmed, ready worker.
        self._lease = await self.own(MembershipLease.open(
            etcd, keys(s.namespace).worker(self.worker_id), self._record(WorkerState.WARMING), s.etcd.lease_ttl_s, s.etcd.timeout_s
        ))
        warmed = await warm_up(session, self.version)
        self._warmup_error, self.version = warmed.error, warmed.version
        starts = StartBook(etcd, keys(s.namespace).starts, s.jobs.ttl_s, s.etcd.timeout_s)
        self._context = Context(self.worker_id, self.entry, self.version, session, cancels, starts, ledger,
                                result_limit(s), self.stats.record_batch, tenancy=tenancy,
                                max_intermediate_bytes=min(s.jobs.max_intermediate_bytes, result_limit(s)),
                                spool=self._spool)
        self._batch_loop_task = self.spawn(self._batch_loop(), "batches")
        await self._consume()
        # Ready only once consuming: "ready" in etcd means jobs are being taken.
        try:
            await self._lease.update(self._record(WorkerState.READY))
        except CoordinationError as exc:  # kept for the next registration: the keeper retries
            log.warning("could not mark ready yet: %r", exc)
        self.spawn(self._report_stats(), "stats")

    def _record(self, state: WorkerState = WorkerState.READY) -> WorkerRecord:
        session = self._context.session if self._context else None
        return WorkerRecord(
            worker_id=self.worker_id, model=self.entry.name, version=self.version.version, node=self.settings.node,
            pid=os.getpid(), providers=tuple(session.providers if session else ()), state=state,
            started_at=self._started_at, queue=self.queue_name, stats=self.stats.snapshot(self.mailbox.qsize()),
            warmed=self._warmup_error == "", warmup_error=self._warmup_error or "", metrics=self._metrics_address,
            variant=self.variant,
            # Warming since the process began loading (the session and any TensorRT engine build come first).
            warming_since=self._started_at if state is WorkerState.WARMING else 0.0,
        )

    async def _consume(self) -> None:
        """One consumer per priority lane, each on a channel of its own (acks go in each channel's order)."""
        consuming = await self.own(BrokerConnection.open(self.settings.broker, f"{self.name}:consume"))
        for name, high in ((self.high_queue_name, True), (self.queue_name, False)):
            channel = await consuming.channel(prefetch=self.batcher.max_size * 2)
            self.on_stop(lambda channel=channel: close_channel(channel, "consumer"))
            queue = await channel.declare_queue(name, passive=True)
            tag = await queue.consume(self._on_high if high else self._on_normal, consumer_tag=f"{self.worker_id}:{'high' if high else 'normal'}")
            self._consumers.append((queue, tag))

    async def _on_high(self, message: Delivery) -> None:
        self.acks.track(message)
        self.mailbox.put_nowait(message, high=True)

    async def _on_normal(self, message: Delivery) -> None:
        self.acks.track(message)
        self.mailbox.put_nowait(message)

    async def _batch_loop(self) -> None:
        while True:
            await self._slots.acquire()
            if self._pause_s:
                await asyncio.sleep(self._pause_s)
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
        finishing: asyncio.Future[None] | None = None
        try:
            self._computing += 1
            try:
                outcome = await BatchRun(self._context, deliveries).run()
            finally:
                self._computing -= 1
            finishing = asyncio.ensure_future(self._finish(deliveries, outcome))
            await asyncio.shield(finishing)
        except Exception:  # a bug of ours must not leave jobs unacked forever (and block later acks)
            log.exception("batch failed unexpectedly; handing its jobs back as suspects")
        finally:
            if finishing is not None and not finishing.done():
                # Cancelled (stop after the grace period) while the shielded finish runs: let it settle
                # the deliveries itself, or they would be settled twice and the channel closed.
                await asyncio.shield(finishing)
            self.stats.inflight -= len(deliveries)
            left = self.acks.pending(deliveries)
            if left:  # one left unsettled would hold up every later ack
                await asyncio.shield(self._hand_back(left, {SUSPECT_HEADER: 1}))
        if self._context.session.wedged:
            log.error("the ONNX Runtime session is stuck in a run that would not stop; this worker exits to be replaced")
            self.failure = self.failure or RuntimeError("wedged ONNX Runtime session")
            self.request_stop()

    async def _finish(self, deliveries: list[Delivery], outcome: Outcome) -> None:
        recorded = await self._forward(outcome) and await self._write_results(deliveries, outcome)
        if not recorded or recorded is Recorded.SPOOLED:
            self._pause_s = min(PAUSE_MAX_S, max(0.5, self._pause_s * 2))
        if not recorded:
            log.warning("could not record %d results; handing the jobs back, next batch in %.1fs", len(outcome.final), self._pause_s)
            await self._hand_back_ran(deliveries, outcome)
            return
        if recorded is Recorded.WRITTEN:
            self._pause_s = 0.0
        self._count(outcome)
        if recorded is Recorded.SPOOLED and _channel_gone(deliveries):
            # The broker took the deliveries back and redelivers them: each then ends with its spooled event.
            await self.acks.finish(settled=deliveries)
            return
        await self._reply(deliveries, outcome)
        for delivery in outcome.rejected:
            await settle(delivery, requeue=False)
        requeued = await self._retry(outcome)  # those whose copy could not be sent were nacked
        skip = {id(d) for d in outcome.rejected} | requeued
        await self.acks.finish(acked=[d for d in deliveries if id(d) not in skip], settled=outcome.rejected)

    async def _write_results(self, deliveries: list[Delivery], outcome: Outcome) -> Recorded | None:
        """Write the batch's final events, holding its deliveries while the broker refuses writes.

        A memory alarm or a stream in trouble refuses publishes while the
        connection lives: the jobs are done, so the worker keeps them (and takes
        no more, its batch slots being full) and tries again with backoff,
        rather than running them again later. It gives up when the deliveries'
        channel is gone (the broker returns them anyway), on stop, or after
        LEDGER_HOLD_S: then the events go to the spool (SPOOLED), or, the spool
        full or the worker stopping, nowhere (None: the jobs are handed back).
        Jobs recalled from the spool are made durable first.
        """
        try:
            recorded = await self._write_final(deliveries, outcome)
        finally:
            # Queued before the final events (the writer keeps their order), so awaited only after them.
            errors = await asyncio.gather(*outcome.running, return_exceptions=True)
        for error in errors:
            if isinstance(error, BrokerError):  # "running" is informational: the final events matter
                log.info("running events not recorded: %s", error)
            elif isinstance(error, BaseException):
                raise error
        return recorded

    async def _write_final(self, deliveries: list[Delivery], outcome: Outcome) -> Recorded | None:
        delay, deadline = 0.5, time.monotonic() + LEDGER_HOLD_S
        while True:
            try:
                # The recalled first: a retry after a failed final write must not write them twice.
                await self._spool.durable([e.job_id for e in outcome.recorded], self._context.ledger)
                await self._context.ledger.write(outcome.final)
                return Recorded.WRITTEN
            except EventTooLarge as exc:  # outputs the size check let through (encoding overhead): fail just those
                log.warning("%s", exc)
                outcome.replace_too_large(set(exc.job_ids), str(exc))
                continue
            except BrokerError as exc:
                held = not _channel_gone(deliveries) and self.state != "stopping" and time.monotonic() < deadline
                log.warning("could not record %d results (%s)%s", len(outcome.final), exc,
                            f"; holding them, next try in {delay:.1f}s" if held else "")
                if not held and self.state == "stopping" and not _channel_gone(deliveries):
                    return None  # handed back to run elsewhere: a spool would wait for this version's next worker here
                if not held:
                    return await self._spool_results(outcome)
            await asyncio.sleep(delay)
            delay = min(delay * 2, PAUSE_MAX_S)

    async def _spool_results(self, outcome: Outcome) -> Recorded | None:
        """Keep the final events on disk until the ledger takes them (the spool's flusher writes them)."""
        if not await self._spool.put(outcome.final):
            return None
        log.warning("spooled %d results in %s; they are written to the ledger once it takes writes again",
                    len(outcome.final), self._spool.directory)
        return Recorded.SPOOLED

    async def _forward(self, outcome: Outcome) -> bool:
        """Publish each pipeline job to its next stage, confirmed, before anything is acked.

        A crash after a publish and before the ack runs the stage again and publishes the
        job twice (same job id): the next stage may run it twice, the ledger keeps its
        first final state. A stage with no queue, or a full one, ends the job failed here;
        a broker that does not confirm hands the whole batch back (False).
        """
        for delivery, request, stage_event in list(outcome.forwards):
            hop = request.route.hop
            message = request.to_message(user_id=self._user_id)
            try:
                await self._connection.publish(message, self.topology.routing_key(hop.model, hop.version),
                                               self.topology.requests, mandatory=True)
            except (Unroutable, BrokerRejected) as exc:
                error = error_dict("stage_unavailable", f"stage {hop.model}:{hop.version} cannot take the job: {exc}")
                outcome.unforward(delivery, stage_event, replace(stage_event, status=FAILED, error=error, timings=None))
            except BrokerError as exc:
                log.warning("could not pass job %s on to stage %s (%s); handing the batch back", request.job_id, hop.model, exc)
                return False
        return True

    def _count(self, outcome: Outcome) -> None:
        # A pipeline stage's job passed on to the next stage is one this worker ran.
        self.stats.jobs += sum(1 for e in outcome.final if e.status == SUCCEEDED) + len(outcome.forwards)
        self.stats.failed += sum(1 for e in outcome.final if e.status == FAILED)
        for e in outcome.final:
            timings = e.timings or {}
            # The worker's view of a job's duration: its wait in the queue and its batch's run.
            total_s = (timings.get("queue_ms", 0.0) + timings.get("inference_ms", 0.0)) / 1000 if timings else None
            self.job_metrics.record(e.model, e.version, e.status.value, e.error, timings, total_s)
            if e.status != SUCCEEDED:
                log.info("job %s %s (%s) trace_id=%s", e.job_id, e.status.value, (e.error or {}).get("code", ""),
                         trace_id(e.trace))
            else:
                log.debug("job %s succeeded trace_id=%s", e.job_id, trace_id(e.trace))

    async def _reply(self, deliveries: list[Delivery], outcome: Outcome) -> None:
        await asyncio.gather(*(
            send_reply(self._connection, d, outcome.by_delivery[id(d)]) for d in deliveries
            if d.reply_to and id(d) in outcome.by_delivery and id(d) not in outcome.quiet
        ))

    async def _retry(self, outcome: Outcome) -> set[int]:
        """Send transient failures to wait out their backoff in the retry queue; the ids of those nacked instead."""
        nacked: set[int] = set()
        queue = self.topology.retry_queue(self.entry.name, self.version.version)
        for delivery, request, delay in outcome.retries:
            headers = {STARTS_HEADER: request.attempt, RETRIES_HEADER: request.retries + 1}
            try:
                await republish(self._connection, delivery, queue, headers, delay_s=delay)
            except BrokerError as exc:
                log.warning("could not queue the retry of %s (%s); the broker redelivers it", request.job_id, exc)
                await settle(delivery, requeue=True)
                await self.acks.finish(settled=[delivery])
                nacked.add(id(delivery))
        return nacked

    async def _hand_back_ran(self, deliveries: list[Delivery], outcome: Outcome) -> None:
        ran = [d for d in deliveries if id(d) in outcome.ran]
        await self._hand_back(ran, {}, started=True)
        await self._hand_back([d for d in deliveries if id(d) not in outcome.ran], {})

    async def _hand_back(self, deliveries: list[Delivery], headers: dict[str, Any], started: bool = False) -> None:
        """Republish and ack (the job keeps a clean delivery count); nack if the copy cannot be sent."""
        acked, nacked = [], []
        for delivery in deliveries:
            extra = dict(headers)
            if is_suspect(delivery):  # a copy has a clean count: the mark keeps it running alone and counted
                extra[SUSPECT_HEADER] = 1
            if started:
                extra[STARTS_HEADER] = header_int(delivery, STARTS_HEADER) + 1
            try:
                await republish(self._connection, delivery, self._queue_of(delivery), extra)
                acked.append(delivery)
            except BrokerError:
                await settle(delivery, requeue=True)
                nacked.append(delivery)
        await self.acks.finish(acked=acked, settled=nacked)

    def _queue_of(self, delivery: Delivery) -> str:
        return self.high_queue_name if (delivery.headers or {}).get(PRIORITY_HEADER) == HIGH else self.queue_name

    async def _on_command(self, command: dict[str, Any]) -> None:
        if command["command"] == "drain":
            log.info("drain requested over the control exchange")
            self.request_stop()
        else:
            log.warning("unknown command %r", command["command"])

    async def _report_stats(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            current = self._record(self._lease.record.state)
            if current != self._lease.record:
                try:
                    await self._lease.update(current)
                except CoordinationError as exc:  # etcd down: the keeper reports it; stats are best effort
                    log.debug("stats update failed: %r", exc)

    async def on_drain(self) -> None:
        """Stop pulling: mark draining, cancel the consumer, hand back unbatched jobs."""
        if self._lease is not None:
            try:
                await self._lease.update(self._record(WorkerState.DRAINING))
            except CoordinationError as exc:  # etcd may be down while we stop; draining goes on
                log.warning("could not mark draining: %r", exc)
        for queue, tag in self._consumers:
            async with tolerant("cancelling a consumer (the broker returns its jobs anyway)", logging.WARNING):
                await asyncio.wait_for(queue.cancel(tag), 5)
        if self._batch_loop_task is not None:
            self._batch_loop_task.cancel()
            await asyncio.gather(self._batch_loop_task, return_exceptions=True)  # it must not batch anything after this
        unstarted = self.batcher.take_all()
        if unstarted:
            log.info("handing back %d jobs not started", len(unstarted))
            await self._hand_back(unstarted, {})

    async def wait_idle(self) -> None:
        while self._batches:
            await asyncio.gather(*list(self._batches), return_exceptions=True)
        await self._last_flush()

    async def _last_flush(self) -> None:
        """One more try at the spool before stopping; what is left waits for this version's next worker here."""
        if self._spool is None or not self._spool.pending or self._context is None:
            return
        try:
            await asyncio.wait_for(self._spool.flush(self._context.ledger), LAST_FLUSH_S)
        except (BrokerError, TimeoutError) as exc:
            log.warning("%d spooled batch(es) left in %s for the next worker of this version (%r)",
                        self._spool.pending, self._spool.directory, exc)

    async def on_close(self) -> None:
        for batch in list(self._batches):
            batch.cancel()
        await asyncio.gather(*list(self._batches), return_exceptions=True)


class WorkerCollector:
    """The worker's gauges, read from the counters it keeps anyway (no work per scrape)."""

    def __init__(self, worker: ShardWorker) -> None:
        self._worker = worker

    def collect(self) -> Any:
        w = self._worker
        labels = {"model": w.entry.name, "version": w.version.version, "worker": w.worker_id}
        state = w._lease.record.state.value if w._lease is not None else "starting"
        yield gauge("inferq_worker_inflight", "jobs in this worker's running batches", [(labels, w.stats.inflight)])
        yield gauge("inferq_worker_prefetched", "jobs delivered to this worker, not yet batched", [(labels, w.mailbox.qsize())])
        yield gauge("nv_inference_pending_request_count", "jobs at this worker not yet finished (prefetched and running)",
                    [({"model": w.entry.name, "version": w.version.version}, w.stats.inflight + w.mailbox.qsize())])
        yield gauge("inferq_worker_batches", "batches this worker ran", [(labels, w.stats.batches)], kind="counter")
        yield gauge("inferq_worker_spooled_batches", "finished batches on disk until the ledger takes their results",
                    [(labels, w._spool.pending if w._spool is not None else 0)])
        yield gauge("inferq_worker_state", "this worker's state (1 for the current one)",
                    [({**labels, "state": s}, int(s == state)) for s in ("starting", "warming", "ready", "draining")])


def _channel_gone(deliveries: list[Delivery]) -> bool:
    """Whether the deliveries' channel closed: the broker has taken them back, nothing can settle them now."""
    if not deliveries:
        return True
    try:
        return bool(deliveries[0].channel.is_closed)
    except aiormq.exceptions.ChannelInvalidStateError:  # aio-pika raises it for a closed channel
        return True


def spool_dir(settings: Settings, model: str, version: str) -> Path:
    """Where a model version's workers on this node spool results: shared, so a restarted worker flushes them."""
    return settings.state_dir / "spool" / model / version


def result_limit(settings: Settings) -> int:
    """The largest outputs a job may have: the setting, within one broker message (less room for the event around it)."""
    return min(settings.jobs.max_result_bytes, settings.broker.max_message_bytes - EVENT_OVERHEAD_BYTES)
