"""The blocking client: :class:`AsyncClient` driven on a private event loop in one thread of its own.

A loop of its own (rather than ``asyncio.run`` per call) keeps the connection
pool across calls and works where the caller already runs a loop (notebooks).
:meth:`Client.close` stops the loop and joins the thread; a client never
closed is closed when it is garbage collected or at interpreter exit.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import AsyncIterator, Awaitable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

import numpy as np

from inferq.client.document import JobDocument
from inferq.client.http import AsyncClient
from inferq.client.job import Job
from inferq.client.retry import RetryPolicy
from inferq.errors import InferqError

T = TypeVar("T")


class LoopThread:
    """An event loop running in a daemon thread; :meth:`run` executes a coroutine there and blocks for its result."""

    def __init__(self, name: str = "inferq-client") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()
        self._lock = threading.Lock()
        self.closed = False

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Awaitable[T]) -> T:
        """Run ``coro`` on the loop; an interrupt of the caller (Ctrl-C) cancels it."""
        if self.closed:
            if asyncio.iscoroutine(coro):
                coro.close()
            raise InferqError("this client is closed")
        if threading.current_thread() is self._thread:  # e.g. from an iterable that map reads: it would wait on itself
            if asyncio.iscoroutine(coro):
                coro.close()
            raise InferqError("the blocking client cannot be called from its own thread (use AsyncClient there)")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def close(self, last: Awaitable[Any] | None = None) -> None:
        """Run ``last`` (a clean-up), cancel what is left, stop the loop and join the thread."""
        with self._lock:
            if self.closed:
                if asyncio.iscoroutine(last):
                    last.close()
                return
            self.closed = True
        if threading.current_thread() is self._thread:  # collected on the loop's own thread: just stop it
            self.loop.call_soon(self.loop.stop)
            return
        asyncio.run_coroutine_threadsafe(_finish(last), self.loop).result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


async def _finish(last: Awaitable[Any] | None) -> None:
    if last is not None:
        await last
    current = asyncio.current_task()
    rest = [t for t in asyncio.all_tasks() if t is not current]
    for task in rest:
        task.cancel()
    await asyncio.gather(*rest, return_exceptions=True)
    await asyncio.get_running_loop().shutdown_asyncgens()


_END = object()


async def _next(results: AsyncIterator[T]) -> T | object:
    try:
        return await results.__anext__()
    except StopAsyncIteration:
        return _END


def _close(runner: LoopThread, client: AsyncClient) -> None:
    runner.close(client.aclose())


class Client:
    """Submit jobs to an inferq edge and get their results, blocking.

    The same arguments and methods as :class:`~inferq.client.http.AsyncClient`,
    without ``await``. Use it as ``with Client(...) as client`` or call :meth:`close`.
    """

    def __init__(self, url: str | None = None, api_key: str | None = None, *, timeout: float = 30.0,
                 format: str = "msgpack", retry: RetryPolicy | None = None, connections: int = 100) -> None:
        self._async = AsyncClient(url, api_key, timeout=timeout, format=format, retry=retry, connections=connections)
        self._runner = LoopThread()
        self._finalizer = weakref.finalize(self, _close, self._runner, self._async)

    def __repr__(self) -> str:
        return f"Client({self.url!r}, format={self._async.format!r})"

    @property
    def url(self) -> str:
        return self._async.url

    def close(self) -> None:
        """Close the connections and stop the client's thread."""
        self._finalizer()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, coro: Awaitable[T]) -> T:
        return self._runner.run(coro)

    def job(self, job_id: str) -> Job:
        """A handle on a job submitted earlier (by any client), by its id."""
        return Job(self._async.job(job_id), self._run)

    def submit(self, model: str, inputs: Mapping[str, np.ndarray], *, version: str | None = None,
               idempotency_key: str | None = None, ttl: float | None = None,
               outputs: Iterable[str] | None = None, shard: int | None = None, webhook: str | None = None,
               webhook_events_filter: Iterable[str] | None = None) -> Job:
        """Queue a job; returns once the edge has it stored (``shard=N``: split into N chunk sub-jobs;
        ``webhook``: see :meth:`AsyncClient.submit`)."""
        job = self._run(self._async.submit(model, inputs, version=version, idempotency_key=idempotency_key,
                                           ttl=ttl, outputs=outputs, shard=shard, webhook=webhook,
                                           webhook_events_filter=webhook_events_filter))
        return Job(job, self._run)

    def list_jobs(self, model: str | None = None, *, version: str | None = None, status: str | None = None,
                  limit: int | None = None, after: str | None = None) -> tuple[list[dict[str, Any]], str | None]:
        """One page of this caller's jobs, newest first, and the cursor of the next (see :meth:`AsyncClient.list_jobs`)."""
        return self._run(self._async.list_jobs(model, version=version, status=status, limit=limit, after=after))

    def job_stats(self, model: str | None = None, version: str | None = None) -> dict[str, int]:
        """This caller's jobs counted by status (and ``total``)."""
        return self._run(self._async.job_stats(model, version))

    def infer(self, model: str, inputs: Mapping[str, np.ndarray], *, version: str | None = None,
              idempotency_key: str | None = None, ttl: float | None = None,
              outputs: Iterable[str] | None = None, timeout: float | None = None) -> dict[str, np.ndarray]:
        """Submit and wait for the outputs (see :meth:`AsyncClient.infer`)."""
        return self._run(self._async.infer(model, inputs, version=version, idempotency_key=idempotency_key,
                                           ttl=ttl, outputs=outputs, timeout=timeout))

    def map(self, model: str, inputs: Iterable[Mapping[str, np.ndarray]], *, concurrency: int = 16,
            version: str | None = None, ttl: float | None = None, timeout: float | None = None,
            return_exceptions: bool = False) -> Iterator[dict[str, np.ndarray] | Exception]:
        """:meth:`infer` for each item, ``concurrency`` in flight, outputs in input order (see :meth:`AsyncClient.map`).

        ``inputs`` is read on the client's thread, as room frees up.
        """
        results = self._async.map(model, inputs, concurrency=concurrency, version=version, ttl=ttl,
                                  timeout=timeout, return_exceptions=return_exceptions)
        try:
            while (item := self._run(_next(results))) is not _END:
                yield item
        finally:
            if not self._runner.closed:
                self._run(results.aclose())

    def get_job(self, job_id: str, wait: float = 0.0) -> JobDocument:
        """The job's document, long-polling up to ``wait`` seconds for it to be final."""
        return self._run(self._async.get_job(job_id, wait))

    def cancel_job(self, job_id: str) -> JobDocument:
        """Cancel a queued job; a finished job is returned as it is."""
        return self._run(self._async.cancel_job(job_id))

    def models(self) -> list[dict[str, Any]]:
        """Every model the edge knows."""
        return self._run(self._async.models())

    def model(self, name: str) -> dict[str, Any]:
        """One model's description."""
        return self._run(self._async.model(name))
