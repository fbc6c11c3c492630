"""Leader election on etcd: one lease-backed key; the holder's create revision is its fencing token.

A candidate creates the key only if it does not exist (a transaction on
``create_revision == 0``), attached to its own lease. The key vanishes when
the leader's lease ends (process died, cut off past the TTL), and a standby
takes it on its next try. Before acting, a leader checks that the key still
carries its token, so a paused ex-leader never acts on stale authority.

When etcd does not answer (a member died, quorum lost), a leader does not act,
but keeps its lease and token: once etcd answers again and the key still
carries the token, it leads on at once instead of waiting out its own lease.
``last_error`` says why the last round could not reach etcd (None when it did).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aetcd

from inferq.runtime.coordination import ETCD_ERRORS

log = logging.getLogger("inferq.election")


class LeaderElection:
    """One candidate. Call :meth:`campaign` and :meth:`confirm` each tick; :meth:`aclose` resigns."""

    def __init__(self, client: aetcd.Client, key: str, identity: str, ttl_s: int, timeout_s: float) -> None:
        self._client = client
        self.key = key
        self.identity = identity
        self.ttl_s = ttl_s
        self._timeout = timeout_s
        self._lease: Any = None
        self.token: int | None = None
        self.state = "follower"
        self.last_error: str | None = None

    async def campaign(self) -> bool:
        """Try to become (or stay) leader; False while another candidate holds the key."""
        try:
            if self.token is not None:
                return await self.confirm()
            if await asyncio.wait_for(self._client.get(self.key.encode()), self._timeout) is not None:
                return False
            self._lease = await asyncio.wait_for(self._client.lease(self.ttl_s), self._timeout)
            if await self._try_create():
                return True
            lease, self._lease = self._lease, None
            await asyncio.wait_for(lease.revoke(), self._timeout)
            self.last_error = None
            return False
        except ETCD_ERRORS as exc:
            if self.last_error is None:
                log.warning("election: etcd unreachable (%r)", exc)
            self.last_error = _describe(exc)
            self._step_down()
            return False

    async def _try_create(self) -> bool:
        tx = self._client.transactions
        ok, responses = await asyncio.wait_for(
            self._client.transaction(
                compare=[tx.create(self.key.encode()) == 0],
                success=[tx.put(self.key.encode(), self.identity.encode(), lease=self._lease)],
                failure=[],
            ),
            self._timeout,
        )
        self.last_error = None
        if ok:
            self.token = responses[0].response_put.header.revision
            self.state = "leader"
            log.info("became leader %s (token %d)", self.identity, self.token)
        return ok

    async def confirm(self) -> bool:
        """Refresh the lease and check the key still carries our token."""
        if self.token is None or self._lease is None:
            return False
        try:
            reply = await asyncio.wait_for(self._lease.refresh(), self._timeout)
            current = await asyncio.wait_for(self._client.get(self.key.encode()), self._timeout)
        except ETCD_ERRORS as exc:
            if "lease not found" in str(exc).lower():
                log.warning("lost leadership (token %s): the lease has expired", self.token)
                self._step_down()
                return False
            if self.last_error is None:
                log.warning("election: cannot confirm leadership (%r); not acting until etcd answers", exc)
            self.last_error = _describe(exc)
            self.state = "unconfirmed"
            return False
        self.last_error = None
        if reply is None or reply.TTL <= 0 or current is None or current.create_revision != self.token:
            log.warning("lost leadership (token %s)", self.token)
            self._step_down()
            return False
        self.state = "leader"
        return True

    def _step_down(self) -> None:
        self.token, self._lease, self.state = None, None, "follower"

    async def holder(self) -> str | None:
        """Identity of the current leader, if any."""
        current = await asyncio.wait_for(self._client.get(self.key.encode()), self._timeout)
        return current.value.decode() if current else None

    async def aclose(self) -> None:
        """Resign: revoke the lease so a standby takes over at once. Idempotent."""
        lease, self.token, self.state = self._lease, None, "closed"
        self._lease = None
        if lease is not None:
            try:
                await asyncio.wait_for(lease.revoke(), self._timeout)
            except ETCD_ERRORS as exc:
                log.warning("could not resign (%r); leadership lapses with the lease", exc)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Fence:
    """The receiving end of fencing tokens: refuses a command from a leader older than one already heard.

    The leader checks its token right before it sends, but a leader paused
    between that check and the send (a GC pause, a SIGSTOP) can still send
    after a successor has acted. Its token is the older key's create revision,
    so the receiver, which keeps the highest token it has seen, refuses it.
    A command without a token (from an operator's CLI) is let through.
    """

    def __init__(self) -> None:
        self.highest = 0

    def admit(self, token: object) -> bool:
        """Whether a command carrying ``token`` may act; an int token at least the highest seen raises it."""
        if token is None:
            return True
        if type(token) is not int or token < self.highest:
            return False
        self.highest = token
        return True

