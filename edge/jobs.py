"""The job service behind the HTTP API: submit, look up, wait for and cancel jobs.

No HTTP here: handlers translate requests into these calls.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from actors.planner import validate
from broker.connection import BrokerConnection
from broker.ledger import LedgerTail, LedgerWriter
from broker.messages import CANCELLED, QUEUED, RUNNING, JobEvent, JobRequest, check_job_id, new_job_id
from broker.topology import Topology
from edge.models import ModelDirectory
from edge.projection import JobProjection, JobState
from runtime.errors import BrokerError, CodecError, Conflict, InvalidInput, NotFound

log = logging.getLogger("inferq.edge.jobs")

IDEMPOTENCY_NS = uuid.UUID("5d1d7c39-63f2-4a8f-9a3e-4f6a1c0e9b21")


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


def idempotent_job_id(tenant: str | None, model: str, key: str) -> str:
    """The same (tenant, model, key) always names the same job, on every edge."""
    if not key or len(key) > 256:
        raise CodecError("Idempotency-Key must be 1-256 characters")
    return uuid.uuid5(IDEMPOTENCY_NS, f"{tenant or ''}\x00{model}\x00{key}").hex


class JobService:
    """Submits jobs to the broker and answers from the ledger projection."""

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
    ) -> None:
        self.connection = connection
        self.topology = topology
        self.directory = directory
        self.projection = projection
        self.tail = tail
        self.ledger = ledger
        self.cancels = cancels
        self.default_ttl_s = default_ttl_s

    async def submit(self, sub: Submission) -> tuple[JobState, bool]:
        """Queue a job once the broker confirmed it; return its state and whether it is new."""
        version = await self.directory.version(sub.model, sub.version)
        if sub.idempotency_key is not None:
            job_id = idempotent_job_id(sub.tenant, sub.model, sub.idempotency_key)
            existing = await self.find(job_id)
            if existing is not None:
                return existing, False
        else:
            job_id = new_job_id()
        request = JobRequest(
            job_id, sub.inputs, sub.outputs, sub.parameters or {}, tenant=sub.tenant, ttl_s=self._ttl(sub.ttl_s)
        )
        validate(request, version, self.directory.allow_nan(sub.model))
        routing_key = self.topology.routing_key(sub.model, version.version)
        await self.connection.publish(request.to_message(), routing_key, self.topology.requests, mandatory=True)
        event = JobEvent(job_id, QUEUED, sub.model, version.version, tenant=sub.tenant)
        await self.ledger.write([event])
        self.projection.apply([event])
        return self.projection.get(job_id), True

    def _ttl(self, ttl_s: float | None) -> float:
        if ttl_s is None:
            return self.default_ttl_s
        if not 0 < ttl_s <= self.default_ttl_s:
            raise InvalidInput(f"ttl must be between 0 and {self.default_ttl_s:g} seconds")
        return ttl_s

    async def find(self, job_id: str) -> JobState | None:
        """The job's state; on a miss, first catch up with the ledger (read-your-writes across edges)."""
        state = self.projection.get(job_id)
        if state is None:
            try:
                await asyncio.wait_for(self.tail.sync(), 5)
            except (BrokerError, TimeoutError) as exc:
                log.warning("could not catch up with the ledger: %r", exc)
            state = self.projection.get(job_id)
        return state

    async def get(self, job_id: str, tenant: str | None, wait_s: float = 0.0) -> JobState:
        """The job's state, waiting up to ``wait_s`` for it to finish."""
        check_job_id(job_id)
        state = await self.find(job_id)
        if state is None or state.tenant != tenant:
            raise NotFound(f"job {job_id} is not known (never submitted, or past its retention)")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while not state.terminal and (remaining := deadline - loop.time()) > 0:
            await self.projection.wait_change(job_id, remaining)
            state = self.projection.get(job_id) or state
        return state

    async def cancel(self, job_id: str, tenant: str | None) -> JobState:
        """Cancel a queued job (it will not run); a finished job is returned as it is."""
        state = await self.get(job_id, tenant)
        if state.terminal:
            return state
        if state.status == RUNNING:
            raise Conflict(f"job {job_id} is running; it will finish and cannot be cancelled now")
        event = JobEvent(job_id, CANCELLED, state.model, state.version, tenant=tenant)
        await self.cancels.write([event])
        await self.ledger.write([event])
        self.projection.apply([event])
        return self.projection.get(job_id) or state
