"""The actor base: a named unit with owned tasks, owned resources and a phased stop.

An actor's background tasks are created with :meth:`Actor.spawn` and are
always awaited on stop; a task that dies with an error stops the actor (it
is not silently lost). Resources (connections, consumers, leases, sessions)
are opened through :meth:`Actor.own`, which puts their ``aclose`` on the
actor's ``AsyncExitStack``. Shutdown runs in phases: :meth:`on_drain` (stop
pulling work), a bounded grace for in-flight work (:meth:`wait_idle`),
cancellation of what is left, :meth:`on_close`, then the resources, last
opened first. The last three run on every path, a failed drain included.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol, TypeVar

from inferq.runtime.tasks import cancel_and_wait

log = logging.getLogger("inferq.actor")

CLOSE_BUDGET_S = 15.0  # every owned resource's close together (supervisors and tests SIGKILL after 20 s)


class Closeable(Protocol):
    async def aclose(self) -> None: ...


C = TypeVar("C", bound=Closeable)


class Actor:
    """Base class; subclasses override ``on_start``, ``on_drain``, ``wait_idle`` and ``on_close``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.state = "new"
        self.resources = contextlib.AsyncExitStack()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopped = asyncio.Event()
        self._stop_requested = asyncio.Event()
        self.failure: BaseException | None = None
        self._close_deadline: float | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.state}>"

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run ``coro`` as a task this actor owns; its failure stops the actor."""
        task = asyncio.create_task(coro, name=f"{self.name}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    async def own(self, opening: Awaitable[C]) -> C:
        """Await a resource's async factory and close it when the actor stops (last opened, first closed)."""
        resource = await opening
        self.resources.push_async_callback(self._bounded, resource.aclose, repr(resource))
        return resource

    def on_stop(self, callback: Callable[[], Awaitable[Any]]) -> None:
        """Run ``callback`` when the actor stops, in the same last-in, first-out order as owned resources."""
        self.resources.push_async_callback(self._bounded, callback, getattr(callback, "__qualname__", repr(callback)))

    async def _bounded(self, close: Callable[[], Awaitable[Any]], what: str) -> None:
        """One close, within what is left of the stop's close budget.

        A close that hangs (a channel whose broker went quiet) must not hold the
        others, or the process, until its parent's SIGKILL: past the budget it is
        given up, loudly, and the process exit releases what it held.
        """
        loop = asyncio.get_running_loop()
        left = max(1.0, self._close_deadline - loop.time()) if self._close_deadline else CLOSE_BUDGET_S
        try:
            await asyncio.wait_for(close(), left)
        except TimeoutError:
            log.warning("%s: closing %s took over %.1f s; left to the process exit", self.name, what, left)

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
            await self._drain_phase(grace_s)
        finally:
            try:
                await self._cancel_tasks()
                await self.on_close()
            finally:
                self._close_deadline = asyncio.get_running_loop().time() + CLOSE_BUDGET_S
                await self.resources.aclose()
                self.state = "stopped"
                self._stopped.set()
                log.info("%s stopped", self.name)

    async def _drain_phase(self, grace_s: float) -> None:
        try:
            await asyncio.wait_for(self._drain_and_wait(), grace_s)
        except TimeoutError:
            log.warning("%s: in-flight work did not finish within %ss; cancelling it", self.name, grace_s)
        except Exception:  # a drain that fails (broker gone mid-reconnect) must not skip the close
            log.exception("%s: draining failed; closing anyway", self.name)

    async def _drain_and_wait(self) -> None:
        await self.on_drain()
        await self.wait_idle()

    async def _cancel_tasks(self) -> None:
        """Cancel every owned task and wait for all of them (see :mod:`inferq.runtime.tasks` on lost cancels)."""
        await cancel_and_wait(self._tasks, self.name)

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
