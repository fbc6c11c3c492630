"""Submit jobs straight to RabbitMQ: publisher confirms, results on an exclusive ``reply_to`` queue.

The wire format is README's "AMQP contract" (``inferq.broker.messages``). A job
is accepted once the broker confirmed it into its model's quorum queue; its
result comes back on this client's reply queue. Replies are best effort (the
ledger is the record), so with an ``edge_url`` the jobs are polled over HTTP
as well, and can be cancelled there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping, Sequence
from typing import Any

import aio_pika
import aio_pika.abc
import numpy as np

from inferq.broker.codec import unpackb
from inferq.broker.connection import CONNECTION_ERRORS
from inferq.broker.failover import connect_first
from inferq.broker.identity import broker_user, reply_prefix
from inferq.broker.messages import JobRequest, check_job_id, new_job_id
from inferq.client.document import JobDocument
from inferq.client.http import AsyncClient
from inferq.client.job import AsyncJob
from inferq.client.ordered import ordered_map
from inferq.client.retry import RetryPolicy
from inferq.errors import CodecError, ConfigError, InferqError, RateLimited, Timeout, Unavailable, UnknownModel
from inferq.settings import mask_url

log = logging.getLogger("inferq.client")

DEFAULT_BROKER_URL = "amqp://guest:guest@127.0.0.1:5672/"


class AmqpClient:
    """Publish jobs to ``<namespace>.requests`` and collect their replies; build it with :meth:`open`.

    ``submit``, ``infer`` and ``map`` behave as :class:`~inferq.client.http.AsyncClient`'s
    and return the same :class:`~inferq.client.job.AsyncJob` handles. A full
    queue (the broker's nack) is retried as ``retry`` says, then raises
    :class:`~inferq.errors.RateLimited`; an unknown model raises
    :class:`~inferq.errors.UnknownModel` (the message comes back unroutable).
    """

    def __init__(self, connection: aio_pika.abc.AbstractConnection, channel: aio_pika.abc.AbstractChannel,
                 exchange: aio_pika.abc.AbstractExchange, namespace: str, *, http: AsyncClient | None,
                 tenant: str | None, timeout: float, retry: RetryPolicy, user_id: str | None = None) -> None:
        self.namespace = namespace
        self.http = http
        self.tenant = tenant
        self.user_id = user_id
        self.timeout = timeout
        self.retry = retry
        self.reply_queue = ""
        self._connection = connection
        self._channel = channel
        self._exchange = exchange
        self._pending: dict[str, asyncio.Future[JobDocument]] = {}
        self._closed = False

    @classmethod
    async def open(cls, url: str | Sequence[str] | None = None, *, namespace: str | None = None,
                   edge_url: str | None = None, api_key: str | None = None, tenant: str | None = None,
                   timeout: float = 10.0, retry: RetryPolicy | None = None) -> AmqpClient:
        """Connect, check that the namespace's request exchange exists and start consuming replies.

        ``url`` is one AMQP URL or the URLs of a cluster's nodes: the client
        connects to the first that answers and, if that connection is lost,
        moves on to the next (replies still pending then raise Unavailable; the
        jobs themselves are safe in their queue and can be polled with an
        ``edge_url``). It defaults to ``$INFERQ_BROKER_URLS`` (comma-separated),
        ``$INFERQ_BROKER_URL`` or the local guest account; ``namespace`` to
        ``$INFERQ_NAMESPACE`` or ``inferq``. ``tenant`` is recorded on the jobs
        (with auth on, only that tenant's API keys can poll them).
        Jobs carry the URL's user as ``user_id``: with auth on, workers give them
        to that broker user's tenant. ``tenant`` names the reply queue
        ``<ns>.replies.<tenant>.<hex>``, the only kind a tenant's broker user may read.
        """
        urls = broker_urls(url)
        namespace = namespace or os.environ.get("INFERQ_NAMESPACE") or "inferq"
        try:
            connection = await connect_first(urls, "inferq-client", timeout=timeout)
        except (TimeoutError, *CONNECTION_ERRORS) as exc:
            raise Unavailable(f"cannot connect to RabbitMQ at {', '.join(mask_url(u) for u in urls)}: {exc!r}") from exc
        try:
            channel = await asyncio.wait_for(connection.channel(publisher_confirms=True, on_return_raises=True), timeout)
            exchange = await _requests_exchange(channel, namespace, timeout)
            http = AsyncClient(edge_url, api_key, timeout=timeout, retry=retry) if edge_url else None
            self = cls(connection, channel, exchange, namespace, http=http, tenant=tenant, timeout=timeout,
                       retry=retry or RetryPolicy(), user_id=broker_user(url))
            await self._consume_replies()
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.shield(asyncio.wait_for(connection.close(), timeout))
            raise
        connection.close_callbacks.add(self._on_connection_closed)
        return self

    async def _consume_replies(self) -> None:
        name = f"{reply_prefix(self.namespace, self.tenant)}{uuid.uuid4().hex}" if self.tenant else None
        queue = await asyncio.wait_for(self._channel.declare_queue(name, exclusive=True, auto_delete=True), self.timeout)
        self.reply_queue = queue.name
        await asyncio.wait_for(queue.consume(self._on_reply, no_ack=True), self.timeout)

    async def aclose(self) -> None:
        """Close the connection (and the HTTP client); jobs still waiting for a reply raise Unavailable."""
        if self._closed:
            return
        self._closed = True
        self._fail_pending("the client was closed before the reply came")
        try:
            await asyncio.wait_for(self._connection.close(), self.timeout)
        except (TimeoutError, *CONNECTION_ERRORS) as exc:
            log.debug("closing the AMQP connection: %r", exc)
        if self.http is not None:
            await self.http.aclose()

    async def __aenter__(self) -> AmqpClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def job(self, job_id: str) -> AsyncJob:
        """A handle on a job by its id, polled over HTTP (no reply comes for it here)."""
        if self.http is None:
            raise ConfigError("a job handle without a reply needs the edge: give AmqpClient.open an edge_url")
        return AsyncJob(job_id, http=self.http)

    async def submit(self, model: str, inputs: Mapping[str, np.ndarray], *, version: str | None = None,
                     job_id: str | None = None, ttl: float | None = None, outputs: Iterable[str] | None = None,
                     priority: str = "normal", webhook: str | None = None,
                     webhook_events_filter: Iterable[str] | None = None) -> AsyncJob:
        """Publish one job; returns once the broker confirmed it.

        ``job_id`` (the AMQP ``message_id``) is yours to choose, for example to
        make a retried submission name the same job; by default a random one.
        ``priority="high"`` puts it ahead of every normal job of its model version still waiting.
        ``webhook`` (headers ``x-inferq-webhook``/``-events``) is told of ``webhook_events_filter``
        (default ``["completed"]``); an edge checks and delivers it.
        """
        if self._closed:
            raise InferqError("this client is closed")
        job_id = check_job_id(job_id) if job_id is not None else new_job_id()
        request = JobRequest(
            job_id, {k: np.asarray(v) for k, v in inputs.items()}, tuple(outputs) if outputs is not None else None,
            reply_to=self.reply_queue, correlation_id=job_id, priority=priority, ttl_s=ttl, tenant=self.tenant,
            webhook={"url": webhook, "events": list(webhook_events_filter or ["completed"])} if webhook else None,
        )
        routing_key = f"{model}.{version}" if version else model
        # Registered before publishing: the reply may come before the confirm does.
        reply = self._pending[job_id] = asyncio.get_running_loop().create_future()
        try:
            await self._publish(request, routing_key)
        except BaseException:
            self._pending.pop(job_id, None)
            reply.cancel()
            raise
        return AsyncJob(job_id, model, version or "", http=self.http, reply=reply)

    async def infer(self, model: str, inputs: Mapping[str, np.ndarray], *, version: str | None = None,
                    ttl: float | None = None, outputs: Iterable[str] | None = None,
                    timeout: float | None = None) -> dict[str, np.ndarray]:
        """Publish and wait for the outputs; :class:`~inferq.errors.JobFailed` if the job fails."""
        job = await self.submit(model, inputs, version=version, ttl=ttl, outputs=outputs)
        return await job.result(timeout)

    def map(self, model: str, inputs: Iterable[Mapping[str, np.ndarray]] | AsyncIterable[Mapping[str, np.ndarray]], *,
            concurrency: int = 64, version: str | None = None, ttl: float | None = None, timeout: float | None = None,
            return_exceptions: bool = False) -> AsyncIterator[dict[str, np.ndarray] | Exception]:
        """:meth:`infer` for each item, ``concurrency`` in flight, outputs in input order."""
        async def one(item: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            return await self.infer(model, item, version=version, ttl=ttl, timeout=timeout)

        return ordered_map(one, inputs, concurrency, return_exceptions)

    async def _publish(self, request: JobRequest, routing_key: str) -> None:
        body = request.body()
        started, attempt = time.monotonic(), 0
        while True:
            try:
                message = request.to_message(body, self.user_id)  # fresh timestamps on every try
                await asyncio.wait_for(self._exchange.publish(message, routing_key, mandatory=True), self.timeout)
                return
            except aio_pika.exceptions.PublishError as exc:  # returned: no queue behind the routing key
                raise UnknownModel(f"no queue is bound for {routing_key!r} in namespace {self.namespace!r}: "
                                   "unknown model or version") from exc
            except aio_pika.exceptions.DeliveryError as exc:  # nacked: the queue is full (reject-publish)
                error = RateLimited(f"the broker refused job {request.job_id} for {routing_key!r}: its queue is full")
                error.__cause__ = exc
            except TimeoutError as exc:
                raise Timeout(f"no confirm for job {request.job_id} within {self.timeout:g}s; "
                              "it may or may not be queued") from exc
            except CONNECTION_ERRORS as exc:
                raise Unavailable(f"publishing job {request.job_id} failed: {exc!r}") from exc
            pause = self.retry.pause(attempt, None, started)
            if pause is None:
                raise error
            log.info("%s; trying again in %.2fs", error, pause)
            await asyncio.sleep(pause)
            attempt += 1

    async def _on_reply(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        try:
            document = JobDocument.from_msgpack(unpackb(message.body))
        except CodecError as exc:
            log.warning("ignoring a malformed reply (message_id %s): %s", message.message_id, exc)
            return
        reply = self._pending.pop(document.job_id, None)  # a duplicate reply finds nothing: deduplicated
        if reply is not None and not reply.done():
            reply.set_result(document)

    def _on_connection_closed(self, _sender: Any, *args: Any) -> None:
        if not self._closed:
            self._fail_pending(f"the connection to RabbitMQ was lost before the reply came {args!r}")

    def _fail_pending(self, why: str) -> None:
        pending, self._pending = self._pending, {}
        for reply in pending.values():
            if not reply.done():
                reply.set_exception(Unavailable(why))
                reply.exception()  # marked retrieved: a job nobody waits for must not log an error


def broker_urls(url: str | Sequence[str] | None) -> list[str]:
    """The URLs to try: ``url`` (one or several), else ``$INFERQ_BROKER_URLS``, ``$INFERQ_BROKER_URL``, the default."""
    if url is None:
        listed = [u.strip() for u in os.environ.get("INFERQ_BROKER_URLS", "").split(",") if u.strip()]
        return listed or [os.environ.get("INFERQ_BROKER_URL") or DEFAULT_BROKER_URL]
    urls = [url] if isinstance(url, str) else [str(u) for u in url]
    if not urls:
        raise ConfigError("AmqpClient.open needs at least one broker URL")
    return urls


async def _requests_exchange(channel: aio_pika.abc.AbstractChannel, namespace: str,
                             timeout: float) -> aio_pika.abc.AbstractExchange:
    name = f"{namespace}.requests"
    try:
        return await asyncio.wait_for(channel.get_exchange(name, ensure=True), timeout)
    except aio_pika.exceptions.ChannelNotFoundEntity as exc:
        raise ConfigError(f"exchange {name!r} does not exist: wrong namespace, or `inferq models sync` has not run") from exc
