"""The edge's view of the job ledger: job id -> latest state and result.

Built by reading the ledger stream's retention window, so every edge
replica holds the same states and a restarted edge loses nothing inside it.
Events may arrive more than once or out of order (at-least-once delivery,
redelivered jobs): the first final state of a job wins and a state never
moves backwards. Memory is bounded: past ``max_jobs`` the least recently
updated jobs are forgotten, and the projection keeps to a byte budget
(:attr:`JobProjection.bytes`, see README "Limits"): each job counts
``JOB_BYTES`` plus the outputs it keeps inline. Outputs over the inline
limit are never kept: the state remembers the stream offset of the ledger
message that carries them, and :mod:`inferq.edge.results` reads them back
on a poll. Past the budget, inline outputs are dropped the same way, oldest
first, and only then whole jobs, least recently updated first. Retention counts from a job's last event (its
final state), or from the end of its own TTL while it is still waiting:
a job that expires or finishes late stays visible for the whole window
(a poll after that answers 404, as documented).
"""

from __future__ import annotations

import asyncio
import time
import collections
import contextlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from inferq.broker.messages import QUEUED, RUNNING, TERMINAL, JobEvent

_RANK = {QUEUED: 0, RUNNING: 1}
CHUNK_MARK = ".c"


def chunk_id(parent: str, index: int) -> str:
    """The job id of chunk ``index`` of a sharded job (see :mod:`inferq.edge.chunks`)."""
    return f"{parent}{CHUNK_MARK}{index:05d}"


def parent_of(job_id: str) -> str | None:
    """The sharded job a chunk id belongs to, None for any other id."""
    head, mark, tail = job_id.rpartition(CHUNK_MARK)
    return head if mark and len(tail) == 5 and tail.isdigit() else None
MAX_STARTS = 64  # a job is failed as poison long before this
# What one job's state costs beside its inline outputs: the JobState, its strings and dicts, the two
# dict slots; measured with tracemalloc for a finished job with timings (tests/test_large_results.py).
JOB_BYTES = 2048


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
    ttl_s: float | None = None  # the job's own TTL, from its queued event
    updated_at: float | None = None  # ts of its latest event
    alias: str | None = None  # the alias that routed it, if it was not pinned to a version
    shadow_of: str | None = None  # set on a shadow job: the job it mirrors
    trace: str | None = None  # its W3C traceparent, as its first event carrying one says
    worker: str | None = None  # the worker of its latest start
    seen_at: float = field(default_factory=time.time)
    starts: set[tuple[str, str]] = field(default_factory=set)  # distinct (worker, run) of its running events
    stage: str | None = None  # a pipeline job: the stage it is at (the latest one it reached)
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)  # a pipeline job: each finished stage's timings
    chunks: int = 0  # a sharded job: how many chunk sub-jobs it was split into
    progress: dict[str, int] | None = None  # a sharded job: {done, total} chunks (derived on read)
    result_offset: int | None = None  # stream offset of the ledger message that carries the final event
    result_bytes: int = 0  # the outputs' tensor bytes, kept inline or not
    result_expired: bool = False  # the stream's retention dropped that message: the result is gone
    webhook: dict[str, Any] | None = None  # {"url", "events"}, from the first event that carried it
    webhook_deliveries: dict[str, dict[str, Any]] | None = None  # event ("start", "completed") -> latest progress

    @property
    def held_out(self) -> bool:
        """Whether the job has outputs this edge does not keep, to be read back from the ledger."""
        return self.outputs is None and self.result_offset is not None and self.result_bytes > 0

    @property
    def position(self) -> tuple[int, int]:
        """Where the job is in its life, for event streams: (status rank, attempts); it never goes back."""
        return (3 if self.terminal else _RANK[self.status] + 1, self.attempts)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def expires_at(self) -> float | None:
        """When a job that has not started by then expires (None: no TTL known)."""
        if self.ttl_s is None or self.created_at is None:
            return None
        return self.created_at + self.ttl_s

    def overdue(self, now: float, grace_s: float = 0.0) -> bool:
        """Whether the job is still queued ``grace_s`` after its TTL ran out."""
        expires = self.expires_at
        return self.status == QUEUED and expires is not None and expires + grace_s < now

    def retained_until(self, retention_s: float) -> float:
        """When an edge may forget the job: the retention after its last event, or after its TTL while it waits."""
        last = self.updated_at or self.seen_at
        if self.terminal or self.expires_at is None:
            return last + retention_s
        return max(last, self.expires_at) + retention_s

    def apply(self, event: JobEvent, offset: int | None = None) -> bool:
        """Fold one event in (``offset``: its ledger message's); return whether anything a client sees changed."""
        if event.webhook_delivery:  # the webhook sender's progress: the job itself is as it was
            self._delivered(event.webhook_delivery)
            return False
        if event.webhook and self.webhook is None:
            self.webhook = dict(event.webhook)
        before = (self.status, self.attempts, self.created_at, self.started_at)
        if event.status == QUEUED:  # the submitting edge's word: a pipeline's stage events name the stage's model
            self.model, self.version = event.model or self.model, event.version or self.version
        else:
            self.model = self.model or event.model
            self.version = self.version or event.version
        self.tenant = self.tenant or event.tenant
        self.alias = self.alias or event.alias
        self.shadow_of = self.shadow_of or event.shadow_of
        self.chunks = self.chunks or event.chunks
        self.trace = self.trace or event.trace
        if event.worker and (event.status == RUNNING or (event.status in TERMINAL and not self.terminal)):
            self.worker = event.worker
        if event.status == QUEUED or self.created_at is None:
            self.created_at = min(self.created_at or event.ts, event.ts)
        if event.status == RUNNING and event.run and len(self.starts) < MAX_STARTS:
            # A pipeline job starts once per stage: its attempts are those of the stage that took most.
            self.starts.add((f"{event.stage}\x00{event.worker or ''}" if event.stage else event.worker or "", event.run))
        self.attempts = max(self.attempts, event.attempt, _most_starts(self.starts))
        self.updated_at = max(self.updated_at or event.ts, event.ts)
        if event.ttl_s is not None and self.ttl_s is None:
            self.ttl_s = event.ttl_s
        if event.status == RUNNING and self.started_at is None:
            self.started_at = event.ts
        if event.stage:
            self._stage(event)
        if not self.terminal:
            self._advance(event, offset)
        return before != (self.status, self.attempts, self.created_at, self.started_at)

    def _stage(self, event: JobEvent) -> None:
        known = self.stages.get(event.stage)
        if not self.stages or event.ts >= max(st["at"] for st in self.stages.values()):
            self.stage = event.stage
        if known is None:
            known = self.stages[event.stage] = {"at": event.ts}
        if event.timings and "inference_ms" not in known:  # the first run that finished the stage
            known.update({k: event.timings[k] for k in ("queue_ms", "inference_ms", "batch_size") if k in event.timings})
            if event.worker:
                known["worker"] = event.worker
    def _delivered(self, progress: Any) -> None:
        event = str(progress.get("event", ""))
        known = (self.webhook_deliveries or {}).get(event)
        # Redelivered or reordered progress: more attempts win, and a final state over pending.
        rank = (progress.get("state") != "pending", progress.get("attempts", 0))
        if known is None or rank >= (known.get("state") != "pending", known.get("attempts", 0)):
            self.webhook_deliveries = {**(self.webhook_deliveries or {}), event: dict(progress)}

    def _advance(self, event: JobEvent, offset: int | None) -> None:
        if event.status in TERMINAL:
            self.status, self.finished_at = event.status, event.ts
            self.outputs = dict(event.outputs) if event.outputs else None
            self.result_bytes = output_bytes(self.outputs)
            self.result_offset = offset if self.outputs else None
            self.error = dict(event.error) if event.error else None
            self.timings = dict(event.timings) if event.timings else None
        elif _RANK[event.status] > _RANK[self.status]:
            self.status = event.status


