"""The webhook sender: delivers what waits in ``<ns>.webhooks``, at least once, whatever the receivers do.

Every edge runs one; they share the queue as competing consumers. A delivery
is acked only after its outcome is settled in RabbitMQ: delivered, given up,
or republished (confirmed) to a retry tier ``<ns>.webhooks.retry.<s>``, where
it waits out its backoff as a per-message TTL and is dead-lettered back to
``<ns>.webhooks``. So no pending delivery lives in a process: an edge killed
mid-backoff loses nothing, and one killed mid-attempt has the attempt redone.

- **Backoff**: about 1, 4, 16, 64, 256 s with jitter (+0-50 %), then 450-600 s
  between attempts, until ``webhooks.max_age_s`` after the event.
- **Outcomes**: 2xx delivered; ``410 Gone`` stops at once; an address the SSRF
  guard refuses at delivery (DNS rebinding) stops too; anything else (down,
  non-2xx, redirect, ``webhooks.timeout_s``) is retried.
- **Isolation**: at most ``webhooks.per_host`` attempts at once to one host and
  ``webhooks.per_tenant`` for one tenant (with auth on). A delivery whose host or tenant is
  busy is put back on the shortest tier at once instead of waiting in hand, so a
  slow receiver never holds the prefetch that other tenants' deliveries need.
  Jobs and the ledger never wait on a receiver.

Each attempt's outcome is written to the ledger as a progress event
(``webhook_delivery``), so every edge shows it in the job document.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from urllib.parse import urlsplit

import aio_pika
import aiohttp
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.metrics_core import Metric

from inferq.broker.acks import ack, settle
from inferq.broker.connection import BrokerConnection, close_channel
from inferq.broker.ledger import LedgerWriter
from inferq.broker.messages import RUNNING, JobEvent
from inferq.broker.topology import WEBHOOK_DELAYS_S, Topology
from inferq.edge.webhook_url import AllowList, GuardedResolver, check_syntax, resolve
from inferq.edge.webhooks import DELIVERED, FAILED, PENDING, WebhookDelivery, parse_delivery, sign
from inferq.errors import BrokerError, InferqError, InvalidInput, WebhookNotAllowed
from inferq.runtime.metrics import gauge
from inferq.settings import WebhookSettings

log = logging.getLogger("inferq.edge.webhooks")

Secrets = Callable[[str | None], Awaitable[list[str]]]
BUSY_DELAY_S = 1  # a delivery whose host or tenant is at its limit comes back after about this long
ATTEMPT_BUCKETS = (1, 2, 3, 5, 8, 13, 21)
MAX_RESPONSE_BYTES = 64 * 1024


def backoff(attempts: int) -> tuple[int, float]:
    """(tier, seconds) to wait after ``attempts`` failed attempts: exponential, with jitter, at most 10 min."""
    tier = WEBHOOK_DELAYS_S[min(attempts, len(WEBHOOK_DELAYS_S)) - 1]
    if tier == WEBHOOK_DELAYS_S[-1]:
        return tier, tier * random.uniform(0.75, 1.0)
    return tier, tier * random.uniform(1.0, 1.5)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One attempt: the HTTP status (None if there was no answer), the error, and whether to give up."""

    status: int | None
    error: str | None
    final: bool

    @property
    def delivered(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


class WebhookSender:
    """Consumes ``<ns>.webhooks``. Build with :meth:`open`; :meth:`aclose` stops it."""

    def __init__(self, connection: BrokerConnection, topology: Topology, settings: WebhookSettings, ledger: LedgerWriter,
                 secrets: Secrets) -> None:
        self._connection = connection
        self._topology = topology
        self.settings = settings
        self._ledger = ledger
        self._secrets = secrets
        self._allow = AllowList.parse(settings.allow_hosts)
        self._tiers: set[int] = set()  # retry queues declared by this sender
        self._hosts: Counter[str] = Counter()
        self._tenants: Counter[str] = Counter()
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._session: aiohttp.ClientSession | None = None
        self.outcomes: Counter[str] = Counter()  # delivered, failed, retried, deferred
        self.attempts_at_end: Counter[int] = Counter()  # attempts of settled deliveries, by bucket
        self.attempts_sum = 0
        self.pending: int | None = None  # deliveries in <ns>.webhooks and its tiers, as last counted

    @classmethod
    async def open(cls, publishing: BrokerConnection, consuming: BrokerConnection, topology: Topology,
                   settings: WebhookSettings, ledger: LedgerWriter, secrets: Secrets) -> WebhookSender:
        """Declare the queues and start consuming."""
        self = cls(publishing, topology, settings, ledger, secrets)
        await topology.declare_webhooks(publishing.publisher)
        connector = aiohttp.TCPConnector(resolver=GuardedResolver(self._allow), use_dns_cache=False, limit=256)
        self._session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=settings.timeout_s))
        self._channel = await consuming.channel(prefetch=settings.prefetch)
        self._queue = await self._channel.declare_queue(topology.webhooks, passive=True)
        await self._queue.consume(self._on_message)
        return self

    async def _on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        delivery = parse_delivery(message.body)
        try:
            if delivery is not None:
                await self._handle(delivery)
        except Exception as exc:  # the outcome could not be settled (broker away): it comes back later
            log.warning("webhook %s: could not settle its outcome (%r); it will be redelivered", message.message_id, exc)
            await asyncio.sleep(BUSY_DELAY_S)
            await settle(message, requeue=True)
            return
        await ack(message)

    async def _handle(self, d: WebhookDelivery) -> None:
        if time.time() > d.first_at + self.settings.max_age_s:
            await self._settle(d, FAILED, d.attempts, None, f"gave up after {self.settings.max_age_s:g} s (webhooks.max_age_s)")
            return
        # Without tenants (auth off) only hosts are limited: one shared "tenant" would let two dead hosts stall all.
        host, tenant = urlsplit(d.url).hostname or "", d.tenant
        busy_tenant = tenant is not None and self._tenants[tenant] >= self.settings.per_tenant
        if self._hosts[host] >= self.settings.per_host or busy_tenant:
            self.outcomes["deferred"] += 1
            await self._connection.publish(d.message(BUSY_DELAY_S), await self._tier(BUSY_DELAY_S), mandatory=True)
            return
        self._hosts[host] += 1
        self._tenants[tenant or ""] += 1
        try:
            outcome = await self._attempt(d)
        finally:
            _release(self._hosts, host)
            _release(self._tenants, tenant or "")
        await self._after(d, outcome)

    async def _after(self, d: WebhookDelivery, outcome: Outcome) -> None:
        attempts = d.attempts + 1
        if outcome.delivered:
            await self._settle(d, DELIVERED, attempts, outcome.status, None)
        elif outcome.final or time.time() + backoff(attempts)[1] > d.first_at + self.settings.max_age_s:
            await self._settle(d, FAILED, attempts, outcome.status, outcome.error)
        else:
            tier, wait = backoff(attempts)
            log.info("webhook %s attempt %d failed (%s); retrying in %.1f s", d.webhook_id, attempts, outcome.error, wait)
            await self._connection.publish(dataclasses.replace(d, attempts=attempts).message(wait),
                                           await self._tier(tier), mandatory=True)
            self.outcomes["retried"] += 1
            await self._progress(d, PENDING, attempts, outcome.status, outcome.error)

    async def _tier(self, delay_s: int) -> str:
        """The retry queue of a backoff step, declared on first use: a namespace without retries has none."""
        if delay_s not in self._tiers:
            await self._topology.declare_webhook_retry(self._connection.publisher, delay_s)
            self._tiers.add(delay_s)
        return self._topology.webhook_retry(delay_s)

    async def _attempt(self, d: WebhookDelivery) -> Outcome:
        try:
            check_syntax(d.url)  # an AMQP publisher's URL was checked nowhere before
        except InvalidInput as exc:
            return Outcome(None, str(exc), final=True)
        parts = urlsplit(d.url)
        try:
            # Checked here for a clear error; the resolver checks again the addresses it connects to.
            await resolve(parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80), self._allow)
            secrets = await self._secrets(d.tenant)
            if not secrets:
                return Outcome(None, "no signing secret (webhooks.secret, or the tenant's)", final=False)
            headers = sign(secrets, d.webhook_id, time.time(), d.payload)
            assert self._session is not None
            async with self._session.post(d.url, data=d.payload.encode(), headers=headers, allow_redirects=False) as resp:
                await resp.content.read(MAX_RESPONSE_BYTES)
                error = None if 200 <= resp.status < 300 else f"HTTP {resp.status}"
                return Outcome(resp.status, error, final=resp.status == 410)
        except WebhookNotAllowed as exc:
            return Outcome(None, str(exc), final=True)
        except (aiohttp.ClientError, TimeoutError, OSError, InferqError) as exc:
            cause = exc.__cause__ if isinstance(exc.__cause__, WebhookNotAllowed) else None
            return Outcome(None, str(cause) if cause else f"{type(exc).__name__}: {exc}"[:500], final=cause is not None)

    async def _settle(self, d: WebhookDelivery, state: str, attempts: int, status: int | None, error: str | None) -> None:
        self.outcomes[state] += 1
        self.attempts_at_end[next((b for b in ATTEMPT_BUCKETS if attempts <= b), 0)] += 1
        self.attempts_sum += attempts
        if state == FAILED:
            log.warning("webhook %s for job %s failed after %d attempts: %s", d.webhook_id, d.job_id, attempts, error)
        await self._progress(d, state, attempts, status, error)

    async def _progress(self, d: WebhookDelivery, state: str, attempts: int, status: int | None, error: str | None) -> None:
        progress = {"event": d.event, "state": state, "attempts": attempts, "last_status": status, "last_error": error}
        try:
            # Status "running" and no version: readers that count final events or a version's outcomes
            # (the projection, auto-rollback, tests) never take progress for a second end of the job.
            await self._ledger.write([JobEvent(d.job_id, RUNNING, tenant=d.tenant, webhook_delivery=progress)])
        except BrokerError as exc:  # the document shows older progress; the delivery itself is settled
            log.warning("could not record webhook %s progress: %r", d.webhook_id, exc)

    def collect(self) -> Iterator[Metric]:
        """Prometheus: deliveries by outcome, attempts of settled deliveries, deliveries pending in RabbitMQ."""
        yield gauge("inferq_webhook_deliveries", "webhook attempts settled at this edge, by outcome",
                    [({"outcome": k}, v) for k, v in sorted(self.outcomes.items())], "counter")
        total, buckets = 0, []
        for bucket in ATTEMPT_BUCKETS:
            total += self.attempts_at_end[bucket]
            buckets.append((str(bucket), total))
        count = sum(self.attempts_at_end.values())
        buckets.append(("+Inf", count))
        yield HistogramMetricFamily("inferq_webhook_attempts", "attempts of the deliveries this edge settled",
                                    buckets=buckets, sum_value=self.attempts_sum)
        if self.pending is not None:  # refreshed by count_pending_forever: a scrape declares no queue
            yield gauge("inferq_webhook_pending", "webhook deliveries waiting in RabbitMQ (ready or in backoff)",
                        [({}, self.pending)])

    async def count_pending_forever(self, interval_s: float) -> None:
        """Refresh :attr:`pending` every ``interval_s`` (None while the broker does not answer)."""
        while True:
            self.pending = await self._pending()
            await asyncio.sleep(interval_s)

    async def _pending(self) -> int | None:
        # Channels of their own: a passive declare of a tier nobody declared yet closes the channel it ran on.
        names = [self._topology.webhooks] + [self._topology.webhook_retry(d) for d in WEBHOOK_DELAYS_S]
        total, channel = 0, None
        try:
            for name in names:
                if channel is None or channel.is_closed:
                    channel = await self._connection.channel()
                try:
                    queue = await asyncio.wait_for(channel.declare_queue(name, passive=True), 5.0)
                except aio_pika.exceptions.ChannelClosed:  # this tier does not exist (yet)
                    continue
                total += queue.declaration_result.message_count
            return total
        except (aio_pika.exceptions.AMQPError, BrokerError, TimeoutError):
            return None
        finally:
            await close_channel(channel, "webhook metrics")

    async def aclose(self) -> None:
        """Stop consuming (deliveries in hand go back to the queue) and close the HTTP session; idempotent."""
        channel, self._channel = self._channel, None
        await close_channel(channel, "webhooks")
        session, self._session = self._session, None
        if session is not None:
            await session.close()


def _release(counter: Counter[str], key: str) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]
