"""The edge's cached view of the fleet, for ``/metrics`` and the status page: refreshed in the background.

A scrape or a page update never waits on the broker or etcd: one task reads queue
depths (a passive declare per queue), worker records and autoscaler decisions (one
etcd read each, for every model at once) every ``metrics.refresh_s``, and folds in the
ledger projection the edge keeps anyway (job states, oldest queued job, recent
latencies). When a refresh fails the previous facts stay, marked stale.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field

from inferq.broker.messages import QUEUED, SUCCEEDED
from inferq.broker.ratelog import RateLimitedLog
from inferq.edge.inventory import Inventory
from inferq.edge.models import ModelDirectory
from inferq.edge.projection import JobProjection, JobState
from inferq.errors import InferqError
from inferq.runtime.records import Decision, NodeRecord, WorkerRecord

log = logging.getLogger("inferq.edge.overview")

LATENCY_WINDOW_S = 300.0  # p50/p99 over jobs finished this recently
HISTORY_POINTS = 60  # refreshes kept for the page's sparklines


@dataclass
class VersionFacts:
    """What the overview knows of one model version."""

    ready: int | None = None  # jobs waiting in its queues (None: unknown)
    consumers: int = 0
    states: dict[str, int] = field(default_factory=dict)  # jobs of the ledger window by state
    oldest_queued_s: float = 0.0  # age of its oldest job still queued (0: none)
    p50_s: float | None = None
    p99_s: float | None = None
    finished_recently: int = 0
    failed_recently: int = 0


@dataclass
class Snapshot:
    """One refresh's facts."""

    at: float = 0.0
    ok: bool = False  # every source answered
    errors: list[str] = field(default_factory=list)
    versions: dict[tuple[str, str], VersionFacts] = field(default_factory=dict)
    workers: list[WorkerRecord] = field(default_factory=list)
    decisions: dict[str, Decision] = field(default_factory=dict)
    nodes: list[NodeRecord] = field(default_factory=list)
    dead_letters: int | None = None


class Overview:
    """Holds the latest :class:`Snapshot` and a short history of it; :meth:`refresh_forever` keeps it current."""

    def __init__(self, directory: ModelDirectory, inventory: Inventory, projection: JobProjection, refresh_s: float) -> None:
        self.directory = directory
        self.inventory = inventory
        self.projection = projection
        self.refresh_s = refresh_s
        self.snapshot = Snapshot()
        self.history: deque[tuple[float, dict[str, tuple[int, int, int]]]] = deque(maxlen=HISTORY_POINTS)
        self.changed = asyncio.Event()  # set after each refresh (the page's server-sent events wait on it)
        self._log = RateLimitedLog(log)

    def stale(self, now: float | None = None) -> bool:
        """Whether the facts may be out of date: the last refresh failed somewhere, or is long past."""
        now = time.time() if now is None else now
        return not self.snapshot.ok or now - self.snapshot.at > 3 * self.refresh_s

    async def refresh_forever(self) -> None:
        """Refresh every ``refresh_s``; a failure keeps the previous facts (marked stale) and tries again."""
        while True:
            try:
                await self.refresh()
            except Exception as exc:  # noqa: BLE001 - a bug here must not stop the edge; the facts just go stale
                self._log.warning("overview refresh failed: %r", exc)
            await asyncio.sleep(self.refresh_s)

    async def refresh(self) -> None:
        """One refresh of every source."""
        previous, fresh = self.snapshot, Snapshot(at=time.time(), ok=True)
        fresh.workers, fresh.decisions, fresh.nodes = previous.workers, previous.decisions, previous.nodes
        try:
            fresh.workers = await self.inventory.workers(strict=True)
            fresh.decisions = await self.inventory.decisions(strict=True)
            fresh.nodes = await self.inventory.nodes()
        except InferqError as exc:
            self._failed(fresh, f"etcd: {exc}")
        for model in self.directory.names():
            record = self.directory.cached(model)
            for version in record.versions if record is not None else ():
                fresh.versions[(model, version)] = await self._version(model, version, previous, fresh)
        if not self.inventory.broker_connected:
            self._failed(fresh, "broker: not connected (queue depths are the last known)")
        fresh.dead_letters = await self.inventory.dead_letters()
        if fresh.dead_letters is None:
            fresh.dead_letters = previous.dead_letters
        self._fold_projection(fresh, fresh.at)
        self.snapshot = fresh
        self._remember(fresh)
        self.changed.set()
        self.changed = asyncio.Event()

    async def _version(self, model: str, version: str, previous: Snapshot, fresh: Snapshot) -> VersionFacts:
        facts = VersionFacts()
        counts = await self.inventory.queue_facts(model, version)
        if counts is None:  # a queue not declared yet (no worker ever started), or the broker away
            old = previous.versions.get((model, version))
            facts.ready, facts.consumers = (old.ready, old.consumers) if old else (None, 0)
        else:
            facts.ready, facts.consumers = counts
        return facts

    def _failed(self, snapshot: Snapshot, error: str) -> None:
        snapshot.ok = False
        snapshot.errors.append(error)
        self._log.warning("overview refresh: %s", error)

    def _fold_projection(self, snapshot: Snapshot, now: float) -> None:
        """Job states, the oldest queued job and recent latencies per version, from the ledger projection."""
        durations: dict[tuple[str, str], list[float]] = {}
        for state in self.projection.states():
            facts = snapshot.versions.get((state.model, state.version))
            if facts is None:
                continue
            facts.states[state.status.value] = facts.states.get(state.status.value, 0) + 1
            if state.status == QUEUED and state.created_at:
                facts.oldest_queued_s = max(facts.oldest_queued_s, now - state.created_at)
            if state.terminal and state.finished_at and now - state.finished_at <= LATENCY_WINDOW_S:
                _recent(facts, state, durations)
        for key, values in durations.items():
            values.sort()
            snapshot.versions[key].p50_s = _quantile(values, 0.5)
            snapshot.versions[key].p99_s = _quantile(values, 0.99)

    def _remember(self, snapshot: Snapshot) -> None:
        totals: dict[str, tuple[int, int, int]] = {}
        for (model, _), facts in snapshot.versions.items():
            ok, bad, ready = totals.get(model, (0, 0, 0))
            failed = sum(facts.states.get(s, 0) for s in ("failed", "expired"))
            totals[model] = (ok + facts.states.get(SUCCEEDED.value, 0), bad + failed, ready + (facts.ready or 0))
        self.history.append((snapshot.at, totals))

    def recent_jobs(self, limit: int = 50, tenant: str | None = None, everyone: bool = True) -> list[JobState]:
        """The most recently updated jobs, failures first (a tenant sees only its own unless ``everyone``)."""
        found = []
        for state in self.projection.states(newest_first=True):
            if everyone or state.tenant == tenant:
                found.append(state)
                if len(found) >= limit:
                    break
        return sorted(found, key=lambda s: (s.status.value not in ("failed", "expired"), -(s.updated_at or 0)))


def _recent(facts: VersionFacts, state: JobState, durations: dict[tuple[str, str], list[float]]) -> None:
    facts.finished_recently += 1
    if state.status == SUCCEEDED and state.created_at:
        durations.setdefault((state.model, state.version), []).append(max(0.0, state.finished_at - state.created_at))
    elif state.status.value in ("failed", "expired"):
        facts.failed_recently += 1


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return values[min(len(values) - 1, int(q * len(values)))]


