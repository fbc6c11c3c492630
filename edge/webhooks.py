"""Webhooks: what a job asks for, the delivery record, its signature, and the trigger that queues deliveries.

A job's webhook (``{"url", "events"}``) travels on its queued event and, in the
AMQP headers ``x-inferq-webhook``/``x-inferq-webhook-events``, on every event a
worker or the dead-letter reaper writes, so every edge's projection knows it.

**Trigger.** Every edge sees every change of every job in its projection.
When a job with a webhook starts (event ``start``) or first reaches a final
state (``completed``), the edge claims ``/<ns>/webhooks/msg_<job>_<event>`` in
etcd with a compare-and-create, and only the edge that created the key
publishes the delivery (confirmed, persistent) to ``<ns>.webhooks``. The claim
sits on a short lease (``webhooks.claim_s``) until the publish is confirmed,
then on one that outlives the ledger's retention, so an edge that restarts and
replays the ledger does not queue the same event again. Edges that find a
claim in progress look again when it would have run out: if its edge died
before the publish, one of them queues the event. A publish that fails gives
the claim back and is tried again. From then on the delivery lives in
RabbitMQ, not in a process: see :mod:`inferq.edge.webhook_sender`.

**Signature.** Standard Webhooks (``webhook-id``, ``webhook-timestamp``,
``webhook-signature: v1,<base64 HMAC-SHA256 of id.timestamp.body>``), signed
with the ``standardwebhooks`` package. The id is ``msg_<job>_<event>``: the
same on every retry and from every edge, for receivers to deduplicate.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import aio_pika
from standardwebhooks.webhooks import Webhook

from inferq.broker.connection import BrokerConnection
from inferq.broker.messages import DEFAULT_WEBHOOK_EVENTS, QUEUED, RUNNING, WEBHOOK_EVENTS
from inferq.edge.projection import JobState
from inferq.edge.webhook_url import masked
from inferq.errors import CodecError, CoordinationError, InvalidInput
from inferq.runtime.coordination import keys, translated
from inferq.runtime.records import build, load_json

log = logging.getLogger("inferq.edge.webhooks")

START, COMPLETED = WEBHOOK_EVENTS
PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
RETRY_S = 1.0  # a trigger whose claim or publish failed is tried again after this long (doubling, to 30 s)
QUEUERS = 8  # events claimed and published at once (each is an etcd transaction and a confirmed publish)
CLAIMED, QUEUED_MARK, MINE = b"claimed", b"queued", b"mine"


def webhook_spec(url: str | None, events: Any) -> dict[str, Any] | None:
    """The ``{"url", "events"}`` a submit asks for (the URL already checked), or None without a URL."""
    if url is None:
        if events is not None:
            raise InvalidInput("'webhook_events_filter' needs a 'webhook'")
        return None
    if events is None:
        events = list(DEFAULT_WEBHOOK_EVENTS)
    if not isinstance(events, list) or not events or not all(isinstance(e, str) for e in events) \
            or set(events) - set(WEBHOOK_EVENTS):
        raise InvalidInput(f"'webhook_events_filter' must be a non-empty subset of {list(WEBHOOK_EVENTS)}")
    return {"url": url, "events": [e for e in WEBHOOK_EVENTS if e in events]}


@dataclass(frozen=True)
class WebhookDelivery:
    """One event of one job to tell one URL, as it waits in RabbitMQ (``<ns>.webhooks`` and its retry tiers)."""

    webhook_id: str
    job_id: str
    event: str
    url: str
    payload: str  # the JSON body, the same bytes on every attempt
    tenant: str | None = None
    first_at: float = 0.0  # when the event was queued: retries stop at first_at + webhooks.max_age_s
    attempts: int = 0  # attempts made so far

    def to_json(self) -> str:
        """The stored document."""
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str) -> WebhookDelivery:
        """Rebuild a delivery; CodecError if it is malformed."""
        return build(cls, load_json(raw, "webhook delivery"), "webhook delivery")

    def message(self, expiration_s: float | None = None) -> aio_pika.Message:
        """The persistent AMQP message (with a per-message TTL on a retry tier)."""
        return aio_pika.Message(self.to_json().encode(), message_id=self.webhook_id, content_type="application/json",
                                delivery_mode=aio_pika.DeliveryMode.PERSISTENT, expiration=expiration_s)


def webhook_id(job_id: str, event: str) -> str:
    """One id per job and event: every retry, from every edge, carries the same."""
    return f"msg_{job_id}_{event}"


def sign(secrets: Iterable[str], msg_id: str, at: float, payload: str) -> dict[str, str]:
    """The Standard Webhooks headers; with several secrets (a rotation) each signs, space-separated."""
    when = datetime.datetime.fromtimestamp(int(at), datetime.timezone.utc)
    signatures = " ".join(Webhook(secret).sign(msg_id, when, payload) for secret in secrets)
    return {"webhook-id": msg_id, "webhook-timestamp": str(int(at)), "webhook-signature": signatures,
            "content-type": "application/json"}


def webhook_view(state: JobState) -> dict[str, Any] | None:
    """The document's ``webhook`` object: the URL (query masked) and how its latest event's delivery went."""
    if state.webhook is None:
        return None
    deliveries = state.webhook_deliveries or {}
    progress = deliveries.get(COMPLETED) or deliveries.get(START) or {}
    return {"url": masked(state.webhook["url"]), "state": progress.get("state", PENDING),
            "attempts": progress.get("attempts", 0), "last_status": progress.get("last_status"),
            "last_error": progress.get("last_error")}


def due_events(before: str | None, state: JobState) -> list[str]:
    """The webhook events a change from status ``before`` to ``state`` sets off."""
    if state.webhook is None:
        return []
    wanted, due = state.webhook.get("events") or [], []
    fresh = before is None or before == QUEUED
    if START in wanted and fresh and state.started_at is not None and state.status != QUEUED:
        due.append(START)
    if COMPLETED in wanted and state.terminal and (before is None or before in (QUEUED, RUNNING)):
        due.append(COMPLETED)
    return due


class WebhookTrigger:
    """Turns projection changes into queued deliveries, once per job and event across all edges.

    ``document(state)`` renders the job document (``GET /v1/jobs/{id}``) as the body.
    Owns one task (:meth:`run`); :meth:`changed` is the projection's cheap, synchronous hook.
    """

    def __init__(self, etcd: Any, namespace: str, retention_s: float, timeout_s: float, connection: BrokerConnection,
                 queue: str, document: Callable[[JobState], str], claim_s: float = 30.0) -> None:
        self._etcd = etcd
        self._prefix = f"{keys(namespace).root}/webhooks/"
        self._timeout = timeout_s
        self._connection = connection
        self._queue_name = queue
        self._document = document
        self._due: asyncio.Queue[WebhookDelivery] = asyncio.Queue()
        self._claim_s = claim_s  # an unconfirmed claim runs out by then, and another edge queues the event
        self._leases = Leases(etcd, retention_s, claim_s, timeout_s)
        self._pending_claims: dict[bytes, WebhookDelivery] = {}  # events another edge is queueing: looked at again
        self.queued = 0

    def changed(self, before: str | None, state: JobState) -> None:
        """Projection hook: snapshot the document of each due event now (the job moves on)."""
        for event in due_events(before, state):
            shown = state if event == COMPLETED else dataclasses.replace(
                state, status=RUNNING, finished_at=None, outputs=None, error=None, timings=None)
            try:
                payload = self._document(shown)
            except Exception:  # a hook must never break the projection; the job is still shown
                log.exception("cannot render the webhook body of job %s", state.job_id)
                continue
            self._due.put_nowait(WebhookDelivery(
                webhook_id(state.job_id, event), state.job_id, event, state.webhook["url"], payload,
                tenant=state.tenant, first_at=time.time()))

    async def run(self) -> None:
        """Claim and queue due deliveries for ever, QUEUERS at once; a failure waits and tries again."""
        # Owned here: cancelled and awaited with this task (no TaskGroup: agents' nodes run Python 3.10).
        tasks = [asyncio.create_task(self._queue_forever(), name=f"webhook-queuer-{i}") for i in range(QUEUERS)]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _queue_forever(self) -> None:
        while True:
            delivery = await self._due.get()
            delay = RETRY_S
            while True:
                try:
                    await self._queue(delivery)
                    break
                except Exception as exc:  # broker or etcd away, or anything else: this event must not be lost
                    log.warning("cannot queue webhook %s yet (%r); retrying in %.0f s", delivery.webhook_id, exc, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 30.0)

    async def _queue(self, delivery: WebhookDelivery) -> None:
        key = (self._prefix + delivery.webhook_id).encode()
        self._pending_claims.pop(key, None)
        claim = await self._claim(key)
        if claim == CLAIMED:  # another edge is queueing it: look again once its claim would have run out
            self._pending_claims[key] = delivery
            asyncio.get_running_loop().call_later(self._claim_s, self._recheck, key)
            return
        if claim != MINE:
            return  # queued by another edge, or by this one before a restart
        try:
            await self._connection.publish(delivery.message(), self._queue_name, mandatory=True)
        except BaseException:
            await self._release(key)
            raise
        await self._confirm(key)
        self.queued += 1

    async def _claim(self, key: bytes) -> bytes:
        """MINE if this edge claimed the event and must queue it, else what the key holds (CLAIMED, QUEUED_MARK).

        A claim is ``claimed`` on a short lease until the delivery is confirmed in RabbitMQ, then ``queued``
        on a lease as long as the retention. An edge that finds someone else's ``claimed`` looks again after
        ``webhooks.claim_s``: if that edge died before it queued the delivery, its claim has run out by then and this
        edge queues it instead, so an event is lost to no crash.
        """
        tx = self._etcd.transactions
        lease = await self._leases.short()
        async with translated("claiming a webhook event"):
            ok, responses = await asyncio.wait_for(self._etcd.transaction(
                compare=[tx.create(key) == 0], success=[tx.put(key, CLAIMED, lease=lease)],
                failure=[tx.get(key)]), self._timeout)
        if ok:
            return MINE
        found = responses[0][0] if responses and responses[0] else None
        return found[0] if found else CLAIMED  # nothing readable: look again later rather than lose it

    def _recheck(self, key: bytes) -> None:
        delivery = self._pending_claims.pop(key, None)
        if delivery is not None:
            self._due.put_nowait(delivery)

    async def _confirm(self, key: bytes) -> None:
        try:
            lease = await self._leases.long()
            async with translated("confirming a webhook claim"):
                await asyncio.wait_for(self._etcd.put(key, QUEUED_MARK, lease=lease), self._timeout)
        except (CoordinationError, TimeoutError) as exc:  # the short claim runs out: another edge may queue it again (a duplicate)
            log.warning("could not mark webhook %s queued: %r", key.decode(), exc)

    async def _release(self, key: bytes) -> None:
        try:
            async with translated("releasing a webhook claim"):
                await asyncio.wait_for(self._etcd.delete(key), self._timeout)
        except (CoordinationError, TimeoutError) as exc:  # it runs out with its short lease
            log.warning("webhook claim %s could not be released after a failed publish: %r", key.decode(), exc)


class Leases:
    """Shared etcd leases, one grant per epoch: ``short`` for claims in progress, ``long`` for queued events."""

    def __init__(self, etcd: Any, long_s: float, short_s: float, timeout_s: float) -> None:
        self._etcd = etcd
        self._timeout = timeout_s
        self._spans = {"short": short_s, "long": long_s}
        self._held: dict[str, tuple[int, float]] = {}

    async def short(self) -> int:
        """A lease that runs out between half the claim time and the claim time from now."""
        return await self._get("short")

    async def long(self) -> int:
        """A lease that outlives the retention from now."""
        return await self._get("long")

    async def _get(self, kind: str) -> int:
        span, now = self._spans[kind], time.time()
        held = self._held.get(kind)
        # A queued mark must outlive the retention from now; a claim must run out within the claim time.
        margin, ttl = (span, int(span * 1.5) + 1) if kind == "long" else (span / 2, max(1, int(span)))
        if held is None or held[1] <= now + margin:
            async with translated("granting a webhook lease"):
                lease = await asyncio.wait_for(self._etcd.lease(ttl), self._timeout)
            self._held[kind] = held = (lease.id, now + ttl)
        return held[0]


def parse_delivery(body: bytes) -> WebhookDelivery | None:
    """A delivery from its message, or None (logged) if it is malformed."""
    try:
        return WebhookDelivery.from_json(body)
    except CodecError as exc:
        log.warning("dropping a malformed webhook delivery: %s", exc)
        return None
