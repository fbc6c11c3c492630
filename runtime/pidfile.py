"""A pid file held under an exclusive ``flock`` for as long as its process lives.

The kernel drops the lock when the holder dies, however it dies, so a file
left behind by a SIGKILLed holder is recognised as stale and taken over,
while a live holder's lock makes a second process refuse to start.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

from inferq.errors import ConfigError

log = logging.getLogger("inferq.pidfile")


class PidFile:
    """This process's pid in ``path``, locked; build with :meth:`acquire`, give back with :meth:`release`."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, path: Path, what: str) -> PidFile:
        """Lock ``path`` and write our pid; ConfigError naming the holder's pid if ``what`` already runs."""
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited: children must not hold the lock
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_pid(fd)
                os.close(fd)
                raise ConfigError(f"{what} is already running on this node (pid {holder}; pid file {path})") from None
            if _same_file(fd, path):
                break
            os.close(fd)  # the holder removed the file between our open and our lock: try the new one
        stale = _read_pid(fd)
        if stale and stale != os.getpid():
            log.info("taking over the stale pid file %s of pid %d, which is no longer running", path, stale)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(path, fd)

    def release(self) -> None:
        """Remove the file and drop the lock (idempotent)."""
        if self._fd is None:
            return
        if _same_file(self._fd, self.path):
            self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "PidFile":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def _read_pid(fd: int) -> int:
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or 0)
    except ValueError:
        return 0


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == path.stat().st_ino
    except FileNotFoundError:
        return False
