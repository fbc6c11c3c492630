"""The job service behind the HTTP API: submit, look up, wait for and cancel jobs.

No HTTP here: handlers translate requests into these calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from inferq.runtime.records import ModelRecord
from inferq.runtime.signature import validate
from inferq.broker.connection import BrokerConnection
from inferq.broker.ledger import LedgerWriter
from inferq.broker.messages import (CANCELLED, EXPIRED, QUEUED, RUNNING, JobEvent, JobRequest, check_job_id, error_dict,
                                    new_job_id)
from inferq.broker.ratelog import RateLimitedLog
from inferq.broker.stages import Hop, PipelineRoute
from inferq.broker.tail import LedgerTail
from inferq.broker.trace import trace_id
from inferq.broker.identity import broker_user
from inferq.broker.topology import Topology
from inferq.edge.chunks import batch_rows, chunk_count, derive, split_inputs
from inferq.edge.health import VersionHealth
from inferq.edge.idempotency import IdempotencyRecord, IdempotencyStore, request_digest
from inferq.edge.models import ModelDirectory
from inferq.edge.projection import JobProjection, JobState, chunk_id
from inferq.edge.results import ResultReader
from inferq.edge.routing import Routing
from inferq.edge.shadow import ShadowMirror
from inferq.errors import (BrokerError, CodecError, Conflict, IdempotencyMismatch, InferqError, InvalidInput, LedgerBehind,
                           NotFound)

log = logging.getLogger("inferq.edge.jobs")

IDEMPOTENCY_NS = uuid.UUID("5d1d7c39-63f2-4a8f-9a3e-4f6a1c0e9b21")
SYNC_TIMEOUT_S = 10.0  # reading back a sync marker (a lagging tail first works through its backlog)
CATCH_UP_WAIT_S = 5.0  # a request waits this long for a starting or reconnected tail before a 503
CHUNK_PUBLISH_WINDOW = 32  # a sharded job's chunks published at once, before their confirms are awaited
EXPIRY_GRACE_S = 0.5  # past the TTL before an edge records the expiry: a worker's start just in time is seen first


@dataclass(frozen=True)
class Submission:
    """A validated-to-be job as a client asked for it."""

    model: str
    version: str | None
    inputs: Mapping[str, np.ndarray]
    outputs: tuple[str, ...] | None = None
    parameters: Mapping[str, Any] | None = None
    tenant: str | None = None
    idempotency_key: str | None = None
    ttl_s: float | None = None
    priority: str = "normal"  # "high" goes ahead of every normal job of its model version still waiting
    alias: str | None = None  # pinned to an alias (/v1/models/{m}/aliases/{a}/jobs)
    route_key: str | None = None  # the sticky key of a traffic split (X-Inferq-Route-Key)
    shard: int | None = None  # split into this many chunk sub-jobs (?shard=N); None: only past max_batch_size
    traceparent: str | None = None  # the edge's W3C span of this job (broker/trace.py); travels in the AMQP headers
    webhook: Mapping[str, Any] | None = None  # {"url", "events"}, its URL checked by the SSRF guard


def idempotent_job_id(tenant: str | None, model: str, key: str) -> str:
    """The same (tenant, model, key) always names the same job, on every edge."""
    if not key or len(key) > 256:
        raise CodecError("Idempotency-Key must be 1-256 characters")
    return uuid.uuid5(IDEMPOTENCY_NS, f"{tenant or ''}\x00{model}\x00{key}").hex


class JobService:
    """Submits jobs to the broker and answers from the ledger projection.

    Every answer that decides something (a cancel, an expiry, a miss) is taken
    after the tail has read everything written to the ledger before the
    request: the ledger's order decides, so every edge, and the same edge
    after a restart, gives the same answer.
    """

    def __init__(
        self,
        connection: BrokerConnection,
        topology: Topology,
        directory: ModelDirectory,
        projection: JobProjection,
        tail: LedgerTail,
        ledger: LedgerWriter,
        cancels: LedgerWriter,
        default_ttl_s: float,
        idempotency: IdempotencyStore,
        routing: Routing | None = None,
        shadows: ShadowMirror | None = None,
        results: ResultReader | None = None,
    ) -> None:
        self.connection = connection
        self.topology = topology
        self.directory = directory
        self.projection = projection
        self.tail = tail
        self.ledger = ledger
        self.cancels = cancels
        self.default_ttl_s = default_ttl_s
        self.idempotency = idempotency
        self._behind_log = RateLimitedLog(log)
        self.user_id = broker_user(connection.settings.url)  # workers honour a job's tenant header for this user only
        # Without a health view no gate opens: unpinned jobs go to stable (the fallback is never held back).
        self.routing = routing or Routing(directory, VersionHealth(None, topology.namespace, 0))
        self.shadows = shadows
        self.results = results  # None: every output is kept in the projection

    @property
    def results_read(self) -> int:
        """How many large results this edge read back from the ledger."""
        return self.results.reads if self.results is not None else 0

    async def outputs(self, state: JobState) -> dict[str, Any] | None:
        """A job's outputs (wire tensors): the projection's, or read back from the ledger when it holds them out.

        Raises ResultExpired (410) when the ledger's retention dropped them.
        """
        if self.results is None or not state.held_out:
            return state.outputs
        return await self.results.outputs(state)

    async def submit(self, sub: Submission, wait_s: float = 0.0) -> tuple[JobState, bool]:
        """Queue a job once the broker confirmed it; return its state and whether it is new.

        The version comes from the registry's routing (:mod:`inferq.edge.routing`): pinned, or
        through the traffic split by the route key, the idempotency key or the job id. With
        ``wait_s`` the state is the one after waiting up to that long for the job to finish.
        """
        record = await self.directory.record(sub.model, sub.version, sub.alias)
        keyed = sub.idempotency_key is not None
        job_id = idempotent_job_id(sub.tenant, sub.model, sub.idempotency_key) if keyed else new_job_id()
        if wait_s <= 0:
            return await self._queue(sub, record, job_id)
        # Watched from before the publish: under load a worker can finish the job before the queued
        # event's confirm, and a large result seen go by then is handed to this wait, not read back.
        with self.projection.watching(job_id):
            _, new = await self._queue(sub, record, job_id)
            return await self.get(job_id, sub.tenant, wait_s), new

    async def _queue(self, sub: Submission, record: ModelRecord, job_id: str) -> tuple[JobState, bool]:
        keyed = sub.idempotency_key is not None
        routed = self.routing.choose(record, sub.version, sub.alias, sub.route_key or sub.idempotency_key or job_id)
        version = routed.signature
        request = JobRequest(
            job_id, sub.inputs, sub.outputs, sub.parameters or {}, tenant=sub.tenant, ttl_s=self._ttl(sub.ttl_s),
            priority=sub.priority, route=pipeline_route(record, sub.outputs), traceparent=sub.traceparent,
            webhook=sub.webhook, alias=routed.route.alias or None,
        )
        validate(request.inputs, request.outputs, version, self.directory.allow_nan(sub.model))
        # Stamped before the publish: a worker may start the job before the queued event is written.
        chunks = _chunks(record, request, sub.shard)
        event = JobEvent(job_id, QUEUED, sub.model, version.version, tenant=sub.tenant, ttl_s=request.ttl_s,
                         alias=routed.route.alias or None, chunks=chunks if chunks > 1 else 0, trace=sub.traceparent,
                         webhook=sub.webhook)
        if keyed:
            state, new = await self._submit_once(sub, request, event)
        else:
            await self._publish(request, event)
            state, new = await self._record_queued(event), True
        log.debug("job %s queued for %s:%s trace_id=%s", job_id, sub.model, version.version, trace_id(sub.traceparent))
        if new and routed.shadow is not None and self.shadows is not None and request.route is None and not event.chunks:
            await self.shadows.mirror_request(request, sub.model, routed.shadow)
        return state, new

    async def _submit_once(self, sub: Submission, request: JobRequest, event: JobEvent) -> tuple[JobState, bool]:
        digest = request_digest(sub.model, sub.version, sub.inputs, sub.outputs, sub.parameters)
        record = IdempotencyRecord(request.job_id, digest, sub.model, event.version, claimed_at=event.ts)
        claim, mine = await self.idempotency.claim(record, lambda job_id: self.projection.get(job_id) is not None)
        if not mine:
            if claim.record.digest != digest:
                raise IdempotencyMismatch("this Idempotency-Key was used with a different request "
                                          "(model, version, inputs, outputs or parameters); use a new key")
            return self._replayed(claim.record, sub.tenant), False
        try:
            await self._publish(request, event)
        except InferqError:
            await self.idempotency.release(claim)
            raise
        await self.idempotency.confirm(claim)
        return await self._record_queued(event), True

    def _replayed(self, record: IdempotencyRecord, tenant: str | None) -> JobState:
        # The job as this edge knows it, else as the first submit answered it: accepted, queued.
        known = self.projection.get(record.job_id)
        if known is not None:
            return known
        return JobState(record.job_id, model=record.model, version=record.version, tenant=tenant,
                        created_at=record.claimed_at)

    async def _publish(self, request: JobRequest, event: JobEvent) -> None:
        if event.chunks:
            await self._publish_chunks(request, event)
            return
        if request.route is not None:  # a pipeline job goes to its first stage
            routing_key = self.topology.routing_key(request.route.hop.model, request.route.hop.version)
        else:
            routing_key = self.topology.routing_key(event.model, event.version)
        await self.connection.publish(request.to_message(user_id=self.user_id), routing_key, self.topology.requests, mandatory=True)

    async def _publish_chunks(self, request: JobRequest, event: JobEvent) -> None:
        """Publish a sharded job's chunks (each confirmed) and record them queued, before the parent is."""
        routing_key = self.topology.routing_key(event.model, event.version)
        chunks = [replace(request, job_id=chunk_id(request.job_id, i), inputs=part)
                  for i, part in enumerate(split_inputs(request.inputs, event.chunks))]
        for start in range(0, len(chunks), CHUNK_PUBLISH_WINDOW):  # confirms awaited a window at a time
            await asyncio.gather(*(self.connection.publish(c.to_message(user_id=self.user_id), routing_key, self.topology.requests,
                                                           mandatory=True) for c in chunks[start:start + CHUNK_PUBLISH_WINDOW]))
        queued = [replace(event, job_id=c.job_id, chunks=0) for c in chunks]
        await self.ledger.write(queued)
        self.projection.apply(queued)

    async def _record_queued(self, event: JobEvent) -> JobState:
        await self.ledger.write([event])
        # Harmless outside the ledger's order: a queued event never changes a later state.
        self.projection.apply([event])
        # The answer is the state at acceptance, queued, even if a worker has started it meanwhile.
        accepted = JobState(event.job_id)
        accepted.apply(event)
        return accepted

    def _ttl(self, ttl_s: float | None) -> float:
        if ttl_s is None:
            return self.default_ttl_s
        if not 0 < ttl_s <= self.default_ttl_s:
            raise InvalidInput(f"ttl must be between 0 and {self.default_ttl_s:g} seconds")
        return ttl_s

    async def _is_pipeline(self, model: str) -> bool:
        try:
            return (await self.directory.record(model)).pipeline
        except InferqError:
            return False

    async def find(self, job_id: str) -> JobState | None:
        """The job's state; on a miss, first catch up with the ledger (read-your-writes across edges)."""
        state = self.projection.get(job_id)
        if state is None:
            state = await self._synced(job_id)
        return state

    async def _synced(self, job_id: str) -> JobState | None:
        """The job's state once this edge has read everything written to the ledger before the call.

        Raises LedgerBehind (503) rather than answer from a view that may lag:
        a miss then is not a 404, and a decision is not taken on stale state.
        """
        if not self.tail.caught_up:
            try:
                await asyncio.wait_for(self.tail.wait_caught_up(), CATCH_UP_WAIT_S)
            except TimeoutError:
                raise LedgerBehind("this edge is still reading the job ledger (starting or reconnected); retry shortly") from None
        try:
            await asyncio.wait_for(self.tail.sync(), SYNC_TIMEOUT_S)
        except (BrokerError, TimeoutError) as exc:
            self._behind_log.warning("could not catch up with the ledger: %r", exc)
            raise LedgerBehind(f"this edge could not catch up with the job ledger ({exc!r}); retry shortly") from exc
        return self.projection.get(job_id)

    async def get(self, job_id: str, tenant: str | None, wait_s: float = 0.0) -> JobState:
        """The job's state, waiting up to ``wait_s`` for it to finish; a job past its TTL is expired here."""
        check_job_id(job_id)
        state = await self.find(job_id)
        if state is None or state.tenant != tenant:
            raise NotFound(f"job {job_id} is not known (never submitted, or past its retention)")
        with self.projection.watching(job_id) if wait_s > 0 else contextlib.nullcontext():
            return await self._settled(state, wait_s)

    async def _settled(self, state: JobState, wait_s: float) -> JobState:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while True:
            state = await derive(state, self.projection.get, self.outputs)  # a sharded job is what its chunks make it
            if state.overdue(time.time(), EXPIRY_GRACE_S):
                state = await self._expire(state)
            remaining = deadline - loop.time()
            if state.terminal or remaining <= 0:
                return state
            await self.projection.wait_change(state.job_id, wait_slice(state, remaining))
            state = self.projection.get(state.job_id) or state

    async def _expire(self, state: JobState) -> JobState:
        """Record that a job not started within its TTL expired, unless the ledger shows it started."""
        try:
            state = await self._synced(state.job_id) or state
            if not state.overdue(time.time(), EXPIRY_GRACE_S):
                return state
            # The ledger's first final state wins: a worker's later events, or the dead-letter
            # reaper's own "expired", change nothing. Workers refuse the expired message as well.
            await self.ledger.write([JobEvent(state.job_id, EXPIRED, state.model, state.version, tenant=state.tenant,
                                              error=error_dict("expired", "job was not started within its TTL"))])
            return await self._synced(state.job_id) or state
        except BrokerError as exc:  # LedgerBehind included: answer what is known; a later poll decides
            self._behind_log.warning("could not record the expiry of job %s: %r", state.job_id, exc)
            return state

    async def cancel(self, job_id: str, tenant: str | None) -> JobState:
        """Cancel a queued job (it will not run); a finished job is returned as it is.

        Decided and answered from the ledger's order, never from a local apply.
        """
        state = await self.get(job_id, tenant)
        if not state.terminal:
            state = await self._synced(job_id) or state
        if state.terminal:
            return state
        event = JobEvent(job_id, CANCELLED, state.model, state.version, tenant=tenant)
        if state.chunks:  # the parent and every chunk: those still queued never run
            events = [event] + [replace(event, job_id=chunk_id(job_id, i)) for i in range(state.chunks)]
            await self.cancels.write(events)
            await self.ledger.write(events)
            return await derive(await self._synced(job_id) or state, self.projection.get, self.outputs)
        if state.status == RUNNING:
            if not state.stages and not await self._is_pipeline(state.model):
                raise Conflict(f"job {job_id} is running; it will finish and cannot be cancelled now")
            # The stage running it finishes; its worker records the cancellation at the stage boundary.
            await self.cancels.write([event])
            return state
        await self.cancels.write([event])
        await self.ledger.write([event])
        return await self._synced(job_id) or state


