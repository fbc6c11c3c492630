"""The result spool: final events a worker could not write to the ledger, kept on disk until it can.

A batch whose events the ledger cannot take (the broker is away, or refuses writes
past the worker's hold time) is written here, one file per batch, in the ledger's
own message format (:func:`inferq.broker.messages.join_packed_events`). Each file
is written under a temporary name, fsynced and renamed, so a ``*.spool`` file that
exists is whole; a temporary file torn by a crash is ignored (and removed once its
writer is dead).

:meth:`Spool.run` writes each file's events to the ledger, confirmed, then deletes
the file. A crash between the two writes the events again on the next flush, which
is harmless: ledger readers keep the first final state per job id. A redelivered
job whose event is spooled (or was flushed lately) is ended with that event
(:meth:`Spool.recall`) instead of being run again.

The directory is one model version's on a node, shared by its workers, so a
restarted worker flushes what its predecessor left; an ``flock`` on the directory
lets one process flush at a time.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import fcntl
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

from inferq.broker.ledger import LedgerWriter
from inferq.broker.messages import FAILED, JobEvent, error_dict, join_packed_events, pack_event, unpack_events
from inferq.errors import BrokerError, CodecError, EventTooLarge

log = logging.getLogger("inferq.spool")

SUFFIX = ".spool"
TEMP_SUFFIX = ".tmp"
RECALL_BYTES = 32 * 1024 * 1024  # flushed events kept in memory, for redeliveries that arrive after the flush
RETRY_MIN_S = 0.5
RETRY_MAX_S = 5.0  # the ledger is tried this often at least while it is away


class Spool:
    """One model version's spool directory. Build with :meth:`open`; :meth:`run` is its flusher."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self._where: dict[str, str] = {}  # job id -> the pending file holding its event
        self._files: dict[str, list[str]] = {}  # pending file name -> its job ids
        self._recent: dict[str, JobEvent] = {}  # job id -> its event, flushed lately
        self._recent_files: collections.OrderedDict[str, tuple[list[str], int]] = collections.OrderedDict()
        self._recent_bytes = 0
        self._lock = asyncio.Lock()  # one flush at a time in this process (the flock is per process)
        self._wake = asyncio.Event()
        self.flushed_events = 0

    @classmethod
    async def open(cls, directory: Path, max_bytes: int) -> Spool:
        """Create the directory if need be and index what an earlier run left in it."""
        self = cls(directory, max_bytes)
        left = await asyncio.to_thread(self._load)
        for name, job_ids in left.items():
            self._index(name, job_ids)
        if left:
            log.info("%d spooled batch(es) of %d job(s) left in %s; flushing them once the ledger takes writes",
                     len(left), len(self._where), directory)
        return self

    @property
    def pending(self) -> int:
        """Spooled files not flushed yet (as far as this process knows)."""
        return len(self._files)

    def holds(self, job_id: str) -> bool:
        """Whether this spool has ``job_id``'s event (pending or flushed lately): a cheap check before :meth:`recall`."""
        return job_id in self._where or job_id in self._recent

    async def put(self, events: list[JobEvent]) -> bool:
        """Write ``events`` durably as one file; False (and nothing written) if over ``max_bytes`` or the disk fails."""
        if not events:
            return True
        body = join_packed_events([pack_event(e) for e in events])
        name = await asyncio.to_thread(self._write, body)
        if name is None:
            return False
        self._index(name, [e.job_id for e in events])
        self._wake.set()
        return True

    async def recall(self, job_ids: Iterable[str]) -> dict[str, JobEvent]:
        """The spooled events of those of ``job_ids`` this spool holds."""
        wanted = set(job_ids)
        found = {j: self._recent[j] for j in wanted if j in self._recent}
        for name in {self._where[j] for j in wanted if j in self._where}:
            events = await asyncio.to_thread(self._read, name)
            found.update({e.job_id: e for e in events or () if e.job_id in wanted})
        # A file flushed while it was read: its events are among the recent ones now.
        found.update({j: self._recent[j] for j in wanted - set(found) if j in self._recent})
        return found

    async def durable(self, job_ids: Iterable[str], ledger: LedgerWriter) -> None:
        """Return once the events of ``job_ids`` are in the ledger (flushing their files now); BrokerError if not."""
        names = {self._where[j] for j in job_ids if j in self._where}
        if names:
            await self.flush(ledger, names)

    async def flush(self, ledger: LedgerWriter, only: set[str] | None = None) -> int:
        """Write the spooled files (or those named in ``only``) to the ledger and delete them; the events written."""
        written = 0
        async with self._lock, self._locked():
            names = await asyncio.to_thread(self._listing)
            self._forget_gone(set(names))  # flushed by another worker of this version meanwhile
            for name in names:
                if only is not None and name not in only:
                    continue
                events = await asyncio.to_thread(self._read, name)
                if events is None:
                    continue
                await _write(ledger, events)
                size = await asyncio.to_thread(self._delete, name)
                self._flushed(name, events, size)
                written += len(events)
        self.flushed_events += written
        if written:
            log.info("flushed %d spooled job event(s) to the ledger", written)
        return written

    async def run(self, ledger: LedgerWriter) -> None:
        """Flush whatever is spooled, retrying with backoff while the ledger refuses writes; runs until cancelled."""
        delay = RETRY_MIN_S
        while True:
            while not self._files:
                self._wake.clear()
                await self._wake.wait()
            try:
                await self.flush(ledger)
            except BrokerError as exc:
                log.info("spooled results not flushed yet (%s); next try in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            delay = RETRY_MIN_S

    def _index(self, name: str, job_ids: list[str]) -> None:
        self._files[name] = job_ids
        self._where.update(dict.fromkeys(job_ids, name))

    def _unindex(self, name: str) -> list[str]:
        job_ids = self._files.pop(name, [])
        for job_id in job_ids:
            if self._where.get(job_id) == name:
                del self._where[job_id]
        return job_ids

    def _forget_gone(self, present: set[str]) -> None:
        for name in [n for n in self._files if n not in present]:
            self._unindex(name)

    def _flushed(self, name: str, events: list[JobEvent], size: int) -> None:
        """Move a file's events from pending to the recent ones, within RECALL_BYTES."""
        self._unindex(name)
        if size > RECALL_BYTES:
            return
        self._recent.update({e.job_id: e for e in events})
        self._recent_files[name] = ([e.job_id for e in events], size)
        self._recent_bytes += size
        while self._recent_bytes > RECALL_BYTES:
            _, (job_ids, dropped) = self._recent_files.popitem(last=False)
            self._recent_bytes -= dropped
            for job_id in job_ids:
                self._recent.pop(job_id, None)

    @contextlib.asynccontextmanager
    async def _locked(self) -> AsyncIterator[None]:
        """The directory's flock, polled so that a slow flush elsewhere never blocks a thread."""
        fd = await asyncio.to_thread(os.open, self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await asyncio.sleep(0.1)
            yield
        finally:
            os.close(fd)  # releases the lock

    # Blocking file work, run in a thread.

    def _load(self) -> dict[str, list[str]]:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._remove_torn()
        left = {}
        for name in self._listing():
            events = self._read(name)
            if events is not None:
                left[name] = [e.job_id for e in events]
        return left

    def _listing(self) -> list[str]:
        """Whole spool files, oldest first (their names start with the time they were written)."""
        return sorted(e.name for e in os.scandir(self.directory) if e.name.endswith(SUFFIX) and e.is_file())

    def _used(self) -> int:
        return sum(e.stat().st_size for e in os.scandir(self.directory) if e.name.endswith(SUFFIX))

    def _write(self, body: bytes) -> str | None:
        try:
            used = self._used()
            if used + len(body) > self.max_bytes:
                log.warning("result spool %s is full (%d of %d bytes, jobs.spool_max_bytes): %d bytes not spooled",
                            self.directory, used, self.max_bytes, len(body))
                return None
            name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}{SUFFIX}"
            temp = self.directory / f".{name}.{os.getpid()}{TEMP_SUFFIX}"
            with open(temp, "xb") as file:
                file.write(body)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temp, self.directory / name)
            _fsync_dir(self.directory)
            return name
        except OSError as exc:  # a full or broken disk: the caller falls back to handing the jobs back
            log.warning("could not spool %d bytes of results in %s: %s", len(body), self.directory, exc)
            return None

    def _read(self, name: str) -> list[JobEvent] | None:
        """A file's events; None if it is gone (flushed elsewhere) or unreadable (moved aside as ``.corrupt``)."""
        path = self.directory / name
        try:
            events, bad = unpack_events(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, CodecError, ValueError) as exc:
            log.error("spooled results %s cannot be read (%s); moved aside as .corrupt", path, exc)
            with contextlib.suppress(OSError):
                os.replace(path, path.with_suffix(".corrupt"))
            return None
        if bad:
            log.error("%d malformed event(s) skipped in spooled results %s", bad, path)
        return events

    def _delete(self, name: str) -> int:
        path = self.directory / name
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        _fsync_dir(self.directory)
        return size

    def _remove_torn(self) -> None:
        """Temporary files whose writer died mid-write (their name ends with its pid)."""
        for entry in os.scandir(self.directory):
            if not entry.name.endswith(TEMP_SUFFIX):
                continue
            try:
                pid = int(entry.name[: -len(TEMP_SUFFIX)].rsplit(".", 1)[1])
            except (IndexError, ValueError):
                pid = 0
            if pid and pid != os.getpid() and _alive(pid):
                continue
            with contextlib.suppress(OSError):
                os.unlink(entry.path)


async def _write(ledger: LedgerWriter, events: list[JobEvent]) -> None:
    """Write spooled events; those now over the broker's message limit (its setting changed) fail instead."""
    try:
        await ledger.write(events)
    except EventTooLarge as exc:
        too_big = set(exc.job_ids)
        log.warning("%s", exc)
        error = error_dict("output_too_large", str(exc))
        await ledger.write([dataclasses.replace(e, status=FAILED, outputs=None, error=error) if e.job_id in too_big else e
                            for e in events])


def _fsync_dir(directory: Path) -> None:
    # The rename (or unlink) itself is durable only once the directory is synced.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
