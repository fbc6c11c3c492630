"""Auto-rollback's evidence: every finished job per model version over the last hour, read from the ledger.

The acting autoscaler evaluates the rules (it is the one process that acts, is
fenced, and already turns observations into decisions), so it needs the same
final events the edges see. It tails the ledger stream only while some alias has
a rule and traffic, starting an hour back (the longest window allowed), and keeps
per version: when each job finished, whether it failed, and its inference time.

Client-side failures (``invalid_input``, ``bad_message`` ...) say nothing about a
version and are not counted; shadow jobs are not counted either (they are never
a caller's). A job recorded twice (a redelivery) counts once.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import time
from collections import deque
from typing import Any

from inferq.broker.connection import BrokerConnection
from inferq.broker.tail import LedgerTail
from inferq.broker.messages import FAILED, SUCCEEDED, JobEvent
from inferq.runtime.records import ModelRecord
from inferq.runtime.routing import MAX_WINDOW_S, STABLE, WindowStats, breach, percentile

log = logging.getLogger("inferq.rollback")

CLIENT_CODES = frozenset({"invalid_input", "bad_message", "too_large", "unknown_model", "version_removed", "model_unavailable"})
SHADOW_SUFFIX = ".shadow"


@dataclasses.dataclass(frozen=True)
class Outcome:
    ts: float
    job_id: str
    failed: bool
    inference_ms: float | None


@dataclasses.dataclass(frozen=True)
class RollbackDecision:
    """An alias whose traffic must go back to stable, why, and what was measured."""

    model: str
    alias: str
    version: str
    why: str
    inputs: dict[str, Any]


class OutcomeWindow:
    """Finished jobs per (model, version), kept for ``keep_s``."""

    def __init__(self, keep_s: float = MAX_WINDOW_S) -> None:
        self.keep_s = keep_s
        self._jobs: dict[tuple[str, str], deque[Outcome]] = {}
        self._seen: dict[tuple[str, str], set[str]] = {}

    def add(self, events: list[JobEvent]) -> None:
        """Fold in a ledger message's events (the tail's handler)."""
        for event in events:
            if event.status not in (SUCCEEDED, FAILED) or not event.version or event.job_id.endswith(SHADOW_SUFFIX):
                continue
            code = (event.error or {}).get("code")
            if event.status == FAILED and code in CLIENT_CODES:
                continue
            key = (event.model, event.version)
            seen = self._seen.setdefault(key, set())
            if event.job_id in seen:
                continue
            seen.add(event.job_id)
            latency = (event.timings or {}).get("inference_ms")
            self._jobs.setdefault(key, deque()).append(
                Outcome(event.ts, event.job_id, event.status == FAILED, float(latency) if isinstance(latency, (int, float)) else None))
        self._prune(time.time())

    def _prune(self, now: float) -> None:
        for key, jobs in self._jobs.items():
            while jobs and jobs[0].ts < now - self.keep_s:
                self._seen[key].discard(jobs.popleft().job_id)

    def stats(self, model: str, version: str, window_s: float, now: float) -> WindowStats:
        """Jobs of one version that finished within the last ``window_s``."""
        recent = [o for o in self._jobs.get((model, version), ()) if o.ts >= now - window_s]
        latencies = [o.inference_ms for o in recent if o.inference_ms is not None and not o.failed]
        p95 = percentile(latencies, 95)
        return WindowStats(len(recent), sum(o.failed for o in recent), None if p95 is None else round(p95, 3))

    def clear(self) -> None:
        self._jobs.clear()
        self._seen.clear()


def armed(record: ModelRecord) -> list[str]:
    """Aliases of a model whose auto-rollback rule has something to act on: traffic, and a stable to go back to."""
    if STABLE not in record.aliases:
        return []
    return [name for name, alias in record.aliases.items()
            if alias.auto_rollback is not None and name != STABLE and record.traffic.get(name, 0) > 0]


def decide(window: OutcomeWindow, records: dict[str, ModelRecord], now: float) -> list[RollbackDecision]:
    """Every armed alias whose version breaches its rule against stable's over the rule's window."""
    decisions = []
    for record in records.values():
        stable = record.aliases.get(STABLE)
        for name in armed(record):
            alias = record.aliases[name]
            rule = alias.auto_rollback
            baseline = stable.held_at or stable.version
            canary = window.stats(record.name, alias.version, rule.window_s, now)
            reference = window.stats(record.name, baseline, rule.window_s, now)
            why = breach(rule, canary, reference)
            if why is not None:
                inputs = {"rule": dataclasses.asdict(rule), "window_s": rule.window_s,
                          "canary": {"alias": name, "version": alias.version, **canary.to_dict()},
                          "stable": {"version": baseline, **reference.to_dict()}}
                decisions.append(RollbackDecision(record.name, name, alias.version, f"auto-rollback: {why}", inputs))
    return decisions


class RollbackWatch:
    """The window, fed by a ledger tail that runs only while some rule is armed."""

    def __init__(self, connection: BrokerConnection, stream: str) -> None:
        self._connection = connection
        self._stream = stream
        self.window = OutcomeWindow()
        self._tail: LedgerTail | None = None

    async def follow(self, wanted: bool) -> None:
        """Open the tail (an hour back) when a rule is armed, close it when none is."""
        if wanted and self._tail is None:
            start = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=self.window.keep_s)
            self._tail = await LedgerTail.open(self._connection, self._stream, self.window.add, offset=start)
            log.info("following the ledger for auto-rollback rules")
        elif not wanted and self._tail is not None:
            tail, self._tail = self._tail, None
            await tail.aclose()
            self.window.clear()

    async def aclose(self) -> None:
        await self.follow(False)