def _most_starts(starts: set[tuple[str, str]]) -> int:
    """Distinct starts of the job, counted per pipeline stage (a plain job has one "stage")."""
    per_stage: dict[str, int] = {}
    for worker, _ in starts:
        stage = worker.partition("\x00")[0] if "\x00" in worker else ""
        per_stage[stage] = per_stage.get(stage, 0) + 1
    return max(per_stage.values(), default=0)


def output_bytes(outputs: dict[str, Any] | None) -> int:
    """The tensor bytes of wire outputs (what the budget counts; names, dtypes and shapes are in JOB_BYTES)."""
    if not outputs:
        return 0
    return sum(len(t["data"]) if isinstance(t, dict) and isinstance(t.get("data"), (bytes, bytearray, memoryview)) else 0
               for t in outputs.values())


def cost(state: JobState) -> int:
    """What ``state`` counts against the projection's byte budget."""
    return JOB_BYTES + (state.result_bytes if state.outputs is not None else 0)


class JobProjection:
    """All job states an edge knows, with waiters for long polls, within ``max_jobs`` and ``max_bytes``."""

    def __init__(self, max_jobs: int, ttl_s: float, on_final: Callable[[JobState], None] | None = None,
                 max_bytes: int | None = None, inline_bytes: int | None = None,
                 on_change: Callable[[str | None, JobState], None] | None = None) -> None:
        self.max_jobs = max_jobs
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes  # None: bounded by max_jobs only
        self.inline_bytes = inline_bytes  # None: every output is kept inline
        self.bytes = 0  # the sum of cost() over the jobs held
        self.outputs_dropped = 0  # inline outputs dropped for the budget (read back on demand since)
        # Jobs with inline outputs that could be read back, oldest first: dropped first when over budget.
        self._inline: OrderedDict[str, None] = OrderedDict()
        # Called once per job, when it first becomes final (statistics); must be cheap and never raise.
        self._on_final = on_final
        # Called with the status before and the state after every visible change (webhooks); cheap, never raises.
        self.on_change = on_change
        # Called with a job's outputs as they leave the projection for being too large, when someone here waits
        # on the job: its answer then needs no read back from the stream (the result cache); cheap, never raises.
        self.on_held_out: Callable[[str, dict[str, Any]], None] | None = None
        self._jobs: OrderedDict[str, JobState] = OrderedDict()
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._watched: collections.Counter[str] = collections.Counter()  # jobs a client here waits on, how many
        self.events_applied = 0

    def __len__(self) -> int:
        return len(self._jobs)

    def apply(self, events: list[JobEvent], offset: int | None = None) -> None:
        """Fold a ledger message's events in and wake whoever waits on those jobs.

        ``offset`` is the stream offset of the message (None for an event the edge
        applies itself): outputs that came with one can be read back later.
        """
        now = time.time()
        for event in events:
            self.events_applied += 1
            state = self._jobs.get(event.job_id)
            if state is None:
                if event.webhook_delivery:  # progress of a job forgotten here: nothing to show it on
                    continue
                state = JobState(event.job_id)
                state.apply(event, offset)
                if not self._expired(state, now):  # a replay may start a little before the window
                    self._jobs[event.job_id] = state
                    self.bytes += self._hold(state, was_final=False)
                    self._wake(event.job_id)
                    if parent_of(event.job_id) is not None:
                        self._wake(parent_of(event.job_id))  # type: ignore[arg-type]
                    self._changed(None, state)
                    self._final(state, was_final=False)
                continue
            self._jobs.move_to_end(event.job_id)  # the head is the least recently updated job
            was_final, status, before = state.terminal, state.status, cost(state)
            changed = state.apply(event, offset)
            self.bytes += self._hold(state, was_final) - before
            if changed:
                self._wake(event.job_id)
                parent = parent_of(event.job_id)
                if parent is not None:  # a chunk moved: whoever waits on its sharded job looks again
                    self._wake(parent)
                self._changed(status, state)
            self._final(state, was_final)
        self._evict(now)

    def _changed(self, before: str | None, state: JobState) -> None:
        if self.on_change is not None:
            self.on_change(before, state)

    def jobs(self) -> list[JobState]:
        """Every job held now (listing): a snapshot of the states, not copies."""
        now = time.time()
        return [s for s in self._jobs.values() if not self._expired(s, now)]

    def _hold(self, state: JobState, was_final: bool) -> int:
        """Keep a newly final job's outputs inline only within the limit; return the state's cost."""
        if not was_final and state.terminal and state.outputs is not None and state.result_offset is not None:
            if self.inline_bytes is not None and state.result_bytes > self.inline_bytes:
                if self.on_held_out is not None and state.job_id in self._watched:
                    self.on_held_out(state.job_id, state.outputs)
                state.outputs = None
            else:
                self._inline[state.job_id] = None
        return cost(state)

    def _final(self, state: JobState, was_final: bool) -> None:
        if not was_final and state.terminal and self._on_final is not None:
            self._on_final(state)

    def states(self, newest_first: bool = False) -> Iterator[JobState]:
        """Every job state held, least recently updated first (or newest first); read-only views for /metrics and /ui."""
        return iter(reversed(self._jobs.values()) if newest_first else self._jobs.values())

    def get(self, job_id: str) -> JobState | None:
        """The job's state, or None if unknown, forgotten or past its TTL."""
        state = self._jobs.get(job_id)
        if state is not None and self._expired(state, time.time()):
            return None
        return state

    @contextlib.contextmanager
    def watching(self, job_id: str) -> Iterator[None]:
        """Within the block a client here waits on ``job_id``: a large result is handed to ``on_held_out``.

        For the whole wait, not one :meth:`wait_change`: a waiter woken by the
        running event is not registered again yet when the final event follows.
        """
        self._watched[job_id] += 1
        try:
            yield
        finally:
            self._watched[job_id] -= 1
            if not self._watched[job_id]:
                del self._watched[job_id]

    async def wait_change(self, job_id: str, timeout: float) -> bool:
        """Return True when the job's visible state changes, or False after ``timeout`` seconds."""
        future = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(job_id, []).append(future)
        try:
            await asyncio.wait_for(future, timeout)
            return True
        except TimeoutError:
            return False
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
        return state.retained_until(self.ttl_s) < now

    def _over_budget(self) -> bool:
        return self.max_bytes is not None and self.bytes > self.max_bytes

    def _evict(self, now: float) -> None:
        while self._inline and self._over_budget():  # outputs first: they can be read back
            job_id, _ = self._inline.popitem(last=False)
            state = self._jobs.get(job_id)
            if state is not None and state.outputs is not None:
                self.bytes -= state.result_bytes
                state.outputs = None
                self.outputs_dropped += 1
        while self._jobs:
            oldest = next(iter(self._jobs.values()))
            if len(self._jobs) <= self.max_jobs and not self._expired(oldest, now) and not self._over_budget():
                break
            job_id, state = self._jobs.popitem(last=False)
            self.bytes -= cost(state)
            self._inline.pop(job_id, None)
