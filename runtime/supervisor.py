"""Supervision: named ``inferq`` children kept running, restarted with backoff, given up on when they crash-loop.

``inferq up`` supervises its edge and autoscaler, and the edge-node agent its
workers, with the same :class:`Supervisor`. A child that exits without being
asked to is a crash, with one exception: a *transient* child (a worker) that
exits 0 has finished (a drained worker) and stays down. A crash is logged with
its exit status and the child is started again after the delay that
:class:`RestartPolicy` gives: 0.5 s, doubling up to 30 s. A child that crashes
5 times within 60 s is given up on: the supervisor logs why, sets
:attr:`Supervisor.failed`, and leaves the rest to its owner (``inferq up`` stops
everything and exits non-zero; an agent reports it in its node record).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from inferq.runtime.process import ChildProcess

log = logging.getLogger("inferq.supervisor")


class RestartPolicy:
    """When to restart a crashed child and when to stop trying. Pure: the caller passes the clock.

    The delay doubles with each crash in a row, from ``initial_s`` up to ``max_s``; a run
    that lasted ``stable_s`` or more starts the doubling afresh. ``max_crashes``
    crashes within ``window_s`` mean the child cannot run here: give up.
    """

    def __init__(self, initial_s: float = 0.5, max_s: float = 30.0, window_s: float = 60.0, max_crashes: int = 5,
                 stable_s: float = 60.0) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self.window_s = window_s
        self.max_crashes = max_crashes
        self.stable_s = stable_s
        self._crashes: list[float] = []
        self._streak = 0

    @property
    def recent_crashes(self) -> int:
        """Crashes counted in the window as of the last call to :meth:`crashed`."""
        return len(self._crashes)

    def crashed(self, now: float, ran_s: float) -> float | None:
        """Note a crash at ``now`` of a run that lasted ``ran_s``; the delay before the restart, or None: give up."""
        self._crashes = [t for t in self._crashes if now - t < self.window_s] + [now]
        self._streak = 1 if ran_s >= self.stable_s else self._streak + 1
        if len(self._crashes) >= self.max_crashes:
            return None
        return min(self.max_s, self.initial_s * 2 ** (self._streak - 1))


@dataclass(frozen=True)
class ChildSpec:
    """What to run: ``inferq <args>`` with ``env``, output appended to ``log_path``.

    A permanent child (edge, autoscaler) is restarted whenever it exits unasked;
    a transient one (a worker) only when it fails: its exit 0 means it is done.
    """

    name: str
    args: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    log_path: Path | None = None
    permanent: bool = True


def describe_exit(returncode: int) -> str:
    """``exit status 2`` or ``killed by SIGKILL``, for logs and node records."""
    if returncode >= 0:
        return f"exit status {returncode}"
    try:
        return f"killed by {signal.Signals(-returncode).name}"
    except ValueError:
        return f"killed by signal {-returncode}"


class _Child:
    """One supervised child: its current process, its policy and its watch task."""

    def __init__(self, spec: ChildSpec, policy: RestartPolicy, process: ChildProcess) -> None:
        self.spec = spec
        self.policy = policy
        self.process = process
        self.started = time.monotonic()
        self.restarts = 0
        self.stopping = False
        self.woken = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def pause(self, delay_s: float) -> bool:
        """Wait ``delay_s``; False if a stop came meanwhile."""
        try:
            await asyncio.wait_for(self.woken.wait(), delay_s)
        except TimeoutError:
            return True
        return False


class Supervisor:
    """Keeps named children running. :meth:`add` starts one; :meth:`aclose` stops them all.

    ``ordered``: stop the children one by one, last added first (``inferq up``:
    the edge before the autoscaler); otherwise all at once (an agent's workers).
    """

    def __init__(self, name: str, grace_s: float = 30.0, ordered: bool = True, policy: type[RestartPolicy] = RestartPolicy) -> None:
        self.name = name
        self.grace_s = grace_s
        self.ordered = ordered
        self._policy = policy
        self._children: dict[str, _Child] = {}
        self.failed = asyncio.Event()
        self.failure = ""
        self.restarts = 0
        self.last_exit = ""

    @property
    def running(self) -> int:
        """Children being kept up (a child waiting for its restart counts)."""
        return len(self._children)

    def pids(self) -> dict[str, int]:
        """The current pid of each child."""
        return {name: child.process.pid for name, child in self._children.items()}

    async def add(self, spec: ChildSpec) -> int:
        """Start ``spec`` and keep it running; its pid. Names are unique among running children."""
        if spec.name in self._children:
            raise ValueError(f"{self.name}: a child named {spec.name!r} is already supervised")
        child = _Child(spec, self._policy(), await self._spawn(spec))
        self._children[spec.name] = child
        child.task = asyncio.create_task(self._watch(child), name=f"{self.name}:{spec.name}")
        return child.process.pid

    @staticmethod
    async def _spawn(spec: ChildSpec) -> ChildProcess:
        return await ChildProcess.start(spec.name, list(spec.args), dict(spec.env), spec.log_path)

    async def _watch(self, child: _Child) -> None:
        """Wait for the child to exit and restart it while its policy allows; then forget it."""
        try:
            while (delay_s := await self._next_delay(child)) is not None:
                if not await child.pause(delay_s) or not await self._restart(child):
                    return
        finally:
            self._children.pop(child.spec.name, None)

    async def _next_delay(self, child: _Child) -> float | None:
        """Wait for the current process to exit; the delay before restarting it, or None to leave it down."""
        returncode = await child.process.wait()
        if child.stopping:
            return None
        self.last_exit = f"{child.spec.name}: {describe_exit(returncode)}"
        if returncode == 0 and not child.spec.permanent:
            log.info("%s (pid %d) finished (exit status 0); not restarting it", child.spec.name, child.process.pid)
            return None
        return self._crashed(child, returncode)

    def _crashed(self, child: _Child, returncode: int) -> float | None:
        now = time.monotonic()
        delay_s = child.policy.crashed(now, now - child.started)
        if delay_s is not None:
            log.warning("%s (pid %d) crashed: %s; restarting it in %.1fs", child.spec.name, child.process.pid,
                        describe_exit(returncode), delay_s)
            return delay_s
        where = f"; see {child.spec.log_path}" if child.spec.log_path else ""
        self.failure = (f"{child.spec.name} crashed {child.policy.recent_crashes} times within "
                        f"{child.policy.window_s:.0f}s (last: {describe_exit(returncode)}); giving up on it{where}")
        log.error("%s", self.failure)
        self.failed.set()
        return None

    async def _restart(self, child: _Child) -> bool:
        """Start the child's next process; False if that failed or a stop came while it started."""
        try:
            child.process = await self._spawn(child.spec)
        except OSError as exc:
            self.failure = f"{child.spec.name} could not be restarted: {exc}; giving up on it"
            log.error("%s", self.failure)
            self.failed.set()
            return False
        child.started = time.monotonic()
        child.restarts += 1
        self.restarts += 1
        log.info("restarted %s (pid %d, restart %d)", child.spec.name, child.process.pid, child.restarts)
        if child.stopping:  # a stop arrived while it started: it must not outlive the supervisor
            await child.process.aclose(self.grace_s)
            return False
        return True

    async def _stop(self, child: _Child) -> None:
        child.stopping = True
        child.woken.set()
        await child.process.aclose(self.grace_s)
        if child.task is not None:
            await asyncio.gather(child.task, return_exceptions=True)

    async def aclose(self) -> None:
        """Stop every child (SIGTERM, so each drains; SIGKILL after the grace) and stop restarting them."""
        children = list(self._children.values())
        if self.ordered:
            for child in reversed(children):
                await self._stop(child)
        else:
            await asyncio.gather(*(self._stop(c) for c in children))
