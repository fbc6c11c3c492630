"""The actor base: a named unit with a mailbox, owned tasks and a phased stop.

An actor's background tasks are created with :meth:`Actor.spawn` and are
always awaited on stop; a task that dies with an error stops the actor (it
is not silently lost). Shutdown runs in phases: :meth:`on_drain` (stop pulling
work), a bounded grace for in-flight work (:meth:`wait_idle`), cancellation of
what is left, then :meth:`on_close` for resources.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger("inferq.actor")


class Actor:
    """Base class; subclasses override ``on_start``, ``on_drain``, ``wait_idle`` and ``on_close``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.mailbox: asyncio.Queue[Any] = asyncio.Queue()
        self.state = "new"
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopped = asyncio.Event()
        self._stop_requested = asyncio.Event()
        self.failure: BaseException | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.state}>"

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run ``coro`` as a task this actor owns; its failure stops the actor."""
        task = asyncio.create_task(coro, name=f"{self.name}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        log.error("%s: task %s failed: %r", self.name, task.get_name(), exc, exc_info=exc)
        self.failure = self.failure or exc
        self.request_stop()

    async def start(self) -> None:
        """Start the actor (idempotent)."""
        if self.state != "new":
            return
        self.state = "starting"
        await self.on_start()
        self.state = "running"
        log.info("%s started", self.name)

    def request_stop(self) -> None:
        """Ask for a graceful stop; :meth:`run` returns once it is done."""
        self._stop_requested.set()

    async def stop(self, grace_s: float = 30.0) -> None:
        """Stop in phases; idempotent, and waits for a stop already under way."""
        if self.state in ("stopping", "stopped"):
            await self._stopped.wait()
            return
        self.state = "stopping"
        try:
            await self.on_drain()
            try:
                await asyncio.wait_for(self.wait_idle(), grace_s)
            except TimeoutError:
                log.warning("%s: in-flight work did not finish within %ss; cancelling it", self.name, grace_s)
            await self._cancel_tasks()
            await self.on_close()
        finally:
            self.state = "stopped"
            self._stopped.set()
            log.info("%s stopped", self.name)

    async def _cancel_tasks(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def run(self, grace_s: float = 30.0, handle_signals: bool = True) -> None:
        """Start, serve until SIGTERM/SIGINT or :meth:`request_stop`, then stop gracefully."""
        loop = asyncio.get_running_loop()
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
        try:
            await self.start()
            await self._stop_requested.wait()
        finally:
            await asyncio.shield(self.stop(grace_s))
            if handle_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)

    async def __aenter__(self) -> Actor:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def on_start(self) -> None:
        """Acquire resources and begin work."""

    async def on_drain(self) -> None:
        """Stop taking new work."""

    async def wait_idle(self) -> None:
        """Return when in-flight work is done."""

    async def on_close(self) -> None:
        """Release resources (connections, leases, sessions)."""
