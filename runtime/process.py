"""Child ``inferq`` processes (workers, edges) started and stopped from asyncio.

Every child is tied to this process (:mod:`inferq.runtime.lifeline`): it gets
SIGTERM when we die, so a SIGKILLed parent leaves no orphan behind.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from inferq.runtime.lifeline import child_env

log = logging.getLogger("inferq.process")


class ChildProcess:
    """One ``inferq <args>`` child. Build with :meth:`start`; :meth:`aclose` stops it (idempotent)."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process) -> None:
        self.name = name
        self._proc = proc
        self.state = "running"

    @classmethod
    async def start(cls, name: str, args: list[str], env: dict[str, str] | None = None, log_path: Path | None = None) -> ChildProcess:
        """Spawn ``python -m inferq.cli <args>`` with ``env`` added to ours, tied to this process by its lifeline."""
        out = open(log_path, "ab") if log_path else None
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "inferq.cli", *args,
                env={**os.environ, **(env or {}), **child_env()}, stdin=asyncio.subprocess.DEVNULL,
                stdout=out, stderr=asyncio.subprocess.STDOUT if out else None,
                start_new_session=True,  # Ctrl-C reaches the supervisor only; it stops children in order
            )
        finally:
            if out:
                out.close()
        log.info("started %s (pid %d)", name, proc.pid)
        return cls(name, proc)

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    async def wait(self) -> int:
        """The exit status once the child has exited (negative: the signal that killed it)."""
        return await self._proc.wait()

    def signal(self, sig: int) -> None:
        if self._proc.returncode is None:
            self._proc.send_signal(sig)

    async def aclose(self, grace_s: float = 30.0) -> int:
        """SIGTERM (the child drains), then SIGKILL after ``grace_s``."""
        if self.state == "closed":
            return self._proc.returncode or 0
        self.state = "closed"
        self.signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self._proc.wait(), grace_s)
        except TimeoutError:
            log.warning("%s did not stop in %ss; killing it", self.name, grace_s)
            self.signal(signal.SIGKILL)
            return await self._proc.wait()
