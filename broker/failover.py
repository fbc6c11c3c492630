"""Failover over the nodes of a RabbitMQ cluster: a robust connection that moves to the next URL.

aio-pika's robust connection reconnects to the one URL it was given (its
reconnect loop reads ``self.url`` before every attempt, and nothing takes a
list; upstream issue mosquito/aio-pika#141 is open). :class:`FailoverConnection`
keeps aio-pika's loop, and with it the restore of every robust channel,
queue and consumer after a reconnect, and changes only which URL the next
attempt uses: aio-pika calls ``_on_connection_close`` both when an open
connection is lost and when an attempt fails, and there the URL moves on.
:class:`Rotation` is the rule (which URL next, how long to wait).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

from aio_pika.connection import make_url
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from aio_pika.robust_connection import RobustConnection
from yarl import URL

from inferq.settings import mask_url

log = logging.getLogger("inferq.broker")


class Rotation:
    """Which of ``count`` URLs to try next, and the pause before trying.

    A lost connection moves to the next URL at once. Failed attempts keep the
    base pause until every URL has failed once in a row; from then on each
    further round of failures doubles it, up to ``ceiling``.
    """

    def __init__(self, count: int, base: float, ceiling: float, start: int = 0) -> None:
        if count < 1:
            raise ValueError("a rotation needs at least one URL")
        self.count = count
        self.base = base
        self.ceiling = max(ceiling, base)
        self.index = start % count
        self.failures = 0  # attempts failed in a row since the last success

    def lost(self) -> int:
        """An open connection broke: the index of the URL to try now."""
        self.failures = 0
        self.index = (self.index + 1) % self.count
        return self.index

    def failed(self) -> int:
        """An attempt failed: the index of the URL to try next (after :attr:`pause`)."""
        self.failures += 1
        self.index = (self.index + 1) % self.count
        return self.index

    def connected(self) -> None:
        """An attempt succeeded."""
        self.failures = 0

    @property
    def pause(self) -> float:
        """Seconds to wait before the next attempt."""
        rounds = self.failures // self.count
        return min(self.ceiling, self.base * 2 ** min(rounds, 30))


class FailoverConnection(RobustConnection):
    """A robust connection over several URLs (the nodes of one cluster), starting at ``urls[start]``."""

    def __init__(self, urls: Sequence[URL], start: int, *, reconnect_interval: float, reconnect_ceiling: float,
                 **kwargs: Any) -> None:
        self.urls = [URL(u) for u in urls]
        self.rotation = Rotation(len(self.urls), reconnect_interval, reconnect_ceiling, start)
        super().__init__(self.urls[self.rotation.index], reconnect_interval=reconnect_interval, **kwargs)

    @property
    def current_url(self) -> str:
        """The URL in use (or tried next), password masked."""
        return mask_url(str(self.url.with_query(None)))

    async def _on_connection_close(self, closing: asyncio.Future) -> None:
        # Runs for a lost connection and for a failed attempt, before aio-pika's loop sleeps
        # `reconnect_interval` and tries `self.url` again: both are set here first.
        if not (self._close_called or self.is_closed):
            was = self.current_url
            if self.connected.is_set():
                self.url = self.urls[self.rotation.lost()]
                self.reconnect_interval = self.rotation.base
                log.warning("connection to %s lost; failing over to %s", was, self.current_url)
            else:
                self.url = self.urls[self.rotation.failed()]
                self.reconnect_interval = self.rotation.pause
                if self.connection_attempt:  # not the first connect: BrokerConnection.open reports that one
                    log.info("cannot connect to %s; trying %s in %.1fs", was, self.current_url, self.reconnect_interval)
        await super()._on_connection_close(closing)

    async def _on_connected(self) -> None:
        await super()._on_connected()
        if self.rotation.failures or self.connection_attempt > 1:
            log.info("connected to %s", self.current_url)
        self.rotation.connected()
        self.reconnect_interval = self.rotation.base


async def connect_first(urls: Sequence[str], name: str, *, timeout: float, heartbeat_s: int = 30,
                        reconnect_interval_s: float = 1.0, reconnect_ceiling_s: float = 5.0) -> FailoverConnection:
    """A failover connection, open on the first of ``urls`` that answers within ``timeout``.

    Raises the last error (an aio-pika/aiormq connection error, OSError or
    TimeoutError) when none does. Later losses fail over on their own.
    """
    parsed = [make_url(u, heartbeat=heartbeat_s) for u in urls]
    error: BaseException = ConnectionError("no broker URL given")
    for start in range(len(parsed)):
        connection = FailoverConnection(parsed, start, reconnect_interval=reconnect_interval_s,
                                        reconnect_ceiling=reconnect_ceiling_s, client_properties={"connection_name": name})
        tried = connection.current_url
        try:
            await asyncio.wait_for(connection.connect(timeout=timeout), timeout)
            return connection
        except BaseException as exc:
            # A failed (or cancelled) try must not leave aio-pika's reconnect loop running.
            with contextlib.suppress(*CONNECTION_EXCEPTIONS, TimeoutError):
                await asyncio.shield(asyncio.wait_for(connection.close(), timeout))
            if not isinstance(exc, (*CONNECTION_EXCEPTIONS, TimeoutError)):
                raise
            error = exc
            log.info("%s: %s does not answer (%r)", name, tried, exc)
    raise error
