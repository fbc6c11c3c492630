"""The edge's model directory: model records from etcd, cached and refreshed."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aetcd

from runtime.catalog import read_models, signature
from runtime.errors import CoordinationError, UnknownModel
from runtime.repository import ModelVersion

log = logging.getLogger("inferq.edge.models")


class ModelDirectory:
    """Model metadata an edge validates against, refreshed every ``refresh_s`` and on a miss."""

    def __init__(self, client: aetcd.Client, namespace: str, timeout_s: float, refresh_s: float = 5.0) -> None:
        self._client = client
        self._namespace = namespace
        self._timeout = timeout_s
        self._refresh_s = refresh_s
        self._records: dict[str, dict[str, Any]] = {}
        self._loaded_at = 0.0
        self._lock = asyncio.Lock()

    async def refresh(self) -> None:
        """Re-read every record from etcd (keeps the old ones if etcd is down)."""
        async with self._lock:
            try:
                self._records = await read_models(self._client, self._namespace, self._timeout)
                self._loaded_at = time.monotonic()
            except CoordinationError as exc:
                log.warning("model metadata not refreshed: %s", exc)

    async def refresh_forever(self) -> None:
        """Background refresh loop (owned by the edge)."""
        while True:
            await asyncio.sleep(self._refresh_s)
            await self.refresh()

    async def record(self, model: str) -> dict[str, Any]:
        """The record of ``model``; unknown models are looked up once more before a 404."""
        if model not in self._records and time.monotonic() - self._loaded_at > 0.5:
            await self.refresh()
        try:
            return self._records[model]
        except KeyError:
            raise UnknownModel(f"model {model!r} is not known (load it with 'inferq models sync')") from None

    async def version(self, model: str, version: str | None) -> ModelVersion:
        """A servable signature: ``version`` or the model's default one."""
        record = await self.record(model)
        v = version or record["default_version"]
        if v not in record["versions"]:
            raise UnknownModel(f"model {model!r} has no version {v!r} (has {list(record['versions'])})")
        inputs, outputs = signature(record, v)
        return ModelVersion(model, v, path=None, inputs=tuple(inputs), outputs=tuple(outputs))

    def names(self) -> list[str]:
        return sorted(self._records)

    def allow_nan(self, model: str) -> bool:
        return bool(self._records.get(model, {}).get("allow_nan", True))
