"""The edge's model directory: the registry's model records from etcd, cached and refreshed on every change."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import aetcd

from inferq.errors import CoordinationError, UnknownModel
from inferq.runtime.catalog import read_models
from inferq.runtime.coordination import ETCD_ERRORS, keys
from inferq.runtime.records import ModelRecord
from inferq.runtime.repository import ModelVersion

log = logging.getLogger("inferq.edge.models")

MISS_REFRESH_S = 0.5  # a miss (unknown model, version or alias) is looked up again at most this often


class ModelDirectory:
    """Model records an edge validates and routes against.

    Refreshed at once when an etcd watch on ``/<ns>/models/`` fires (an alias
    moved, a version pushed) and every ``refresh_s`` in any case, so a broken
    watch costs at most that much staleness. A miss is looked up once more
    before it is answered 404.
    """

    def __init__(self, client: aetcd.Client, namespace: str, timeout_s: float, refresh_s: float = 5.0) -> None:
        self._client = client
        self._namespace = namespace
        self._timeout = timeout_s
        self._refresh_s = refresh_s
        self._records: dict[str, ModelRecord] = {}
        self._loaded_at = 0.0
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._listeners: list[Callable[[], None]] = []

    def on_refresh(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` after each refresh (cheap and non-blocking, e.g. set an event)."""
        self._listeners.append(listener)

    async def refresh(self) -> None:
        """Re-read every record from etcd (keeps the old ones if etcd is down)."""
        async with self._lock:
            try:
                self._records = await read_models(self._client, self._namespace, self._timeout)
                self._loaded_at = time.monotonic()
            except CoordinationError as exc:
                log.warning("model metadata not refreshed: %s", exc)
                return
        for listener in self._listeners:
            listener()

    async def refresh_forever(self) -> None:
        """Refresh on every change (etcd watch) and every ``refresh_s`` (owned by the edge)."""
        watcher = asyncio.create_task(self._watch(), name="model-directory-watch")
        try:
            while True:
                try:
                    await asyncio.wait_for(self._changed.wait(), self._refresh_s)
                except TimeoutError:
                    pass
                self._changed.clear()
                await self.refresh()
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)

    async def _watch(self) -> None:
        prefix = keys(self._namespace).models.encode()
        while True:
            try:
                events = await asyncio.wait_for(self._client.watch_prefix(prefix), self._timeout)
                async for _ in events:
                    self._changed.set()
            except ETCD_ERRORS as exc:
                log.debug("model watch ended (%r); opening it again", exc)
            await asyncio.sleep(1.0)

    async def record(self, model: str, version: str | None = None, alias: str | None = None) -> ModelRecord:
        """The record of ``model``; a miss (model, or the ``version``/``alias`` asked for) is looked up once more."""
        record = self._records.get(model)
        if self._misses(record, version, alias) and time.monotonic() - self._loaded_at > MISS_REFRESH_S:
            await self.refresh()
            record = self._records.get(model)
        if record is None:
            raise UnknownModel(f"model {model!r} is not known (push it with 'inferq models push', or 'inferq models sync')")
        return record

    @staticmethod
    def _misses(record: ModelRecord | None, version: str | None, alias: str | None) -> bool:
        return record is None or (version is not None and version not in record.versions) or (
            alias is not None and alias not in record.aliases)

    async def version(self, model: str, version: str | None) -> ModelVersion:
        """A servable signature: ``version`` or the model's default one."""
        record = await self.record(model, version)
        v = version or record.default_version
        if v not in record.versions:
            raise UnknownModel(f"model {model!r} has no version {v!r} (has {list(record.versions)})")
        return record.signature(v)

    def cached(self, model: str) -> ModelRecord | None:
        """The cached record, without any lookup."""
        return self._records.get(model)

    def names(self) -> list[str]:
        return sorted(self._records)

    def allow_nan(self, model: str) -> bool:
        record = self._records.get(model)
        return record.allow_nan if record is not None else True
