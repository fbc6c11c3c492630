"""The model registry in etcd: plans (:mod:`inferq.runtime.plans`) committed as compare-and-swap transactions.

A change reads the model's record (``/<ns>/models/<model>``) and its mod revision,
computes the new record with a pure plan (which refuses what cannot be honoured),
and commits it in one etcd transaction that compares the mod revision, so a
concurrent change makes it start over instead of being overwritten. The same
transaction appends the history entry (``/<ns>/history/<model>/<seq>``: who, when,
from, to, why) and, for a removal, the removal record that the autoscaler turns
into ``version_removed`` failures for the version's queued jobs.
"""

from __future__ import annotations

import asyncio
import getpass
import logging
import socket
import time
import uuid
from collections.abc import Mapping
from typing import Any

import aetcd

from inferq.errors import Conflict
from inferq.runtime.artifacts import ArtifactStore
from inferq.runtime.catalog import read_model
from inferq.runtime.coordination import get_records, keys, translated
from inferq.runtime.plans import (
    KEEP, Change, Plan, Pushed, history_entry, plan_alias, plan_pipeline, plan_register, plan_remove_model, plan_remove_version, plan_rollback,
    plan_shadow, plan_traffic, plan_unalias,
)
from inferq.runtime.records import AliasRecord, HistoryAction, HistoryEntry, ModelRecord, RemovalRecord, VersionRecord
from inferq.runtime.repository import ModelConfig

log = logging.getLogger("inferq.registry")

MAX_ATTEMPTS = 8
HISTORY_KEEP = 500


