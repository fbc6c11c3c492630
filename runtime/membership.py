"""Worker membership: a lease-backed record in etcd, kept alive in the background.

The record lives at ``/<ns>/workers/<id>`` and disappears when the lease ends
(worker stopped, killed or cut off longer than the TTL). If the lease is lost
while the worker lives (etcd restarted, a long pause), the keeper registers
again with a new lease; while etcd is unreachable the worker goes on serving.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

import aetcd

from inferq.runtime.coordination import ETCD_ERRORS, translated
from inferq.runtime.tasks import cancel_and_wait

log = logging.getLogger("inferq.membership")


class Record(Protocol):
    """What a lease carries: a typed record (``WorkerRecord``, ``NodeRecord``)."""

    def to_json(self) -> str: ...


class MembershipLease:
    """A worker's membership. Build with :meth:`open`; ``aclose`` revokes it (idempotent)."""

    def __init__(self, client: aetcd.Client, key: str, record: Record, ttl_s: int, timeout_s: float) -> None:
        self._client = client
        self.key = key
        self.record = record
        self.ttl_s = ttl_s
        self._timeout = timeout_s
        self._lease: Any = None
        self._task: asyncio.Task[None] | None = None
        self.state = "new"
        self.registrations = 0

    @classmethod
    async def open(cls, client: aetcd.Client, key: str, record: Record, ttl_s: int, timeout_s: float = 5.0) -> MembershipLease:
        """Register now if etcd answers, and keep the lease alive from then on."""
        self = cls(client, key, record, ttl_s, timeout_s)
        try:
            await self._register()
        except ETCD_ERRORS as exc:
            log.warning("cannot register %s yet (%r); serving anyway, will retry", key, exc)
            self.state = "lost"
        self._task = asyncio.create_task(self._keep_alive(), name=f"lease:{key}")
        return self

    async def _register(self) -> None:
        lease = await asyncio.wait_for(self._client.lease(self.ttl_s), self._timeout)
        await asyncio.wait_for(self._client.put(self.key.encode(), self.record.to_json().encode(), lease=lease), self._timeout)
        self._lease = lease
        self.state = "registered"
        self.registrations += 1
        log.info("registered %s with lease %x (ttl %ss)", self.key, lease.id, self.ttl_s)

    async def _keep_alive(self) -> None:
        interval = max(self.ttl_s / 3, 0.2)
        while True:
            await asyncio.sleep(interval)
            try:
                if self._lease is None:
                    await self._register()
                    continue
                reply = await asyncio.wait_for(self._lease.refresh(), self._timeout)
                if reply is None or reply.TTL <= 0:
                    log.warning("lease of %s expired; registering again", self.key)
                    self._lease, self.state = None, "lost"
                    await self._register()
            except ETCD_ERRORS as exc:
                if self.state != "lost":
                    log.warning("etcd unreachable for %s (%r); still serving, retrying", self.key, exc)
                self.state = "lost"
                self._lease = None if _lease_gone(exc) else self._lease

    async def update(self, record: Record) -> None:
        """Replace the record (e.g. with ``state=DRAINING``); kept for the next registration if etcd is away."""
        self.record = record
        if self._lease is None:
            return
        async with translated(f"updating {self.key}"):
            await asyncio.wait_for(
                self._client.put(self.key.encode(), record.to_json().encode(), lease=self._lease), self._timeout
            )

    async def aclose(self) -> None:
        """Stop the keeper and revoke the lease, so the record goes at once."""
        if self.state == "closed":
            return
        self.state = "closed"
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait([task], self.key)  # a plain cancel can be lost inside wait_for (3.11)
        lease, self._lease = self._lease, None
        if lease is not None:
            try:
                await asyncio.wait_for(lease.revoke(), self._timeout)
            except ETCD_ERRORS as exc:
                log.warning("could not revoke lease of %s (%r); it expires in %ss", self.key, exc, self.ttl_s)



def _lease_gone(exc: BaseException) -> bool:
    return "lease not found" in str(exc).lower()
