"""A job's status: the one enum the server and the client SDK share (no broker client needed to import it)."""

from __future__ import annotations

import enum


class JobStatus(str, enum.Enum):
    """Where a job is. A str, so it compares and serialises as its value ("queued", ...); the last four are final."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    def __str__(self) -> str:
        return self.value

    @property
    def terminal(self) -> bool:
        """A final state: nothing changes a job after it."""
        return self not in (JobStatus.QUEUED, JobStatus.RUNNING)

    final = terminal
