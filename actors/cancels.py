"""The set of cancelled job ids, fed by the cancellation stream."""

from __future__ import annotations

import time
from collections import OrderedDict

from inferq.broker.connection import BrokerConnection
from inferq.broker.tail import LedgerTail, retention_start
from inferq.broker.messages import JobEvent


class CancelSet:
    """Bounded, TTL-limited set of job ids that must not run. Build with :meth:`follow`."""

    def __init__(self, ttl_s: float, max_size: int = 200_000) -> None:
        self.ttl_s = ttl_s
        self.max_size = max_size
        self._ids: OrderedDict[str, float] = OrderedDict()
        self._tail: LedgerTail | None = None

    @classmethod
    async def open(cls, connection: BrokerConnection, stream: str, ttl_s: float) -> CancelSet:
        """Read the cancellation stream's retention window and keep following it."""
        self = cls(ttl_s)
        self._tail = await LedgerTail.open(connection, stream, self.add_events, retention_start(ttl_s))
        return self

    def add_events(self, events: list[JobEvent]) -> None:
        """Record cancellations."""
        for event in events:
            self._ids[event.job_id] = event.ts
            self._ids.move_to_end(event.job_id)
        self._evict()

    def _evict(self) -> None:
        horizon = time.time() - self.ttl_s
        while self._ids and (len(self._ids) > self.max_size or next(iter(self._ids.values())) < horizon):
            self._ids.popitem(last=False)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._ids

    async def aclose(self) -> None:
        """Stop following; idempotent."""
        tail, self._tail = self._tail, None
        if tail is not None:
            await tail.aclose()
