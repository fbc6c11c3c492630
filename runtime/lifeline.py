"""A child's lifeline to its parent: an ``inferq`` child dies with the process that started it.

A parent puts its pid in ``INFERQ_PARENT_PID`` (:func:`child_env`; every
:class:`~inferq.runtime.process.ChildProcess` does). The child calls :func:`arm`
first thing. On Linux that sets ``PR_SET_PDEATHSIG`` to SIGTERM, so the kernel
sends SIGTERM, which every actor takes as "drain and stop", the moment the parent
goes, even by SIGKILL. It is set in the child's own start-up, not in a
``preexec_fn``, which is unsafe in a parent with threads. The parent may have
died before the child got that far, so :meth:`Lifeline.intact` is checked at
once as well.

:func:`guarding` is the watchdog for what the kernel does not cover (macOS, a
parent that died before ``prctl``): every second it compares ``os.getppid()``
with the parent's pid, and on a change asks the actor for a graceful stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, MutableMapping
from dataclasses import dataclass

log = logging.getLogger("inferq.lifeline")

PARENT_ENV = "INFERQ_PARENT_PID"
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def child_env() -> dict[str, str]:
    """What a child needs in its environment to tie itself to this process."""
    return {PARENT_ENV: str(os.getpid())}


@dataclass(frozen=True)
class Lifeline:
    """This process's tie to the parent that started it."""

    parent: int

    def intact(self) -> bool:
        """Whether the parent that started us is still our parent (an orphan is adopted by another pid)."""
        return os.getppid() == self.parent

    async def watch(self, on_lost: Callable[[], None], interval_s: float = 1.0) -> None:
        """Return after calling ``on_lost`` once the parent is gone."""
        while self.intact():
            await asyncio.sleep(interval_s)
        log.warning("parent process %d is gone; stopping", self.parent)
        on_lost()


def arm(environ: MutableMapping[str, str] = os.environ) -> Lifeline | None:
    """Tie this process to the parent named in ``environ``, or return None when no inferq parent started it.

    The variable is removed, so a process this one starts never inherits a stale parent pid.
    """
    raw = environ.pop(PARENT_ENV, "")
    try:
        parent = int(raw)
    except ValueError:
        return None
    if sys.platform.startswith("linux"):
        _set_parent_death_signal(signal.SIGTERM)
    return Lifeline(parent)


def die_with_parent() -> None:
    """For a helper process without state of its own (a pool worker): SIGKILL it when its parent goes (Linux)."""
    if sys.platform.startswith("linux"):
        _set_parent_death_signal(signal.SIGKILL)


def _set_parent_death_signal(sig: int) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        # Not fatal: the watchdog in guarding() still notices a lost parent within a second.
        log.warning("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))


@contextlib.asynccontextmanager
async def guarding(lifeline: Lifeline | None, on_lost: Callable[[], None]) -> AsyncIterator[None]:
    """Watch ``lifeline`` while the block runs, calling ``on_lost`` if the parent goes; no-op without one."""
    if lifeline is None:
        yield
        return
    task = asyncio.create_task(lifeline.watch(on_lost), name="lifeline")
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
