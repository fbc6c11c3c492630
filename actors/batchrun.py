"""One batch of deliveries through the model: what each job became, and what to do with its delivery.

Every job ends in exactly one place of the :class:`Outcome`: a final event
(acked once the event is durable), a malformed delivery (rejected), or a retry
(republished to the retry queue), or the event it ended with in an earlier
run whose results were spooled (:mod:`inferq.actors.spool`): a redelivered job
whose event is spooled is not run again. A bad job fails alone: a malformed message,
an input that does not fit, an output the codec cannot carry or a run that
breaks a batched group (the group is rerun job by job). Suspect jobs, back
from a worker that died, run alone with their start counted first
(:mod:`inferq.actors.attempts`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

import aio_pika

from inferq.actors.attempts import StartBook, poisoned
from inferq.actors.cancels import CancelSet
from inferq.actors.planner import Group, plan
from inferq.actors.spool import Spool
from inferq.broker.codec import encode_tensor
from inferq.broker.handback import remaining_ttl
from inferq.broker.identity import Verdict
from inferq.broker.ledger import LedgerWriter
from inferq.broker.messages import (
    CANCELLED, EXPIRED, FAILED, RUNNING, SUCCEEDED, JobEvent, JobRequest, JobStatus, check_job_id, delivery_count, error_dict,
    submitted_at,
)
from inferq.errors import BrokerError, CodecError, CoordinationError, InferenceError
from inferq.runtime.repository import ModelEntry, ModelVersion
from inferq.runtime.session import ModelSession
from inferq.runtime.tenancy import Tenancy

log = logging.getLogger("inferq.shard")
LATER_S = 2.0  # how long a job whose publisher cannot be checked (etcd away) waits in the retry queue

Delivery = aio_pika.abc.AbstractIncomingMessage
Job = tuple[Delivery, JobRequest]


@dataclass
class Outcome:
    """What became of a batch; ``running`` are the pending writes of its ``running`` events."""

    final: list[JobEvent] = field(default_factory=list)
    by_delivery: dict[int, JobEvent] = field(default_factory=dict)
    rejected: list[Delivery] = field(default_factory=list)
    retries: list[tuple[Delivery, JobRequest, float]] = field(default_factory=list)
    ran: set[int] = field(default_factory=set)  # id() of deliveries whose job started
    quiet: set[int] = field(default_factory=set)  # id() of deliveries whose reply_to must not be answered
    running: list[asyncio.Future[None]] = field(default_factory=list)
    # Pipeline jobs done with this stage: (delivery, the next stage's job, this stage's event). Each is
    # published (confirmed) before the batch's events are written and its delivery acked.
    forwards: list[tuple[Delivery, JobRequest, JobEvent]] = field(default_factory=list)
    # Events of jobs that ended in an earlier run, spooled: already recorded (the spool flushes them), so
    # they are not written with ``final`` and not counted again.
    recorded: list[JobEvent] = field(default_factory=list)

    def forward(self, delivery: Delivery, request: JobRequest, event: JobEvent) -> None:
        self.final.append(event)
        self.forwards.append((delivery, request, event))

    def unforward(self, delivery: Delivery, stage_event: JobEvent, event: JobEvent) -> None:
        """The next stage could not take the job: it ends here with ``event`` instead of ``stage_event``."""
        self.forwards = [f for f in self.forwards if f[0] is not delivery]
        self.final = [e for e in self.final if e is not stage_event]
        self.end(delivery, event)

    def end(self, delivery: Delivery, event: JobEvent) -> None:
        self.final.append(event)
        self.by_delivery[id(delivery)] = event

    def recall(self, delivery: Delivery, event: JobEvent) -> None:
        """A job that ran before and whose event was spooled: it ends with that event, not run again."""
        self.recorded.append(event)
        if event.status.terminal:  # a pipeline stage's event: the job went on to its next stage then
            self.by_delivery[id(delivery)] = event

    def replace_too_large(self, job_ids: set[str], reason: str) -> None:
        """Turn the final events of ``job_ids`` into ``output_too_large`` failures without their outputs."""
        def shrunk(event: JobEvent) -> JobEvent:
            if event.job_id not in job_ids:
                return event
            return dataclasses.replace(event, status=FAILED, outputs=None, error=error_dict("output_too_large", reason))
        self.final = [shrunk(e) for e in self.final]
        self.by_delivery = {k: shrunk(e) for k, e in self.by_delivery.items()}


@dataclass
class Context:
    """What a batch run needs from its worker."""

    worker_id: str
    entry: ModelEntry
    version: ModelVersion
    session: ModelSession
    cancels: CancelSet
    starts: StartBook | None
    ledger: LedgerWriter
    max_result_bytes: int
    record_batch: Any  # callable(size)
    gate: asyncio.Lock = field(default_factory=asyncio.Lock)  # held around each session run
    tenancy: Tenancy | None = None  # None: every job is its header's tenant's, as with auth off
    max_intermediate_bytes: int = 8 * 1024 * 1024  # what a pipeline stage may pass on (jobs.max_intermediate_bytes)
    spool: Spool | None = None  # the worker's result spool: jobs whose events it holds are not run again


class BatchRun:
    """Runs one batch; :meth:`run` returns its :class:`Outcome` (it never raises for a job's sake)."""

    def __init__(self, ctx: Context, deliveries: list[Delivery]) -> None:
        self.ctx = ctx
        self.deliveries = deliveries
        self.out = Outcome()
        self.started = time.time()
        self.run_id = uuid.uuid4().hex[:8]
        self._prior: dict[str, int] = {}  # deadly starts recorded for a suspect before this one
        self._verdicts: dict[int, Verdict] = {}
        self._carried: dict[str, dict[str, Any]] = {}  # a pipeline job's tensors, for the stages after this one
        self._recalled: dict[str, JobEvent] = {}  # spooled events of jobs in this batch that ran before

    async def run(self) -> Outcome:
        if self.ctx.tenancy is not None:  # whose each job is, before anything is done with it
            self._verdicts = await self.ctx.tenancy.judge(self.deliveries)
        self._recalled = await self._recall()
        fresh, suspects = self._decode()
        if suspects:
            counts = [delivery_count(d) for d, _ in suspects]
            log.info("%d job(s) back from a dead worker run alone (RabbitMQ delivery counts %d-%d)", len(suspects), min(counts), max(counts))
        groups, rejected = plan(fresh, self.ctx.version, self.ctx.entry.config.allow_nan)
        for delivery, request, exc in rejected:
            self.out.end(delivery, self._event(request, FAILED, error=error_dict(exc.code, str(exc))))
        # A suspect is marked running when it really starts (it may wait for the batch's other runs).
        self._mark_running([r for g in groups for r in g.requests])
        for group in groups:
            await self._run_group(group)
        for delivery, request in suspects:
            await self._run_suspect(delivery, request)
        return self.out

    def _mark_running(self, requests: list[JobRequest]) -> None:
        # Queued in the writer now, so the stream has them before the batch's final events, which
        # then need not wait for their confirm (a round trip that a sub-millisecond run would pay).
        if requests:
            try:
                self.out.running.append(self.ctx.ledger.enqueue([self._event(r, RUNNING) for r in requests]))
            except BrokerError as exc:  # "running" is informational: the final events matter
                log.info("running events not recorded: %s", exc)

    async def _recall(self) -> dict[str, JobEvent]:
        spool = self.ctx.spool
        if spool is None:
            return {}
        held = [d.message_id for d in self.deliveries if d.message_id and spool.holds(d.message_id)]
        recalled = await spool.recall(held) if held else {}
        if recalled:
            log.info("%d redelivered job(s) end with the events spooled when they ran before, not run again (e.g. %s)",
                     len(recalled), next(iter(recalled)))
        return recalled

    def _decode(self) -> tuple[list[Job], list[Job]]:
        fresh, suspects = [], []
        for delivery in self.deliveries:
            verdict = self._verdicts.get(id(delivery))
            if verdict is not None and not verdict.reply:
                self.out.quiet.add(id(delivery))
            try:
                request = JobRequest.from_message(delivery)
            except CodecError as exc:
                self._malformed(delivery, exc, verdict.tenant if verdict else None)
                continue
            if request.job_id in self._recalled:
                self.out.recall(delivery, self._recalled[request.job_id])
                continue
            if verdict is not None:
                request = replace(request, tenant=verdict.tenant)
            if request.route is not None:
                staged = self._stage_request(delivery, request)
                if staged is None:
                    continue
                request = staged
            if verdict is not None and verdict.error:
                self.out.end(delivery, self._event(request, FAILED, error=dict(verdict.error)))
            elif request.job_id in self.ctx.cancels:
                # The edge recorded the cancellation too; repeating it is harmless (first final state wins)
                # and covers an edge that died between the cancel stream and the ledger.
                self.out.end(delivery, self._event(request, CANCELLED))
            elif _expired(delivery):
                self.out.end(delivery, self._event(request, EXPIRED, error=error_dict("expired", "job was not started within its TTL")))
            elif verdict is not None and verdict.later:
                self._wait(delivery, request)
            else:
                (suspects if request.suspect else fresh).append((delivery, request))
        return fresh, suspects

    def _stage_request(self, delivery: Delivery, request: JobRequest) -> JobRequest | None:
        """A pipeline job as this stage runs it: its own inputs (renamed), every output; None if it failed here."""
        route = request.route
        try:
            if (route.hop.model, route.hop.version) != (self.ctx.version.model, self.ctx.version.version):
                raise CodecError(f"the job's route says stage {route.hop.model}:{route.hop.version}, "
                                 f"but it reached {self.ctx.version.model}:{self.ctx.version.version}")
            feed = route.feed(request.inputs)
        except CodecError as exc:
            self.out.end(delivery, self._event(request, FAILED, error=error_dict(exc.code, str(exc))))
            return None
        self._carried[request.job_id] = dict(request.inputs)
        return replace(request, inputs=feed, outputs=None)

    def _forward(self, delivery: Delivery, request: JobRequest, pool: dict[str, Any], timings: dict[str, float]) -> None:
        """Hand a pipeline job on to its next stage (published by the worker before the ack), or end it here."""
        route = request.route
        if request.job_id in self.ctx.cancels:  # cancelled while this stage ran: it stops at the boundary
            self.out.end(delivery, self._event(request, CANCELLED))
            return
        left = remaining_ttl(delivery)
        if left is not None and left <= 0:
            self.out.end(delivery, self._event(request, EXPIRED, error=error_dict(
                "expired", f"the job's TTL ran out before stage {route.hops[route.index + 1].model}")))
            return
        carried = {name: pool[name] for name in route.needed_later() if name in pool}
        size = sum(int(getattr(v, "nbytes", 0)) for v in carried.values())
        if size > self.ctx.max_intermediate_bytes:
            message = (f"the tensors passed on to stage {route.hops[route.index + 1].model} are {size} bytes, over the "
                       f"{self.ctx.max_intermediate_bytes} byte limit (jobs.max_intermediate_bytes)")
            self.out.end(delivery, self._event(request, FAILED, error=error_dict("intermediate_too_large", message)))
            return
        after = replace(request, inputs=carried, outputs=None, route=route.advanced(), ttl_s=left, attempt=1, retries=0,
                        suspect=False)
        self.out.forward(delivery, after, self._event(request, RUNNING, timings=timings))

    def _wait(self, delivery: Delivery, request: JobRequest) -> None:
        """A job whose publisher cannot be checked now (etcd away) waits in the retry queue (it counts as a retry)."""
        left = remaining_ttl(delivery)
        if left is not None and left <= 0:
            self.out.end(delivery, self._event(request, EXPIRED, error=error_dict("expired", "job was not started within its TTL")))
        else:
            self.out.retries.append((delivery, request, LATER_S if left is None else min(LATER_S, left)))

    def _malformed(self, delivery: Delivery, exc: CodecError, tenant: str | None) -> None:
        log.warning("rejecting malformed job %r: %s", delivery.message_id, exc)
        self.out.rejected.append(delivery)
        try:
            job_id = check_job_id(delivery.message_id)
        except CodecError:
            return
        v = self.ctx.version
        self.out.end(delivery, JobEvent(job_id, FAILED, v.model, v.version, tenant=tenant, error=error_dict(exc.code, str(exc)),
                                        worker=self.ctx.worker_id))

    async def _admit_suspect(self, delivery: Delivery, request: JobRequest) -> bool:
        """Count a suspect's start before it runs; a suspect that used up its limit fails here instead."""
        starts, limit = self.ctx.starts, self.ctx.entry.config.queue.delivery_limit
        if starts is None:
            return True
        try:
            recorded = await starts.recorded(request.job_id)
            if poisoned(recorded, limit):
                message = f"job killed or stalled its worker {recorded + 1} times (limit {limit}); it is not run again"
                self.out.end(delivery, self._event(request, FAILED, error=error_dict("delivery_limit", message), attempt=request.attempt + recorded))
                log.warning("job %s is poison: %s", request.job_id, message)
                return False
            await starts.record(request.job_id, recorded + 1)
            self._prior[request.job_id] = recorded
        except CoordinationError as exc:  # etcd away: run it anyway; RabbitMQ's backstop limit still holds
            log.warning("cannot count the start of suspect job %s: %s", request.job_id, exc)
        return True

    async def _run_suspect(self, delivery: Delivery, request: JobRequest) -> None:
        await self._run_group(Group([delivery], [request], [0]), admit=(delivery, request))

    async def _run_group(self, group: Group, admit: Job | None = None) -> None:
        t0 = time.perf_counter()
        try:
            names = list(group.requests[0].outputs or []) or None
            # One session run at a time in the worker, so a worker that dies was running exactly one
            # group: a suspect's start is counted only once nothing else is running beside it.
            async with self.ctx.gate:
                if admit is not None:
                    if not await self._admit_suspect(*admit):
                        return
                    self._mark_running([admit[1]])
                self.ctx.record_batch(len(group.requests))
                self.out.ran.update(id(d) for d in group.jobs)
                t0 = time.perf_counter()
                outputs = await self.ctx.session.run(group.feed(), names, self.ctx.entry.config.run_timeout_s)
            per_job = group.split(outputs)
        except InferenceError as exc:
            if len(group.requests) > 1:
                # One job can break a batched run: run each alone so only that job fails.
                for single in group.singles():
                    await self._run_group(single)
                return
            self._failed_run(group.jobs[0], group.requests[0], exc)
            return
        timings = {"inference_ms": round((time.perf_counter() - t0) * 1000, 3), "batch_size": len(group.requests)}
        for delivery, request, out in zip(group.jobs, group.requests, per_job):
            self._succeeded(delivery, request, out, dict(timings, **_queue_ms(delivery, self.started)))

    def _succeeded(self, delivery: Delivery, request: JobRequest, outputs: dict[str, Any], timings: dict[str, float]) -> None:
        if request.route is not None:
            pool = {**self._carried.get(request.job_id, {}), **outputs}
            if not request.route.last:
                self._forward(delivery, request, pool, timings)
                return
            outputs = {name: pool[name] for name in request.route.outputs if name in pool}
        try:
            wire = {name: encode_tensor(value) for name, value in outputs.items()}
        except CodecError as exc:
            self.out.end(delivery, self._event(request, FAILED, error=error_dict("inference_error", f"an output cannot be sent: {exc}")))
            return
        size = sum(len(t["data"]) for t in wire.values())
        if size > self.ctx.max_result_bytes:
            message = f"outputs of {size} bytes are over the {self.ctx.max_result_bytes} byte limit (jobs.max_result_bytes)"
            self.out.end(delivery, self._event(request, FAILED, error=error_dict("output_too_large", message)))
            return
        self.out.end(delivery, self._event(request, SUCCEEDED, outputs=wire, timings=timings))

    def _failed_run(self, delivery: Delivery, request: JobRequest, exc: InferenceError) -> None:
        retry = self.ctx.entry.config.retry
        if retry.is_transient(str(exc)) and request.retries + 1 < retry.max_attempts:
            delay = retry.backoff_s * 2 ** request.retries
            left = remaining_ttl(delivery)
            if left is None or left > delay:
                log.warning("job %s attempt %d hit a transient error, retrying in %.2fs: %s", request.job_id, request.attempt, delay, exc)
                self.out.retries.append((delivery, request, delay))
                return
        self.out.end(delivery, self._event(request, FAILED, error=error_dict(exc.code, str(exc))))

    def _event(self, request: JobRequest, status: JobStatus, attempt: int | None = None, **extra: Any) -> JobEvent:
        v = self.ctx.version
        if request.route is not None:
            route = request.route
            extra["stage"] = route.stage
            if status == FAILED and extra.get("error"):
                error = extra["error"]
                extra["error"] = error_dict(error["code"], f"stage {route.stage} ({route.index + 1} of {len(route.hops)}) "
                                                           f"of pipeline {route.pipeline}: {error['message']}")
        return JobEvent(request.job_id, status, v.model, v.version, tenant=request.tenant,
                        attempt=attempt or request.attempt + self._prior.get(request.job_id, 0), worker=self.ctx.worker_id,
                        run=self.run_id if status in (RUNNING, SUCCEEDED, FAILED) else None, trace=request.traceparent,
                        webhook=request.webhook, alias=request.alias, **extra)


def _expired(delivery: Delivery) -> bool:
    """Whether a job's TTL (counted from its submission) ran out before it could start."""
    left = remaining_ttl(delivery)
    _, slack = submitted_at(delivery)
    return left is not None and left + slack < 0


def _queue_ms(delivery: Delivery, started: float) -> dict[str, float]:
    submitted, _ = submitted_at(delivery)
    if submitted is None:
        return {}
    return {"queue_ms": round(max(0.0, started - submitted) * 1000, 3)}
