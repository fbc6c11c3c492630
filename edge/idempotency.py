"""Idempotency keys: one key queues one job, across concurrent submits and edges, for the whole retention.

A key names its job (uuid5 of tenant, model and key), and a record in etcd,
``/<ns>/idempotency/<job id>``, decides who queues it. The first submit
creates the record in a compare-and-create transaction; every other submit,
on any edge, finds it and answers with that job. The record lives on a lease
of at least ``jobs.ttl_s``, so a key is remembered as long as the ledger
keeps its job, even after an edge's projection has forgotten it or while a
restarted edge is still reading the ledger. (RabbitMQ has no deduplication
of its own, and the projection alone can neither make check-then-publish
atomic nor remember past its memory bound.)

The record keeps a digest of the request: the same key with another request
is refused with 422 ``idempotency_mismatch``, as Stripe does.

A record is ``claimed`` while its submit publishes and ``queued`` once the
broker confirmed the job. A submit that finds a claim waits for it; a claim
whose owner vanished mid-publish is taken over after ``stale_s``. A publish
that fails releases the claim, so the client's retry can queue the job: a
retry after a publish timeout may then queue a second copy under the same
job id, which the ledger folds into one job (at-least-once, like any
redelivery).
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from inferq.errors import CodecError
from inferq.runtime.coordination import keys, translated
from inferq.runtime.records import build, load_json

log = logging.getLogger("inferq.edge.idempotency")


class KeyState(str, enum.Enum):
    """Where the submit that owns a key is."""

    CLAIMED = "claimed"
    QUEUED = "queued"


@dataclass(frozen=True)
class IdempotencyRecord:
    """What etcd keeps for one idempotency key."""

    job_id: str
    digest: str
    model: str
    version: str
    state: KeyState = KeyState.CLAIMED
    claimed_at: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "state", KeyState(self.state))

    def to_json(self) -> str:
        """The stored document."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str) -> IdempotencyRecord:
        """Rebuild a record; CodecError if it is malformed."""
        return build(cls, load_json(raw, "idempotency record"), "idempotency record")


@dataclass(frozen=True)
class Claim:
    """A record as etcd holds it, with the revision that guards changes and its lease."""

    record: IdempotencyRecord
    revision: int
    lease: int


def request_digest(model: str, version: str | None, inputs: Mapping[str, np.ndarray],
                   outputs: tuple[str, ...] | None, parameters: Mapping[str, Any] | None) -> str:
    """SHA-256 over everything that makes two requests the same job."""
    digest = hashlib.sha256()

    def part(data: bytes | memoryview) -> None:
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)

    part(model.encode())
    part((version or "").encode())
    for name in sorted(inputs):
        array = np.ascontiguousarray(inputs[name])
        part(name.encode())
        part(f"{array.dtype.str}{array.shape}".encode())
        part(array.data.cast("B") if array.size else b"")
    part(json.dumps(list(outputs) if outputs is not None else None).encode())
    part(json.dumps(dict(parameters or {}), sort_keys=True, default=repr).encode())
    return digest.hexdigest()