def identity() -> str:
    """Who a change made from this process is recorded as: ``user@host``."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


class Registry:
    """Registry changes on etcd; ``store`` is where pushed artifacts go (None: this process only routes)."""

    def __init__(self, client: aetcd.Client, namespace: str, timeout_s: float, store: ArtifactStore | None = None) -> None:
        self.client = client
        self.namespace = namespace
        self.keys = keys(namespace)
        self.timeout = timeout_s
        self.store = store

    async def get(self, model: str) -> ModelRecord | None:
        """The model's record, None if it is not registered."""
        return (await read_model(self.client, self.namespace, model, self.timeout))[0]

    async def change(self, model: str, plan: Plan) -> Change:
        """Apply ``plan`` atomically; start over (up to MAX_ATTEMPTS) when the record changed meanwhile."""
        for _ in range(MAX_ATTEMPTS):
            record, revision = await read_model(self.client, self.namespace, model, self.timeout)
            change = plan(record, time.time())
            if change.noop:
                return change
            if await self._commit(model, revision, change):
                for entry in change.entries:
                    log.info("registry %s %s %s: %s -> %s (%s, by %s)", model, entry.action, entry.target,
                             entry.from_value or "-", entry.to_value or "-", entry.why or "no reason given", entry.who)
                await self._trim(model)
                return change
        raise Conflict(f"model {model!r} kept changing while this change was tried {MAX_ATTEMPTS} times; try again")

    async def _commit(self, model: str, revision: int, change: Change) -> bool:
        tx = self.client.transactions
        key = self.keys.model(model).encode()
        ops = [tx.delete(key) if change.record is None else tx.put(key, change.record.to_json().encode())]
        for entry in change.entries:
            seq = f"{time.time_ns():020d}-{uuid.uuid4().hex[:6]}"
            ops.append(tx.put(f"{self.keys.history(model)}{seq}".encode(), entry.to_json().encode()))
        for removal in change.removals:
            ops.append(tx.put(self.removal_key(model, removal.version).encode(), removal.to_json().encode()))
        compare = [tx.mod(key) == revision] + [tx.version(k.encode()) == 0 for k in change.absent]
        async with translated(f"changing model {model}"):
            ok, _ = await asyncio.wait_for(self.client.transaction(compare=compare, success=ops, failure=[]), self.timeout)
        if not ok and change.absent and await self._any_present(change.absent):
            raise Conflict(f"model {model!r}: that version is still being removed (its queued jobs are being failed); "
                           "try again in a few seconds")
        return ok

    async def _any_present(self, names: tuple[str, ...]) -> bool:
        async with translated("reading removals"):
            for name in names:
                if await asyncio.wait_for(self.client.get(name.encode()), self.timeout) is not None:
                    return True
        return False

    def removal_key(self, model: str, version: str) -> str:
        """Where a removal waits for the autoscaler (a whole model with no versions: ``_model``)."""
        return self.keys.removal(model, version or "_model")

    async def _trim(self, model: str) -> None:
        prefix = self.keys.history(model).encode()
        async with translated(f"trimming the history of {model}"):
            result = await asyncio.wait_for(self.client.get_prefix(prefix, keys_only=True), self.timeout)
            old = sorted(kv.key for kv in result)[:-HISTORY_KEEP]
            for key in old:
                await asyncio.wait_for(self.client.delete(key), self.timeout)

    async def history(self, model: str, limit: int = 50) -> list[HistoryEntry]:
        """The model's last ``limit`` changes, oldest first."""
        entries = await get_records(self.client, self.keys.history(model), HistoryEntry.from_json, self.timeout)
        return [entries[k] for k in sorted(entries)][-limit:]

    async def removals(self) -> dict[str, RemovalRecord]:
        """Removals still under way, keyed ``<model>/<version>``."""
        return await get_records(self.client, self.keys.removals, RemovalRecord.from_json, self.timeout)

    async def retired(self, removal: RemovalRecord, failed: int, who: str) -> None:
        """A removal is done: drop its record and say so in the history."""
        tx = self.client.transactions
        record = history_entry(removal.model, HistoryAction.RETIRED, time.time(), who, removal.version or "model",
                       why=f"queues deleted; {failed} queued job(s) ended failed: version_removed")
        seq = f"{time.time_ns():020d}-{uuid.uuid4().hex[:6]}"
        ops = [tx.delete(self.removal_key(removal.model, removal.version).encode()),
               tx.put(f"{self.keys.history(removal.model)}{seq}".encode(), record.to_json().encode())]
        if removal.version:  # the autoscaler's last decision about it means nothing any more
            ops.append(tx.delete(f"{self.keys.decisions}{removal.model}.{removal.version}".encode()))
        async with translated("finishing a removal"):
            await asyncio.wait_for(self.client.transaction(compare=[], success=ops, failure=[]), self.timeout)

    # The operations, each one plan committed.

    async def register(self, model: str, version: str | None, pushed: VersionRecord, config: ModelConfig | None,
                       who: str, why: str = "") -> Pushed:
        """Record a pushed version (see :func:`plan_register`)."""
        plan = plan_register(model, version, pushed, config, who, why, lambda v: self.removal_key(model, v))
        return (await self.change(model, plan)).result

    async def set_pipeline(self, model: str, stages: tuple[Any, ...], signature: VersionRecord, who: str, why: str = "") -> str:
        """Create or replace a pipeline record (see :func:`plan_pipeline`)."""
        return (await self.change(model, plan_pipeline(model, tuple(stages), signature, who, why))).result

    async def set_alias(self, model: str, alias: str, version: str, who: str, why: str = "", rule: Any = KEEP) -> AliasRecord:
        return (await self.change(model, plan_alias(model, alias, version, who, why, rule))).result

    async def rollback(self, model: str, alias: str, who: str, why: str = "") -> AliasRecord:
        return (await self.change(model, plan_rollback(model, alias, who, why))).result

    async def unalias(self, model: str, alias: str, who: str, why: str = "") -> None:
        await self.change(model, plan_unalias(model, alias, who, why))

    async def set_traffic(self, model: str, weights: Mapping[str, Any], who: str, why: str = "") -> None:
        await self.change(model, plan_traffic(model, weights, who, why))

    async def set_shadow(self, model: str, version: str | None, percent: float, who: str, why: str = "") -> None:
        await self.change(model, plan_shadow(model, version, percent, who, why))

    async def remove_version(self, model: str, version: str, who: str, why: str = "") -> None:
        await self.change(model, plan_remove_version(model, version, who, why))

    async def remove_model(self, model: str, who: str, why: str = "") -> None:
        await self.change(model, plan_remove_model(model, who, why))
