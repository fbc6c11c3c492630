"""A long-running process that inferq started and owns (a RabbitMQ node, an etcd member).

Each one carries a tag in its environment (``INFERQ_DAEMON=<tag>``). A child
of this process is signalled by its Popen pid until it is reaped; a daemon
found again by pid (another process started it) is signalled only while
``/proc/<pid>/environ`` shows the tag: a reused pid, or the machine's own
RabbitMQ, never carries it.

Watching the parent: with ``watch_parent`` the process is started through
util-linux ``setpriv --pdeathsig KILL``, so the kernel SIGKILLs it when the
thread that started it dies, even by SIGKILL (a test session killed mid-run).
``setpriv`` and the programs after it ``exec``, so the pid we hold is the
daemon's own. A normal interpreter exit is covered by ``atexit``. Daemons
meant to outlive their starter (``inferq services --cluster``) set
``watch_parent=False`` and are found again through their pid and tag.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import subprocess
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path

from inferq.errors import ServiceError

log = logging.getLogger("inferq.daemon")

TAG_VAR = "INFERQ_DAEMON"
_watched: weakref.WeakSet[Daemon] = weakref.WeakSet()


def tagged(pid: int, tag: str) -> bool:
    """Whether process ``pid`` exists and carries ``INFERQ_DAEMON=<tag>`` in its environment."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:  # gone, or not ours to read
        return False
    return f"{TAG_VAR}={tag}".encode() in environ.split(b"\0")


def exists(pid: int) -> bool:
    """Whether process ``pid`` exists and has not ended (a zombie counts as ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def tagged_pids(tag: str) -> list[int]:
    """Every process on the machine that carries ``tag`` (a daemon and the helpers it forked)."""
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and tagged(int(p.name), tag)]


class Daemon:
    """One owned process: start it, wait for it, SIGKILL exactly it."""

    def __init__(self, tag: str, pid: int | None = None, popen: subprocess.Popen | None = None) -> None:
        self.tag = tag
        self.pid = pid if popen is None else popen.pid
        self._popen = popen

    @classmethod
    def spawn(cls, tag: str, argv: Sequence[str], env: Mapping[str, str], log_path: Path, *,
              cwd: Path, watch_parent: bool = True) -> Daemon:
        """Start ``argv`` in its own session, its output appended to ``log_path``."""
        if watch_parent:
            setpriv = shutil.which("setpriv")
            if setpriv is None:
                raise ServiceError("setpriv (util-linux) is needed to tie a test daemon to its parent")
            argv = [setpriv, "--pdeathsig", "KILL", "--", *argv]
        with open(log_path, "ab") as out:
            popen = subprocess.Popen(
                list(argv), env={**env, TAG_VAR: tag}, cwd=cwd, stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        daemon = cls(tag, popen=popen)
        if watch_parent:
            _watched.add(daemon)
        return daemon

    def alive(self) -> bool:
        """Whether the process still runs (an ended child, or a pid without our tag, counts as gone)."""
        if self._popen is not None:
            # Our own child keeps its pid until we reap it. Its tag is not checked: until its exec,
            # /proc shows our environment, without the tag.
            return self._popen.poll() is None
        return self.pid is not None and tagged(self.pid, self.tag)

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the process to end; reap it if it is our child."""
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        if self._popen is not None:
            self._popen.wait(timeout=max(0.1, deadline - time.monotonic()))
        return True

    def signal(self, sig: int) -> None:
        """Send ``sig`` if the process is still ours."""
        if self.pid is not None and self.alive():
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:  # it ended between the check and the signal
                pass

    def kill(self, timeout: float = 10.0) -> None:
        """SIGKILL the process if it is still ours, and wait until it is gone."""
        self.signal(signal.SIGKILL)
        if not self.wait(timeout):
            raise ServiceError(f"process {self.pid} ({self.tag}) survived SIGKILL for {timeout:.0f}s")

    def exit_code(self) -> int | None:
        """The exit status once a child of ours has ended, else None."""
        return None if self._popen is None else self._popen.poll()


@atexit.register
def _kill_watched() -> None:
    # A test session that ends with a daemon still up (a failed teardown) takes it along.
    for daemon in list(_watched):
        if daemon.alive():
            log.warning("killing leftover %s (pid %s) at exit", daemon.tag, daemon.pid)
            try:
                daemon.kill(5)
            except ServiceError as exc:
                log.error("%s", exc)
