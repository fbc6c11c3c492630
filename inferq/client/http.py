"""The async HTTP client of the edge's submit-and-poll API (/v1): msgpack by default, JSON on request."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping
from typing import Any
from urllib.parse import quote

import aiohttp
import numpy as np

from inferq.broker.codec import packb, unpackb
from inferq.client.document import JobDocument, json_inputs, msgpack_inputs
from inferq.client.events import read_events
from inferq.client.job import AsyncJob
from inferq.client.ordered import ordered_map
from inferq.client.retry import RETRYABLE, RetryPolicy, error_for, parse_retry_after
from inferq.errors import CodecError, InferqError, NotFound, Timeout, Unavailable

log = logging.getLogger("inferq.client")

DEFAULT_URL = "http://127.0.0.1:8000"
MSGPACK = "application/msgpack"
JSON = "application/json"
PROGRESS_POLL_S = 0.5  # how long each poll waits while a progress bar is shown
MAX_WAIT_S = 60.0  # the edge's default edge.max_wait_s; a lower cap there only means more polls
MIN_POLL_S = 0.05


def _path(*parts: str) -> str:
    return "/" + "/".join(quote(p, safe="") for p in parts)


def jobs_path(model: str, version: str | None) -> str:
    """Where a job for ``model`` (optionally pinned to ``version``) is submitted."""
    return _path("v1", "models", model, "versions", version, "jobs") if version else _path("v1", "models", model, "jobs")


class AsyncClient:
    """Submit jobs to an inferq edge and get their results, with asyncio.

    ``url`` defaults to ``$INFERQ_URL`` or ``http://127.0.0.1:8000``, ``api_key`` to
    ``$INFERQ_API_KEY``. ``timeout`` bounds every request (a long poll gets its
    wait on top). ``format`` is ``"msgpack"`` (raw tensor bytes) or ``"json"``.
    429 and 503 answers are retried as ``retry`` says, honouring ``Retry-After``.
    Use it as ``async with AsyncClient(...) as client`` or call :meth:`aclose`.
    """

    def __init__(self, url: str | None = None, api_key: str | None = None, *, timeout: float = 30.0,
                 format: str = "msgpack", retry: RetryPolicy | None = None, connections: int = 100) -> None:
        if format not in ("msgpack", "json"):
            raise ValueError("format must be 'msgpack' or 'json'")
        self.url = (url or os.environ.get("INFERQ_URL") or DEFAULT_URL).rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("INFERQ_API_KEY") or None
        self.timeout = timeout
        self.format = format
        self.retry = retry or RetryPolicy()
        self._connections = connections
        self._http: aiohttp.ClientSession | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"AsyncClient({self.url!r}, format={self.format!r})"

    async def open(self) -> AsyncClient:
        """Create the connection pool (done on first use otherwise)."""
        if self._closed:
            raise InferqError("this client is closed")
        if self._http is None:
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            self._http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=self._connections), headers=headers)
        return self

    async def aclose(self) -> None:
        """Close the connection pool; the client cannot be used after this."""
        self._closed = True
        if self._http is not None:
            http, self._http = self._http, None
            await http.close()

    async def __aenter__(self) -> AsyncClient:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def job(self, job_id: str) -> AsyncJob:
        """A handle on a job submitted earlier (by any client), by its id."""
        return AsyncJob(job_id, http=self)

    async def submit(self, model: str, inputs: Mapping[str, np.ndarray], *, version: str | None = None,
                     idempotency_key: str | None = None, ttl: float | None = None,
                     outputs: Iterable[str] | None = None, shard: int | None = None, webhook: str | None = None,
                     webhook_events_filter: Iterable[str] | None = None) -> AsyncJob:
        """Queue a job; returns once the edge has it stored (``job.id`` names it from then on).

        ``shard=N`` has the edge split it into N chunk sub-jobs along the batch dimension (a job
        past the model's max_batch_size is split anyway); its document then shows ``progress``.
        ``webhook`` is a URL the edge POSTs the signed job document to on ``webhook_events_filter``
        (``"start"``, ``"completed"``; default ``["completed"]``).
        """
        extras: dict[str, Any] = {}
        if webhook is not None:
            extras["webhook"] = webhook
        if webhook_events_filter is not None:
            extras["webhook_events_filter"] = list(webhook_events_filter)
        return await self._submit(model, inputs, version, idempotency_key, ttl, outputs, wait=0.0, shard=shard,
                                  extras=extras)

    async def infer(self, model: str, inputs: Mapping[str, np.ndarray], *, version: str | None = None,
                    idempotency_key: str | None = None, ttl: float | None = None,
                    outputs: Iterable[str] | None = None, timeout: float | None = None) -> dict[str, np.ndarray]:
        """Submit and wait for the outputs, in one request when the job finishes quickly.

        Raises :class:`~inferq.errors.JobFailed` if the job fails and
        :class:`~inferq.errors.Timeout` if it is not final within ``timeout`` seconds.
        """
        started = time.monotonic()
        wait = MAX_WAIT_S if timeout is None else min(timeout, MAX_WAIT_S)
        job = await self._submit(model, inputs, version, idempotency_key, ttl, outputs, wait=wait)
        remaining = None if timeout is None else max(0.0, timeout - (time.monotonic() - started))
        return await job.result(remaining)

    def map(self, model: str, inputs: Iterable[Mapping[str, np.ndarray]] | AsyncIterable[Mapping[str, np.ndarray]], *,
            concurrency: int = 16, version: str | None = None, ttl: float | None = None, timeout: float | None = None,
            return_exceptions: bool = False) -> AsyncIterator[dict[str, np.ndarray] | Exception]:
        """:meth:`infer` for each item, ``concurrency`` jobs in flight, outputs yielded in input order.

        A failed job raises (and cancels the rest), or with ``return_exceptions``
        its error is yielded in its place. Close the iterator if you stop early
        (``contextlib.aclosing``).
        """
        async def one(item: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            return await self.infer(model, item, version=version, ttl=ttl, timeout=timeout)

        return ordered_map(one, inputs, concurrency, return_exceptions)

    async def get_job(self, job_id: str, wait: float = 0.0) -> JobDocument:
        """The job's document; with ``wait`` the edge answers once it is final or ``wait`` seconds passed."""
        params = {"wait": f"{wait:g}"} if wait > 0 else None
        ctype, body = await self._request("GET", _path("v1", "jobs", job_id), params=params, wait=wait,
                                          headers={"Accept": self._accept})
        return self._document(ctype, body)

    async def poll_final(self, job_id: str, timeout: float | None = None, unknown_ok: bool = False,
                         on_progress: Callable[[JobDocument], None] | None = None) -> JobDocument:
        """Long-poll until the job is final; ``unknown_ok`` keeps polling while the edge does not know it yet.

        With ``on_progress`` each poll is short (PROGRESS_POLL_S) and every document is passed to it,
        so a sharded job's ``progress`` can be shown as it rises.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = MIN_POLL_S
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise Timeout(f"job {job_id} is not final after {timeout:g}s")
            wait = MAX_WAIT_S if remaining is None else min(remaining, MAX_WAIT_S)
            if on_progress is not None:
                wait = min(wait, PROGRESS_POLL_S)
            asked = time.monotonic()
            try:
                document = await self.get_job(job_id, wait)
            except NotFound:
                if not unknown_ok:
                    raise
                document = None
            if document is not None and on_progress is not None:
                on_progress(document)
            if document is not None and document.final:
                return document
            if time.monotonic() - asked < wait / 2:
                # Not held by the edge (an unknown job, or an edge capping waits low): do not spin.
                await asyncio.sleep(pause if remaining is None else min(pause, max(remaining, 0)))
                pause = min(pause * 2, 1.0)

    async def job_events(self, job_id: str, last_event_id: str | None = None) -> AsyncIterator[JobDocument]:
        """The job's documents as its event stream sends them: its state now, each change, the final state.

        A connection lost mid-stream is resumed from the last event seen (``Last-Event-ID``).
        """
        http = (await self.open())._http
        assert http is not None
        while True:
            headers = {"Accept": "text/event-stream"}
            if last_event_id is not None:
                headers["Last-Event-ID"] = last_event_id
            # No total timeout: a queued job's stream is open as long as it waits (heartbeats keep it alive).
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout, sock_read=self.timeout + 30)
            try:
                async with http.get(self.url + _path("v1", "jobs", job_id, "events"), headers=headers, timeout=timeout) as resp:
                    if resp.status >= 400:
                        raise error_for(resp.status, _decode(resp.content_type, await resp.read()), None)
                    async for event in read_events(resp):
                        last_event_id = event.id or last_event_id
                        document = JobDocument.from_json(event.json())
                        yield document
                        if document.final:
                            return
            except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, TimeoutError) as exc:
                log.info("event stream of job %s lost (%r); resuming after %s", job_id, exc, last_event_id)
                await asyncio.sleep(self.retry.pause(0, None, time.monotonic(), connection=True) or 1.0)

    async def list_jobs(self, model: str | None = None, *, version: str | None = None, status: str | None = None,
                        limit: int | None = None, after: str | None = None) -> tuple[list[dict[str, Any]], str | None]:
        """One page of this caller's jobs, newest first (summaries, no outputs), and the cursor of the next."""
        params = {k: str(v) for k, v in {"model": model, "version": version, "status": status, "limit": limit,
                                         "after": after}.items() if v is not None}
        _, body = await self._request("GET", "/v1/jobs", params=params, headers={"Accept": JSON})
        if not isinstance(body, dict) or not isinstance(body.get("jobs"), list):
            raise CodecError(f"unexpected answer to a job listing: {str(body)[:200]}")
        return body["jobs"], body.get("next")

    async def job_stats(self, model: str | None = None, version: str | None = None) -> dict[str, int]:
        """This caller's jobs counted by status (and ``total``)."""
        params = {k: v for k, v in {"model": model, "version": version}.items() if v is not None}
        _, body = await self._request("GET", "/v1/jobs/stats", params=params, headers={"Accept": JSON})
        if not isinstance(body, dict) or not isinstance(body.get("counts"), dict):
            raise CodecError(f"unexpected answer to job stats: {str(body)[:200]}")
        return body["counts"]

    async def cancel_job(self, job_id: str) -> JobDocument:
        """Cancel a queued job; a finished job is returned as it is. A running job raises Conflict."""
        ctype, body = await self._request("DELETE", _path("v1", "jobs", job_id), headers={"Accept": self._accept})
        return self._document(ctype, body)

    async def models(self) -> list[dict[str, Any]]:
        """Every model the edge knows: versions, signatures, workers, queue depth."""
        _, body = await self._request("GET", "/v1/models", headers={"Accept": JSON})
        if not isinstance(body, dict) or not isinstance(body.get("models"), list):
            raise CodecError("unexpected answer to GET /v1/models")
        return body["models"]

    async def model(self, name: str) -> dict[str, Any]:
        """One model's description (see :meth:`models`)."""
        _, body = await self._request("GET", _path("v1", "models", name), headers={"Accept": JSON})
        if not isinstance(body, dict):
            raise CodecError(f"unexpected answer to GET /v1/models/{name}")
        return body

    @property
    def _accept(self) -> str:
        return MSGPACK if self.format == "msgpack" else JSON

    async def _submit(self, model: str, inputs: Mapping[str, np.ndarray], version: str | None,
                      idempotency_key: str | None, ttl: float | None, outputs: Iterable[str] | None,
                      wait: float, shard: int | None = None, extras: Mapping[str, Any] | None = None) -> AsyncJob:
        body: dict[str, Any] = dict(extras or {})
        names = list(outputs) if outputs is not None else None
        if self.format == "msgpack":
            body["inputs"] = msgpack_inputs(inputs)
            if names is not None:
                body["outputs"] = names
            data, ctype = packb(body), MSGPACK
        else:
            body["inputs"] = json_inputs(inputs)
            if names is not None:
                body["outputs"] = [{"name": n} for n in names]
            data, ctype = json.dumps(body).encode(), JSON
        headers = {"Content-Type": ctype, "Accept": self._accept}
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        params = {}
        if ttl is not None:
            params["ttl"] = f"{ttl:g}"
        if wait > 0:
            params["wait"] = f"{wait:g}"
        if shard is not None:
            params["shard"] = str(shard)
        # Without an idempotency key a POST cut off mid-way is not repeated: it may have made a job.
        rtype, answer = await self._request("POST", jobs_path(model, version), params=params, data=data,
                                            headers=headers, wait=wait, repeatable=idempotency_key is not None)
        if isinstance(answer, dict) and "created_at" in answer:  # 200: the job finished within the wait
            document = self._document(rtype, answer)
            return AsyncJob(document.job_id, document.model, document.version, http=self, document=document)
        if not isinstance(answer, dict) or not isinstance(answer.get("job_id"), str):
            raise CodecError(f"unexpected answer to a submission: {str(answer)[:200]}")
        return AsyncJob(answer["job_id"], str(answer.get("model", model)), str(answer.get("version", version or "")), http=self)

    def _document(self, ctype: str, body: Any) -> JobDocument:
        return JobDocument.from_msgpack(body) if ctype == MSGPACK else JobDocument.from_json(body)

    async def _request(self, method: str, path: str, *, params: Mapping[str, str] | None = None,
                       data: bytes | None = None, headers: Mapping[str, str] | None = None, wait: float = 0.0,
                       repeatable: bool = True) -> tuple[str, Any]:
        """One API call, retried on 429/503 (and lost connections when ``repeatable``); returns (content type, body)."""
        http = (await self.open())._http
        assert http is not None
        started, attempt = time.monotonic(), 0
        while True:
            lost = False
            try:
                status, ctype, retry_after, body = await self._once(http, method, path, params, data, headers, wait)
            except TimeoutError as exc:
                raise Timeout(f"{method} {path}: no answer from {self.url} within {self.timeout + wait:g}s") from exc
            except aiohttp.ClientConnectorError as exc:  # refused or unresolvable: nothing was sent
                error, retry_after, lost = Unavailable(f"cannot reach the edge at {self.url}: {exc}"), None, True
            except aiohttp.ClientError as exc:
                error, retry_after, lost = Unavailable(f"{method} {path}: connection to {self.url} lost: {exc!r}"), None, True
                if not repeatable:
                    raise error from exc
            else:
                if status < 400:
                    return ctype, body
                error = error_for(status, body, retry_after)
                if status not in RETRYABLE:
                    raise error
            pause = self.retry.pause(attempt, retry_after, started, connection=lost)
            if pause is None:
                raise error
            log.info("%s %s: %s; trying again in %.2fs", method, path, error, pause)
            await asyncio.sleep(pause)
            attempt += 1

    async def _once(self, http: aiohttp.ClientSession, method: str, path: str, params: Mapping[str, str] | None,
                    data: bytes | None, headers: Mapping[str, str] | None, wait: float) -> tuple[int, str, float | None, Any]:
        timeout = aiohttp.ClientTimeout(total=self.timeout + wait)
        async with http.request(method, self.url + path, params=params, data=data, headers=headers, timeout=timeout) as resp:
            raw = await resp.read()
            return resp.status, resp.content_type, parse_retry_after(resp.headers.get("Retry-After")), _decode(resp.content_type, raw)


def _decode(ctype: str, raw: bytes) -> Any:
    try:
        if ctype == MSGPACK:
            return unpackb(raw)
        if ctype == JSON:
            return json.loads(raw)
    except (CodecError, ValueError):
        pass
    return raw.decode("utf-8", "replace")