def _chunks(record: Any, request: JobRequest, asked: int | None) -> int:
    """How many chunks a job becomes: ``?shard=N``, or enough to keep each within max_batch_size (1: not sharded)."""
    if request.route is not None or not request.inputs:
        if asked is not None and asked > 1:
            raise InvalidInput("a pipeline job cannot be sharded (yet); submit its chunks as jobs of their own")
        return 1
    if asked is None:
        rows = {v.shape[0] if v.ndim else -1 for v in request.inputs.values()}
        if len(rows) != 1 or -1 in rows:  # inputs without a shared batch dimension are never split unasked
            return 1
    return chunk_count(batch_rows(request.inputs), record.max_batch_size, asked)


def pipeline_route(record: Any, outputs: tuple[str, ...] | None) -> PipelineRoute | None:
    """The route of a job to ``record`` if it is a pipeline: its stages from the first, and the outputs it returns."""
    if not record.pipeline:
        return None
    hops = tuple(Hop(st.model, st.version, st.inputs) for st in record.stages)
    wanted = outputs or tuple(spec.name for spec in record.versions[record.default_version].outputs)
    return PipelineRoute(record.name, 0, hops, tuple(wanted))


def wait_slice(state: JobState, remaining: float) -> float:
    """How long a long poll may sleep: until the job changes, or until its TTL runs out (once)."""
    expires = state.expires_at
    until_overdue = None if expires is None else expires + EXPIRY_GRACE_S - time.time() + 0.01
    if state.status != QUEUED or until_overdue is None or until_overdue <= 0:
        return remaining  # an expiry that could not be recorded just now is tried again at the end
    return min(remaining, until_overdue)
