"""The edge's view of the job ledger: job id -> latest state and result.

Built by reading the ledger stream from its start, so every edge replica
holds the same states and a restarted edge loses nothing inside the
retention window. Events may arrive more than once or out of order
(at-least-once delivery, redelivered jobs): the first final state of a job
wins and a state never moves backwards. Memory is bounded: past
``max_jobs`` the oldest jobs are forgotten, and jobs older than ``ttl_s``
are dropped (a poll then answers 404, as documented).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from broker.messages import QUEUED, RUNNING, TERMINAL, JobEvent

_RANK = {QUEUED: 0, RUNNING: 1}


@dataclass
class JobState:
    """What an edge knows of one job."""

    job_id: str
    status: str = QUEUED
    model: str = ""
    version: str = ""
    tenant: str | None = None
    created_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0
    outputs: dict[str, Any] | None = None
    error: dict[str, str] | None = None
    timings: dict[str, float] | None = None
    seen_at: float = field(default_factory=time.time)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def apply(self, event: JobEvent) -> bool:
        """Fold one event in; return whether anything a client sees changed."""
        before = (self.status, self.attempts, self.created_at, self.started_at)
        self.model = self.model or event.model
        self.version = self.version or event.version
        self.tenant = self.tenant or event.tenant
        if event.status == QUEUED or self.created_at is None:
            self.created_at = min(self.created_at or event.ts, event.ts)
        self.attempts = max(self.attempts, event.attempt)
        if event.status == RUNNING and self.started_at is None:
            self.started_at = event.ts
        if not self.terminal:
            self._advance(event)
        return before != (self.status, self.attempts, self.created_at, self.started_at)

    def _advance(self, event: JobEvent) -> None:
        if event.status in TERMINAL:
            self.status, self.finished_at = event.status, event.ts
            self.outputs = dict(event.outputs) if event.outputs else None
            self.error = dict(event.error) if event.error else None
            self.timings = dict(event.timings) if event.timings else None
        elif _RANK[event.status] > _RANK[self.status]:
            self.status = event.status


class JobProjection:
    """All job states an edge knows, with waiters for long polls."""

    def __init__(self, max_jobs: int, ttl_s: float) -> None:
        self.max_jobs = max_jobs
        self.ttl_s = ttl_s
        self._jobs: OrderedDict[str, JobState] = OrderedDict()
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self.events_applied = 0

    def __len__(self) -> int:
        return len(self._jobs)

    def apply(self, events: list[JobEvent]) -> None:
        """Fold a ledger message's events in and wake whoever waits on those jobs."""
        for event in events:
            state = self._jobs.get(event.job_id)
            if state is None:
                state = self._jobs[event.job_id] = JobState(event.job_id)
            if state.apply(event):
                self._wake(event.job_id)
            self.events_applied += 1
        self._evict()

    def get(self, job_id: str) -> JobState | None:
        """The job's state, or None if unknown, forgotten or past its TTL."""
        state = self._jobs.get(job_id)
        if state is not None and self._expired(state, time.time()):
            return None
        return state

    async def wait_change(self, job_id: str, timeout: float) -> None:
        """Return when the job's visible state changes, or after ``timeout`` seconds."""
        future = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(job_id, []).append(future)
        try:
            await asyncio.wait_for(future, timeout)
        except TimeoutError:
            pass
        finally:
            waiters = self._waiters.get(job_id)
            if waiters is not None and future in waiters:
                waiters.remove(future)
                if not waiters:
                    del self._waiters[job_id]

    def _wake(self, job_id: str) -> None:
        for future in self._waiters.pop(job_id, []):
            if not future.done():
                future.set_result(None)

    def _expired(self, state: JobState, now: float) -> bool:
        return (state.created_at or state.seen_at) + self.ttl_s < now

    def _evict(self) -> None:
        now = time.time()
        while self._jobs:
            oldest = next(iter(self._jobs.values()))
            if len(self._jobs) <= self.max_jobs and not self._expired(oldest, now):
                break
            self._jobs.popitem(last=False)
