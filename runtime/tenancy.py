"""Whose job an AMQP delivery is, whether it may run and be answered, and the tenant's rate over AMQP.

With auth on (``edge.auth``) every job a worker takes is judged here once,
before anything else is done with it (:meth:`Tenancy.judge`, called by
:mod:`inferq.actors.batchrun`), and so is every dead letter
(:meth:`Tenancy.identify`). The publisher comes from the message's
``user_id`` (:mod:`inferq.broker.identity`); a broker user's tenant comes from
etcd (``/<ns>/brokerusers/<user>``, :class:`BrokerUserRecord`), cached and
forgotten as soon as etcd says it changed, so ``inferq tenant delete`` holds
at once. The verdict:

- inferq's own job (the edge's): the tenant of its ``x-inferq-tenant`` header;
- no ``user_id``, or a user that belongs to no tenant: failed ``unauthenticated``, no reply;
- a ``reply_to`` outside the tenant's reply queues (``<ns>.replies.<tenant>.*``):
  failed ``forbidden``, no reply (nothing goes to someone else's queue);
- over the tenant's rate: failed ``rate_limited``, with the reason on ``reply_to``.

**Metering.** A tenant's AMQP jobs are metered with its ``rate_per_s`` and
``burst`` (those of ``inferq tenant create``) in one token bucket per tenant
in etcd (``/<ns>/meters/<tenant>``), which every worker takes from with a
compare-and-swap, a batch at a time. A job is metered once, when a worker
first takes it (not its redeliveries or a worker's copies). Over-limit jobs
are not dropped: they end ``failed`` with code ``rate_limited``, so every
confirmed job still ends in exactly one final state. Without etcd the meter
lets jobs through (it guards fairness, not access).

With auth off every job is accepted with the tenant of its header, as before.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Iterable
from typing import Any

import aetcd

from inferq.broker.identity import (
    Publisher, ServiceUsers, Verdict, broker_user, may_reply, publisher_of, reply_prefix)
from inferq.broker.messages import error_dict, is_suspect
from inferq.errors import CodecError, CoordinationError, Forbidden, RateLimited, Unauthenticated
from inferq.runtime.coordination import follow, keys, translated
from inferq.runtime.records import BrokerUserRecord, MeterRecord
from inferq.settings import Settings

log = logging.getLogger("inferq.tenancy")

Message = Any  # aio_pika.abc.AbstractIncomingMessage
NEGATIVE_S = 2.0  # an unknown user is asked again after this long (it may be being created)
POSITIVE_S = 300.0  # a known user is asked again after this long, in case a watch event was missed
MAX_KNOWN = 10_000
DOWN_S = 1.0  # after etcd failed a lookup, others fail at once for this long (a batch must not wait N timeouts)
CAS_ATTEMPTS = 5

NO_USER = "the job has no user_id: publish with the user_id property set to your broker user"


def decide(publisher: Publisher, record: BrokerUserRecord | None, reply_to: str | None, namespace: str) -> Verdict:
    """The verdict on one job with auth on, before metering; ``record`` maps ``publisher.user`` (None: unmapped)."""
    if publisher.service:
        return Verdict(publisher.tenant)
    if publisher.user is None:
        return Verdict(error=error_dict(Unauthenticated.code, NO_USER), reply=False)
    if record is None:
        message = f"broker user {publisher.user!r} belongs to no tenant (inferq tenant create NAME --amqp)"
        return Verdict(error=error_dict(Unauthenticated.code, message), reply=False)
    if reply_to and not may_reply(reply_to, namespace, record.tenant):
        message = (f"reply_to {reply_to!r} is not one of tenant {record.tenant}'s queues "
                   f"({reply_prefix(namespace, record.tenant)}*): the job is not run and nothing is sent there")
        return Verdict(record.tenant, error=error_dict(Forbidden.code, message), reply=False)
    return Verdict(record.tenant)


def refill(record: MeterRecord | None, now: float, rate: float, burst: int) -> float:
    """Tokens in a bucket of ``rate``/s up to ``burst`` at ``now`` (a missing bucket is full)."""
    if record is None:
        return float(burst)
    # Another host's clock may be ahead: time never runs backwards for the bucket.
    return min(float(burst), record.tokens + max(0.0, now - record.at) * rate)


def bucket_size(rate: float, burst: int) -> int:
    """The burst a tenant gets: its own, else one second of its rate (as the edge's buckets)."""
    return max(1, burst or math.ceil(rate))


class BrokerUsers:
    """Broker user -> :class:`BrokerUserRecord`, read through from etcd and forgotten when etcd says it changed."""

    def __init__(self, etcd: aetcd.Client, prefix: str, timeout_s: float) -> None:
        self._etcd = etcd
        self._prefix = prefix
        self._timeout = timeout_s
        self._known: dict[str, tuple[float, BrokerUserRecord | None]] = {}
        self._down_until = 0.0

    async def get(self, user: str) -> BrokerUserRecord | None:
        """The user's record, None if it has none; CoordinationError if etcd is away and the user was never seen."""
        hit = self._known.get(user)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        try:
            record = await self._fetch(user)
        except CoordinationError:
            if hit is not None:  # etcd away: what we knew still stands
                return hit[1]
            raise
        if len(self._known) >= MAX_KNOWN:
            self._known.pop(next(iter(self._known)))
        self._known[user] = (time.monotonic() + (POSITIVE_S if record else NEGATIVE_S), record)
        return record

    async def _fetch(self, user: str) -> BrokerUserRecord | None:
        if time.monotonic() < self._down_until:
            raise CoordinationError("etcd: unreachable a moment ago")
        try:
            async with translated(f"looking up broker user {user}"):
                kv = await asyncio.wait_for(self._etcd.get((self._prefix + user).encode()), self._timeout)
        except CoordinationError:
            self._down_until = time.monotonic() + DOWN_S
            raise
        record = _record(kv.value) if kv is not None else None
        return record if record is not None and record.user == user else None  # another user's record grants nothing

    def forget(self, user: str | None) -> None:
        """Drop one user (changed in etcd), or everyone (None: the watch reopened after a gap)."""
        if user is None:
            self._known.clear()
        else:
            self._known.pop(user, None)

    async def follow(self) -> None:
        """Forget users as etcd changes them, until cancelled."""
        await follow(self._etcd, self._prefix, self.forget, self._timeout)


class Meter:
    """Per-tenant token buckets in etcd, shared by every worker."""

    def __init__(self, etcd: aetcd.Client, namespace: str, timeout_s: float) -> None:
        self._etcd = etcd
        self._keys = keys(namespace)
        self._timeout = timeout_s

    async def take(self, tenant: str, wanted: int, rate: float, burst: int) -> int:
        """Take up to ``wanted`` tokens from ``tenant``'s bucket; how many were granted.

        etcd away or too contended: all of them (the meter fails open).
        """
        try:
            for _ in range(CAS_ATTEMPTS):
                granted = await self._try_take(self._keys.meter(tenant), wanted, rate, bucket_size(rate, burst))
                if granted is not None:
                    return granted
            log.warning("meter of tenant %s too contended; letting %d jobs through", tenant, wanted)
        except CoordinationError as exc:
            log.warning("cannot meter tenant %s (%s); letting %d jobs through", tenant, exc, wanted)
        return wanted

    async def _try_take(self, key: str, wanted: int, rate: float, burst: int) -> int | None:
        async with translated(f"metering {key}"):
            kv = await asyncio.wait_for(self._etcd.get(key.encode()), self._timeout)
            now = time.time()
            tokens = refill(_meter(kv.value) if kv is not None else None, now, rate, burst)
            granted = min(wanted, int(tokens))
            tx = self._etcd.transactions
            unchanged = tx.mod(key.encode()) == kv.mod_revision if kv is not None else tx.create(key.encode()) == 0
            ok, _ = await asyncio.wait_for(self._etcd.transaction(
                compare=[unchanged], success=[tx.put(key.encode(), MeterRecord(tokens - granted, now).to_json().encode())],
                failure=[]), self._timeout)
        return granted if ok else None


class Tenancy:
    """Judges deliveries for a worker or an edge; build with :meth:`open`, close with :meth:`aclose`."""

    def __init__(self, enforce: bool, namespace: str, service_user: ServiceUsers | str | None,
                 users: BrokerUsers | None = None, meter: Meter | None = None) -> None:
        self.enforce = enforce
        self.namespace = namespace
        # inferq's own users: this process's, the cluster's (on an edge node) and every node user of the namespace
        self.service_user = ServiceUsers.of(service_user, namespace)
        self._users = users
        self._meter = meter
        self._follow: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, settings: Settings, etcd: aetcd.Client) -> Tenancy:
        """Enforcing if ``settings.auth_enabled``; then it follows the broker users in etcd until closed."""
        own = broker_user(settings.broker.url)
        service_user = ServiceUsers.of((own, settings.tenancy.service_user), settings.namespace)
        if not settings.auth_enabled:
            return cls(False, settings.namespace, service_user)
        if own is None:
            log.warning("auth is on but broker.url names no user: no job counts as inferq's own")
        timeout = settings.etcd.timeout_s
        users = BrokerUsers(etcd, keys(settings.namespace).brokerusers, timeout)
        self = cls(True, settings.namespace, service_user, users, Meter(etcd, settings.namespace, timeout))
        self._follow = asyncio.create_task(users.follow(), name="tenancy:follow")
        return self

    async def aclose(self) -> None:
        """Stop following etcd; idempotent."""
        task, self._follow = self._follow, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def identify(self, message: Message) -> Verdict:
        """The verdict on one message without metering (dead letters)."""
        verdict, _ = await self._judge_one(message)
        return verdict

    async def judge(self, deliveries: Iterable[Message]) -> dict[int, Verdict]:
        """The verdict on each delivery of a batch, by ``id()``, metering included."""
        verdicts: dict[int, Verdict] = {}
        metered: dict[str, list[tuple[Message, BrokerUserRecord]]] = {}
        for delivery in deliveries:
            verdict, record = await self._judge_one(delivery)
            verdicts[id(delivery)] = verdict
            if record is not None and verdict.error is None and record.rate_per_s > 0 and _first_take(delivery, self.service_user):
                metered.setdefault(record.tenant, []).append((delivery, record))
        for tenant, jobs in metered.items():
            rate, burst = jobs[0][1].rate_per_s, jobs[0][1].burst
            granted = await self._meter.take(tenant, len(jobs), rate, burst)
            for delivery, _ in jobs[granted:]:
                verdicts[id(delivery)] = Verdict(tenant, error=error_dict(RateLimited.code, _over_rate(tenant, rate, burst)))
        return verdicts

    async def _judge_one(self, message: Message) -> tuple[Verdict, BrokerUserRecord | None]:
        publisher = publisher_of(message, self.service_user)
        if not self.enforce:
            return Verdict(publisher.tenant), None
        record = None
        if not publisher.service and publisher.user is not None:
            try:
                record = await self._users.get(publisher.user)
            except CoordinationError as exc:
                log.warning("cannot check broker user %s now (%s); job %s waits", publisher.user, exc, message.message_id)
                return Verdict(later=True, reply=False), None
        verdict = decide(publisher, record, message.reply_to, self.namespace)
        if verdict.error is not None:
            log.info("job %s refused: %s", message.message_id, verdict.error["message"])
        return verdict, record


def _first_take(delivery: Message, service_user: ServiceUsers) -> bool:
    """Whether this is the tenant's own publish taken for the first time (a copy or redelivery was metered already)."""
    return delivery.user_id not in service_user and not is_suspect(delivery)


def _over_rate(tenant: str, rate: float, burst: int) -> str:
    return (f"tenant {tenant} is over its submission rate ({rate:g}/s, burst {bucket_size(rate, burst)}); "
            f"the job is not run: send it again in about {max(1, math.ceil(1 / rate))}s")


def _record(raw: bytes) -> BrokerUserRecord | None:
    try:
        return BrokerUserRecord.from_json(raw)
    except CodecError as exc:
        log.warning("ignoring a malformed broker user record: %s", exc)
        return None


def _meter(raw: bytes) -> MeterRecord | None:
    try:
        return MeterRecord.from_json(raw)
    except CodecError:
        return None  # a bucket we cannot read starts full again

