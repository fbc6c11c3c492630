"""Launch bookkeeping per model version: workers asked for, workers that died on start, and backoff.

A worker that cannot start (a model file gone, a broken provider, settings it
cannot use) must not be re-spawned in a tight loop. Each failure, and each
launch that never registered within the grace period, doubles the wait before
the next launch (1 s up to 60 s); a worker that registers clears the record.
The last reason is kept, so the autoscaler's decision can say why it waits.

Backoff alone would still relaunch a version that can never start, once a
minute for ever. After ``MAX_FAILED_STARTS`` failures in a row the book gives
up on it: one error is logged, the decision says so, and nothing is launched
until something changes that could fix it: a worker of it registers (started
by hand, say), its model's scaling policy changes (:meth:`LaunchBook.forget`),
or the autoscaler restarts.

A worker registered as warming (loading its model, building a TensorRT engine,
which can take minutes on a Jetson) counts as there: it is coming, not failed,
and another is not started for the same demand (:func:`counted`).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from inferq.runtime.records import WorkerRecord

log = logging.getLogger("inferq.autoscaler.launches")

SPAWN_GRACE_S = 30.0
BACKOFF_MIN_S = 1.0
BACKOFF_MAX_S = 60.0
MAX_FAILED_STARTS = 10  # in a row, about 5 minutes of backoff: then no more until something changes


@dataclass
class _Pending:
    count: int
    deadline: float


@dataclass
class _Failures:
    count: int = 0
    retry_at: float = 0.0
    reason: str = ""


class LaunchBook:
    """What the autoscaler has asked for, per ``(model, version)``; times are ``time.monotonic()``."""

    def __init__(self, grace_s: float = SPAWN_GRACE_S) -> None:
        self.grace_s = grace_s
        self._pending: dict[tuple[str, str], _Pending] = {}
        self._failures: dict[tuple[str, str], _Failures] = {}

    def current(self, key: tuple[str, str], live: int, now: float) -> int:
        """Workers to count as there: the live ones, or those asked for while they start."""
        pending = self._pending.get(key)
        if pending is None:
            return live
        if live >= pending.count:
            del self._pending[key]
            self._failures.pop(key, None)  # they came up: whatever failed before is history
            return live
        if now > pending.deadline:
            del self._pending[key]
            self.failed(key, "workers were started but never registered in etcd (check their logs and settings)", now)
            return live
        return pending.count

    def launched(self, key: tuple[str, str], live: int, started: int, now: float) -> None:
        """``started`` workers were asked for on top of ``live``."""
        prior = self._pending.get(key)
        self._pending[key] = _Pending((prior.count if prior else live) + started, now + self.grace_s)

    def failed(self, key: tuple[str, str], reason: str, now: float) -> None:
        """A launch failed (or a started worker died before registering): back off."""
        record = self._failures.setdefault(key, _Failures())
        record.count += 1
        record.reason = reason
        record.retry_at = now + min(BACKOFF_MAX_S, BACKOFF_MIN_S * 2 ** (record.count - 1))
        if record.count == MAX_FAILED_STARTS:
            log.error("%s:%s: %d starts in a row failed; launching no more of it until a worker of it registers, "
                      "its scaling policy changes or the autoscaler restarts. Last: %s", *key, record.count, reason)
        pending = self._pending.get(key)
        if pending is not None:
            pending.count -= 1
            if pending.count <= 0:
                del self._pending[key]

    def held(self, key: tuple[str, str], now: float) -> str | None:
        """Why a launch must wait now, or None if it may go ahead."""
        record = self._failures.get(key)
        if record is not None and record.count >= MAX_FAILED_STARTS:
            return (f"gave up after {record.count} failed starts in a row (a worker registering, a policy change or "
                    f"an autoscaler restart tries again): {record.reason}")
        if record is None or now >= record.retry_at:
            return None
        return f"backing off {record.retry_at - now:.0f}s after {record.count} failed start(s): {record.reason}"

    def forget(self, model: str) -> None:
        """Clear the failures of every version of ``model``: something that could fix its starts changed."""
        for key in [k for k in self._failures if k[0] == model]:
            del self._failures[key]


def counted(members: Iterable[WorkerRecord], draining: Collection[str]) -> tuple[list[WorkerRecord], int]:
    """A version's serving workers (those a scale-down may drain), and how many count as there.

    The count is the serving ones plus the warming ones: a warming worker registered
    (so its launch did not fail) and is on its way. Workers being drained count as gone.
    """
    members = [w for w in members if w.worker_id not in draining]
    serving = [w for w in members if w.serving]
    return serving, len(serving) + sum(1 for w in members if w.coming)
