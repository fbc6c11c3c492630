"""Poison detection that counts only real failures: starts of a job that ended with its worker dying.

RabbitMQ 3.10 counts every return of a message (a broker restart, a lost
connection, a drain, the prefetch of a worker that died of *another* job), so
its delivery count cannot tell a poison job from its neighbours. inferq counts
instead, in etcd, the starts of *suspect* jobs: those that come back after a
worker died (``x-delivery-count`` > 0, or marked suspect when handed back).

* A suspect runs alone, and its start is recorded (``/<ns>/starts/<job-id>``)
  *before* it runs. If the worker dies while running it, the count stays.
* A suspect arriving with ``limit - 1`` recorded starts has killed a worker
  that many times, plus (most likely) once when it first ran among fresh jobs:
  it ends ``failed`` with ``delivery_limit``, and only it.
* Fresh jobs cost nothing here: no etcd round trip on the hot path.

Its neighbours in a batch or a prefetch come back as suspects too, run alone
once, succeed, and are never counted again. Keys expire with a lease of the
job retention, so etcd holds only jobs that were suspects lately.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from inferq.runtime.coordination import translated

log = logging.getLogger("inferq.attempts")


class StartBook:
    """Recorded starts of suspect jobs, shared by every worker through etcd."""

    def __init__(self, client: Any, prefix: str, ttl_s: float, timeout_s: float) -> None:
        self._client = client
        self._prefix = prefix
        self._ttl_s = max(60, int(ttl_s))
        self._timeout = timeout_s
        self._lease: Any = None
        self._lease_at = 0.0

    def _key(self, job_id: str) -> bytes:
        return f"{self._prefix}{job_id}".encode()

    async def recorded(self, job_id: str) -> int:
        """Starts recorded so far for ``job_id`` (raises CoordinationError if etcd is away)."""
        async with translated(f"reading the starts of {job_id}"):
            kv = await asyncio.wait_for(self._client.get(self._key(job_id)), self._timeout)
        try:
            return int(kv.value) if kv is not None else 0
        except ValueError:
            return 0

    async def record(self, job_id: str, starts: int) -> None:
        """Write ``starts`` for ``job_id`` (before the start it counts)."""
        async with translated(f"recording a start of {job_id}"):
            lease = await self._current_lease()
            await asyncio.wait_for(self._client.put(self._key(job_id), str(starts).encode(), lease=lease), self._timeout)

    async def _current_lease(self) -> Any:
        # One lease per worker, granted again halfway through its life: a key outlives the worker
        # that wrote it (that is the point) but not the job's retention window.
        now = time.monotonic()
        if self._lease is None or now - self._lease_at > self._ttl_s / 2:
            self._lease = await asyncio.wait_for(self._client.lease(self._ttl_s), self._timeout)
            self._lease_at = now
        return self._lease


def poisoned(recorded: int, limit: int) -> bool:
    """Whether a suspect with ``recorded`` deadly starts has used up a poison limit of ``limit`` starts."""
    return recorded >= max(1, limit - 1)
