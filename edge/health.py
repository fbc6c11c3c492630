"""Which model versions are ready: a worker holds a lease, is consuming, and finished its warm-up inference.

The registry's traffic gates open on this (see :mod:`inferq.runtime.routing`). It is
read from the membership records in etcd every ``refresh_s`` (workers rewrite
theirs every second anyway), so a gate opens within about a second of warm-up.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from typing import Any

import aetcd

from inferq.errors import CoordinationError
from inferq.runtime.coordination import get_records, keys
from inferq.runtime.records import WorkerRecord, WorkerState

log = logging.getLogger("inferq.edge.health")


class VersionHealth:
    """The last view of every worker record, grouped by model and version."""

    def __init__(self, client: aetcd.Client | None, namespace: str, timeout_s: float, refresh_s: float = 1.0) -> None:
        self._client = client
        self._prefix = keys(namespace).workers
        self._timeout = timeout_s
        self._refresh_s = refresh_s
        self._workers: dict[tuple[str, str], list[WorkerRecord]] = {}

    async def refresh(self) -> None:
        """Read the membership records again (keeps the last view if etcd is away; no client: nothing is ever ready)."""
        if self._client is None:
            return
        try:
            records = await get_records(self._client, self._prefix, WorkerRecord.from_json, self._timeout)
        except CoordinationError as exc:
            log.debug("worker health not refreshed: %s", exc)
            return
        grouped: dict[tuple[str, str], list[WorkerRecord]] = defaultdict(list)
        for record in records.values():
            grouped[(record.model, record.version)].append(record)
        self._workers = dict(grouped)

    async def refresh_forever(self) -> None:
        """Background refresh loop (owned by the edge)."""
        while True:
            await asyncio.sleep(self._refresh_s)
            await self.refresh()

    def ready(self, model: str) -> set[str]:
        """Versions of ``model`` with at least one ready, warmed-up worker."""
        return {v for (m, v), workers in self._workers.items() if m == model and any(w.healthy for w in workers)}

    def describe(self, model: str, version: str) -> dict[str, Any]:
        """Workers of one version by state, whether one is warmed up, and the last warm-up error."""
        workers = self._workers.get((model, version), [])
        by_state = {state.value: sum(1 for w in workers if w.state is state) for state in WorkerState}
        errors = [w.warmup_error for w in workers if w.warmup_error]
        return {"workers": by_state, "ready": any(w.healthy for w in workers), "warmup_error": errors[-1] if errors else ""}