class IdempotencyStore:
    """Claims, confirms and releases idempotency records in etcd."""

    def __init__(self, etcd: Any, namespace: str, retention_s: float, timeout_s: float, stale_s: float) -> None:
        self._etcd = etcd
        self._prefix = f"{keys(namespace).root}/idempotency/"
        self.retention_s = retention_s
        self._timeout = timeout_s
        self.stale_s = stale_s
        # Records share a lease per epoch: one grant every tenth of the retention, not one per submit.
        self._epoch_s = max(retention_s / 10, 1.0)
        self._lease: tuple[int, float] | None = None  # (id, when it runs out)
        self._lease_lock = asyncio.Lock()

    def _key(self, job_id: str) -> bytes:
        return (self._prefix + job_id).encode()

    async def claim(self, record: IdempotencyRecord, known: Callable[[str], bool] = lambda _: False) -> tuple[Claim, bool]:
        """The key's record, and whether this submit owns it (and must queue the job).

        Waits while another submit holds a fresh claim on the same request;
        returns at once if the stored request differs (the caller refuses it).
        ``known`` tells whether the job is already in the ledger (queued).
        """
        delay = 0.02
        while True:
            created, current = await self._create(record)
            if created:
                return current, True
            theirs = current.record
            if theirs.digest != record.digest or theirs.state is KeyState.QUEUED or known(record.job_id):
                return current, False
            if theirs.claimed_at + self.stale_s < time.time():
                log.warning("taking over the stale claim on job %s (claimed %.0f s ago)", record.job_id, time.time() - theirs.claimed_at)
                taken = await self._replace(current, record)
                if taken is not None:
                    return taken, True
                continue
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def confirm(self, claim: Claim) -> None:
        """Mark the claim's job queued (the broker confirmed it); a failure is logged, the job is queued anyway."""
        queued = IdempotencyRecord(**{**asdict(claim.record), "state": KeyState.QUEUED})
        try:
            await self._replace(claim, queued, keep_lease=True)
        except Exception as exc:  # waiters then find the job in the ledger instead
            log.warning("could not mark idempotency key of job %s queued: %r", claim.record.job_id, exc)

    async def release(self, claim: Claim) -> None:
        """Drop a claim whose publish failed, so that a retry may queue the job."""
        tx = self._etcd.transactions
        key = self._key(claim.record.job_id)
        try:
            async with translated("releasing an idempotency key"):
                await asyncio.wait_for(self._etcd.transaction(
                    compare=[tx.mod(key) == claim.revision], success=[tx.delete(key)], failure=[]), self._timeout)
        except Exception as exc:  # the claim goes stale and is taken over
            log.warning("could not release idempotency key of job %s: %r", claim.record.job_id, exc)

    async def _create(self, record: IdempotencyRecord) -> tuple[bool, Claim]:
        key, lease = self._key(record.job_id), await self._lease_id()
        tx = self._etcd.transactions
        async with translated("claiming an idempotency key"):
            ok, responses = await asyncio.wait_for(self._etcd.transaction(
                compare=[tx.create(key) == 0],
                success=[tx.put(key, record.to_json().encode(), lease=lease)],
                failure=[tx.get(key)]), self._timeout)
        if ok:
            return True, Claim(record, responses[0].response_put.header.revision, lease)
        value, meta = responses[0][0]
        try:
            stored = IdempotencyRecord.from_json(value)
        except CodecError as exc:  # unreadable: treated as a claim long gone, so it is replaced
            log.warning("replacing a malformed idempotency record for job %s: %s", record.job_id, exc)
            stored = IdempotencyRecord(record.job_id, record.digest, record.model, record.version, KeyState.CLAIMED, 0.0)
        return False, Claim(stored, meta.mod_revision, meta.lease)

    async def _replace(self, current: Claim, record: IdempotencyRecord, keep_lease: bool = False) -> Claim | None:
        key = self._key(record.job_id)
        lease = current.lease if keep_lease else await self._lease_id()
        tx = self._etcd.transactions
        async with translated("updating an idempotency key"):
            ok, responses = await asyncio.wait_for(self._etcd.transaction(
                compare=[tx.mod(key) == current.revision],
                success=[tx.put(key, record.to_json().encode(), lease=lease)],
                failure=[]), self._timeout)
        return Claim(record, responses[0].response_put.header.revision, lease) if ok else None

    async def _lease_id(self) -> int:
        # A record must outlive the retention from the moment it is written.
        if self._lease is not None and self._lease[1] > time.time() + self.retention_s:
            return self._lease[0]
        async with self._lease_lock:
            now = time.time()
            if self._lease is None or self._lease[1] <= now + self.retention_s:
                ttl = int(self.retention_s + self._epoch_s) + 1
                async with translated("granting an idempotency lease"):
                    lease = await asyncio.wait_for(self._etcd.lease(ttl), self._timeout)
                self._lease = (lease.id, now + ttl)
            return self._lease[0]
