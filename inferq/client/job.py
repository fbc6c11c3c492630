"""Handles on submitted jobs: :class:`AsyncJob` (async) and :class:`Job` (blocking), with the same methods."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from inferq.client.document import JobDocument, JobStatus
from inferq.errors import ConfigError, NotFound, Timeout

if TYPE_CHECKING:
    from inferq.client.http import AsyncClient

T = TypeVar("T")


class AsyncJob:
    """A job that was accepted: by the edge (HTTP) or by the broker's confirm (AMQP).

    Jobs from :class:`~inferq.client.amqp.AmqpClient` resolve from their reply;
    when that client was given an edge URL they are polled over HTTP as well.
    """

    def __init__(self, job_id: str, model: str = "", version: str = "", *, http: AsyncClient | None = None,
                 reply: asyncio.Future[JobDocument] | None = None, document: JobDocument | None = None) -> None:
        self.id = job_id
        self.model = model
        self.version = version
        self._http = http
        self._reply = reply
        self._final = document if document is not None and document.final else None

    def __repr__(self) -> str:
        return f"AsyncJob({self.id!r}, model={self.model!r}, version={self.version!r})"

    @property
    def _amqp(self) -> bool:
        return self._reply is not None

    async def get(self) -> JobDocument:
        """The job's document now (no waiting)."""
        if self._final is not None:
            return self._final
        if self._reply is not None and self._reply.done() and not self._reply.cancelled() and self._reply.exception() is None:
            return self._keep(self._reply.result())
        if self._http is None:
            # AMQP without an edge: confirmed, no reply yet; queued or already running.
            return JobDocument(self.id, JobStatus.QUEUED, self.model, self.version)
        try:
            return self._keep(await self._http.get_job(self.id))
        except NotFound:
            if not self._amqp:
                raise
            # The ledger first hears of an AMQP job when a worker takes it.
            return JobDocument(self.id, JobStatus.QUEUED, self.model, self.version)

    async def status(self) -> JobStatus:
        """The job's status now."""
        return (await self.get()).status

    async def wait(self, timeout: float | None = None) -> JobDocument:
        """The job's final document, waiting up to ``timeout`` seconds (None: as long as it takes)."""
        if self._final is not None:
            return self._final
        waiters = []
        if self._reply is not None:
            waiters.append(asyncio.ensure_future(_shielded(self._reply)))
        if self._http is not None:
            waiters.append(asyncio.ensure_future(self._http.poll_final(self.id, unknown_ok=self._amqp)))
        try:
            return self._keep(await _first_success(waiters, timeout, f"job {self.id} is not final after {timeout}s"))
        finally:
            for waiter in waiters:
                waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)

    async def result(self, timeout: float | None = None) -> dict[str, np.ndarray]:
        """The outputs, once the job succeeded; :class:`~inferq.errors.JobFailed` if it did not."""
        return (await self.wait(timeout)).outputs_or_raise()

    async def events(self) -> AsyncIterator[JobDocument]:
        """The job's documents as they change (its event stream): the state now, each change, then the final one."""
        if self._http is None:
            raise ConfigError("a job's events come from the edge: give AmqpClient.open an edge_url")
        async for document in self._http.job_events(self.id):
            yield self._keep(document)

    async def cancel(self) -> JobDocument:
        """Cancel the job if it is still queued (over HTTP); a finished job is returned as it is."""
        if self._http is None:
            raise ConfigError("cancelling a job needs the edge: give AmqpClient.open an edge_url")
        try:
            return self._keep(await self._http.cancel_job(self.id))
        except NotFound as exc:
            if not self._amqp:
                raise
            raise NotFound(f"{exc}; an AMQP job is known to the edge only once a worker took it, "
                           "so a job still waiting in its queue cannot be cancelled over HTTP yet") from exc

    def _keep(self, document: JobDocument) -> JobDocument:
        if document.final:
            self._final = document
        return document


async def _first_success(waiters: list[asyncio.Future[T]], timeout: float | None, late: str) -> T:
    """The first waiter's result that is not an error; if all fail, the last error."""
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    pending = set(waiters)
    while True:
        remaining = None if deadline is None else max(0.0, deadline - loop.time())
        done, pending = await asyncio.wait(pending, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        if not done:
            raise Timeout(late)
        for waiter in done:
            if waiter.exception() is None:
                return waiter.result()
        if not pending:
            return done.pop().result()  # raises: every way of learning the result failed


async def _next_or_end(stream: AsyncIterator[JobDocument]) -> JobDocument | None:
    # A coroutine for the client's loop thread: StopAsyncIteration cannot cross threads as such.
    try:
        return await anext(stream)
    except StopAsyncIteration:
        return None


async def _shielded(reply: asyncio.Future[JobDocument]) -> JobDocument:
    # Several waits may share one reply: giving up on one must not cancel it for the others.
    return await asyncio.shield(reply)


class Job:
    """A job submitted with the blocking :class:`~inferq.client.sync.Client`; the methods of :class:`AsyncJob`."""

    def __init__(self, job: AsyncJob, run: Callable[[Awaitable[Any]], Any]) -> None:
        self._job = job
        self._run = run

    def __repr__(self) -> str:
        return f"Job({self.id!r}, model={self.model!r}, version={self.version!r})"

    @property
    def id(self) -> str:
        return self._job.id

    @property
    def model(self) -> str:
        return self._job.model

    @property
    def version(self) -> str:
        return self._job.version

    def get(self) -> JobDocument:
        """The job's document now (no waiting)."""
        return self._run(self._job.get())

    def status(self) -> JobStatus:
        """The job's status now."""
        return self._run(self._job.status())

    def wait(self, timeout: float | None = None) -> JobDocument:
        """The job's final document, waiting up to ``timeout`` seconds (None: as long as it takes)."""
        return self._run(self._job.wait(timeout))

    def result(self, timeout: float | None = None) -> dict[str, np.ndarray]:
        """The outputs, once the job succeeded; :class:`~inferq.errors.JobFailed` if it did not."""
        return self._run(self._job.result(timeout))

    def events(self) -> Iterator[JobDocument]:
        """The job's documents as they change: the state now, each change, then the final one."""
        stream = self._job.events()
        try:
            while (document := self._run(_next_or_end(stream))) is not None:
                yield document
        finally:
            self._run(stream.aclose())

    def cancel(self) -> JobDocument:
        """Cancel the job if it is still queued; a finished job is returned as it is."""
        return self._run(self._job.cancel())
