"""Names and declarations of every exchange and queue, all idempotent.

::

    <ns>.requests   topic exchange; routing key <model>.<version>, or <model> for an unpinned job
      -> <ns>.route.<model>.<version>    headers exchange per version (bound as <model>.<version>):
         inferq-priority = high -> <ns>.model.<model>.<version>.high   quorum queue, drained first
         anything else, through its alternate exchange <ns>.route.<model>.<version>.normal (fanout) ->
                                   <ns>.model.<model>.<version>        quorum queue per model version
      -> <ns>.model.<model>              quorum queue of unpinned jobs waiting to be routed (the edges'
                                         AMQP router sends each to a version through the traffic split)
    <model> is bound to the default version's route exchange while the model has no traffic
    split and no shadow, and to its router queue while it has one (rebound by the autoscaler)
    <ns>.model.<model>.<version>.retry   quorum queue: jobs waiting out a retry backoff (per-message
                                         TTL), dead-lettered back to <ns>.requests as <model>.<version>
    <ns>.dead       fanout exchange, dead letters (expired, delivery limit, rejected)
      -> <ns>.dead                       quorum queue
    <ns>.control    topic exchange for commands to actors
    <ns>.jobs       stream: the job ledger (every job event), retained by age and bytes
    <ns>.cancels    stream: cancellation requests, read by workers
    <ns>.webhooks   quorum queue: webhook deliveries due now (the edges' webhook senders consume it)
    <ns>.webhooks.retry.<s>              quorum queues: deliveries waiting out a backoff of about <s>
                                         seconds (per-message TTL), dead-lettered back to <ns>.webhooks;
                                         each declared when a delivery first needs it

Model queues are quorum queues with at-least-once dead-lettering and
``reject-publish`` overflow (a full queue refuses new jobs instead of dropping
old ones). With ``replicas`` above 0 (``broker.replicas``), every quorum queue
is declared with ``x-quorum-initial-group-size`` and both streams with
``x-initial-cluster-size`` of that many nodes; with 0 RabbitMQ picks (every
node of the cluster at declaration). Their ``x-delivery-limit`` is only a backstop: RabbitMQ 3.10 counts
every return of a message (a broker restart, a lost connection, a drain), so
the poison limit a model configures is enforced by the workers, which count
only the starts that ended with their worker dying (see actors/attempts.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import aio_pika
import aiormq

from inferq.errors import ConfigError, TopologyError
from inferq.settings import JobSettings

MODEL_NAME_RE = re.compile(r"^[a-z0-9_-]{1,64}$")
VERSION_RE = re.compile(r"^[0-9]{1,9}$")
ROUTER = "router"  # the target of bind_unpinned that means "the model's router queue"


def check_model_name(name: str) -> str:
    """Return ``name`` if it is a valid model name (``[a-z0-9_-]+``)."""
    if not isinstance(name, str) or not MODEL_NAME_RE.match(name):
        raise ConfigError(f"model name {name!r} must match [a-z0-9_-]{{1,64}}")
    return name


# No "x-" prefix: RabbitMQ's headers exchange ignores x- headers when it matches bindings.
PRIORITY_HEADER = "inferq-priority"
HIGH, NORMAL = "high", "normal"

# Returns RabbitMQ may count before dead-lettering; far above any poison limit, so
# only a job that keeps killing workers while etcd is away ever reaches it.
BACKSTOP_DELIVERY_LIMIT = 25

# The backoff tiers of webhook retries (seconds): one queue each, so that a long TTL at the
# head of a queue never holds back a short one behind it (RabbitMQ expires from the head).
WEBHOOK_DELAYS_S = (1, 4, 16, 64, 256, 600)


@dataclass(frozen=True)
class QueueLimits:
    """Per-model queue settings: ``delivery_limit`` is the poison limit (starts that killed a worker)."""

    delivery_limit: int = 5
    max_length: int = 100_000


@dataclass(frozen=True)
class Topology:
    """Every broker name of one namespace; ``replicas`` > 0 fixes how many nodes hold each queue and stream."""

    namespace: str = "inferq"
    replicas: int = 0

    @property
    def requests(self) -> str:
        return f"{self.namespace}.requests"

    @property
    def dead(self) -> str:
        return f"{self.namespace}.dead"

    @property
    def control(self) -> str:
        return f"{self.namespace}.control"

    @property
    def ledger(self) -> str:
        return f"{self.namespace}.jobs"

    @property
    def cancels(self) -> str:
        return f"{self.namespace}.cancels"

    @property
    def webhooks(self) -> str:
        return f"{self.namespace}.webhooks"

    def webhook_retry(self, delay_s: int) -> str:
        """The queue where deliveries wait out a backoff of about ``delay_s`` (one of WEBHOOK_DELAYS_S)."""
        return f"{self.webhooks}.retry.{delay_s}"

    async def declare_webhooks(self, channel: aio_pika.abc.AbstractChannel) -> None:
        """Declare the deliveries queue (idempotent); a retry tier is declared when first used."""
        async with _translated("webhook queues"):
            await channel.declare_queue(self.webhooks, durable=True, arguments=self._quorum({}))

    async def declare_webhook_retry(self, channel: aio_pika.abc.AbstractChannel, delay_s: int) -> str:
        """Declare one retry tier (idempotent) and return its name."""
        name = self.webhook_retry(delay_s)
        async with _translated("a webhook retry queue"):
            await channel.declare_queue(name, durable=True, arguments=self._quorum({
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": self.webhooks,
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
            }))
        return name

    @property
    def model_queue_prefix(self) -> str:
        return f"{self.namespace}.model."

    def model_queue(self, model: str, version: str) -> str:
        """Queue of one model version."""
        return f"{self.model_queue_prefix}{model}.{version}"

    def high_queue(self, model: str, version: str) -> str:
        """High-priority jobs of one model version (quorum queues have no priorities: a second queue)."""
        return f"{self.model_queue(model, version)}.high"

    def route_exchange(self, model: str, version: str) -> str:
        """Where a version's jobs are sorted by priority header."""
        return f"{self.namespace}.route.{model}.{version}"

    def queues_of(self, model: str, version: str) -> tuple[str, str, str]:
        """Every queue of one version: normal, high, retry."""
        return self.model_queue(model, version), self.high_queue(model, version), self.retry_queue(model, version)

    def router_queue(self, model: str) -> str:
        """Unpinned jobs of a model waiting for the AMQP router (no version: model names have no dots)."""
        return f"{self.model_queue_prefix}{model}"

    def retry_queue(self, model: str, version: str) -> str:
        """Where a job waits out its retry backoff before going back to its version's queue."""
        return f"{self.model_queue(model, version)}.retry"

    @staticmethod
    def routing_key(model: str, version: str | None = None) -> str:
        """Routing key for a pinned version, or for the model's default version."""
        return f"{model}.{version}" if version else model

    async def declare_shared(self, channel: aio_pika.abc.AbstractChannel, jobs: JobSettings) -> None:
        """Declare the exchanges, the dead-letter queue and the two streams.

        The streams are retained by age (``jobs.ttl_s``) and by bytes
        (``jobs.ledger_max_bytes``, in segments of ``jobs.ledger_segment_bytes``):
        every process of a namespace must use the same values, as RabbitMQ
        refuses to declare a stream again with other ones.
        """
        stream_args = self._stream_args(jobs.ttl_s, jobs.ledger_max_bytes, jobs.ledger_segment_bytes)
        async with _translated("shared topology"):
            await channel.declare_exchange(self.requests, aio_pika.ExchangeType.TOPIC, durable=True)
            await channel.declare_exchange(self.control, aio_pika.ExchangeType.TOPIC, durable=True)
            dead = await channel.declare_exchange(self.dead, aio_pika.ExchangeType.FANOUT, durable=True)
            dlq = await channel.declare_queue(self.dead, durable=True, arguments=self._quorum({}))
            await dlq.bind(dead, routing_key="")
            for name in (self.ledger, self.cancels):
                await channel.declare_queue(name, durable=True, arguments=stream_args)

    async def declare_model(
        self,
        channel: aio_pika.abc.AbstractChannel,
        model: str,
        versions: Iterable[str],
        limits: QueueLimits,
        unpinned: str | None = None,
    ) -> None:
        """Declare each version's queues and priority routing, and the router queue; with ``unpinned``, bind ``<model>``."""
        check_model_name(model)
        versions = list(versions)
        async with _translated(f"queues of model {model}"):
            requests = await channel.get_exchange(self.requests, ensure=False)
            for version in versions:
                route = await self._declare_version(channel, model, version, limits)
                await route.bind(requests, routing_key=self.routing_key(model, version))
            await channel.declare_queue(self.router_queue(model), durable=True, arguments=self._model_args(limits))
        if unpinned is not None:
            await self.bind_unpinned(channel, model, unpinned, versions)

    async def declare_pipeline(self, channel: aio_pika.abc.AbstractChannel, name: str, limits: QueueLimits) -> None:
        """A pipeline's router queue, bound to ``<name>``: AMQP jobs to it wait there for an edge's router."""
        check_model_name(name)
        async with _translated(f"the router queue of pipeline {name}"):
            requests = await channel.get_exchange(self.requests, ensure=False)
            queue = await channel.declare_queue(self.router_queue(name), durable=True, arguments=self._model_args(limits))
            await queue.bind(requests, routing_key=name)

    async def bind_unpinned(self, channel: aio_pika.abc.AbstractChannel, model: str, target: str, versions: Iterable[str]) -> None:
        """Bind routing key ``<model>`` to ``target`` (a version's route exchange, or ROUTER's queue), then unbind the rest.

        Bound first, unbound after: a job published in between reaches both and may
        run twice (at-least-once, the first final state wins), but none is ever unroutable.
        Queues and exchanges are looked up passively, so one being removed is never declared again.
        """
        versions = list(versions)
        if target != ROUTER and target not in versions:
            raise ConfigError(f"cannot bind {model!r} to {target!r}: not one of its versions")
        async with _translated(f"the unpinned binding of model {model}"):
            requests = await channel.get_exchange(self.requests, ensure=False)
            router = await channel.declare_queue(self.router_queue(model), passive=True)
            routes = {v: await channel.get_exchange(self.route_exchange(model, v), ensure=True) for v in versions}
            if target == ROUTER:
                await router.bind(requests, routing_key=model)
            else:
                await routes.pop(target).bind(requests, routing_key=model)
                await router.unbind(requests, routing_key=model)
            for route in routes.values():
                await route.unbind(requests, routing_key=model)

    async def _declare_version(self, channel: aio_pika.abc.AbstractChannel, model: str, version: str,
                               limits: QueueLimits) -> aio_pika.abc.AbstractExchange:
        normal_name, high_name, retry_name = self.queues_of(model, version)
        route_name = self.route_exchange(model, version)
        normal = await channel.declare_queue(normal_name, durable=True, arguments=self._model_args(limits))
        high = await channel.declare_queue(high_name, durable=True, arguments=self._model_args(limits))
        await channel.declare_queue(retry_name, durable=True, arguments=self._retry_args(self.routing_key(model, version)))
        fallback = await channel.declare_exchange(f"{route_name}.normal", aio_pika.ExchangeType.FANOUT, durable=True)
        await normal.bind(fallback)
        route = await channel.declare_exchange(route_name, aio_pika.ExchangeType.HEADERS, durable=True,
                                               arguments={"alternate-exchange": fallback.name})
        await high.bind(route, arguments={"x-match": "all", PRIORITY_HEADER: HIGH})
        # Queues bound straight to the requests exchange by an older inferq would get high jobs twice.
        requests = await channel.get_exchange(self.requests, ensure=False)
        for key in (self.routing_key(model, version), model):
            await normal.unbind(requests, routing_key=key)
        return route

    def _quorum(self, arguments: dict[str, object]) -> dict[str, object]:
        replication = {"x-quorum-initial-group-size": self.replicas} if self.replicas else {}
        return {"x-queue-type": "quorum", **replication, **arguments}

    def _stream_args(self, ttl_s: float, max_bytes: int | None = None, segment_bytes: int | None = None) -> dict[str, object]:
        replication = {"x-initial-cluster-size": self.replicas} if self.replicas else {}
        # RabbitMQ deletes whole segments, oldest first, once the stream is past either bound; the
        # segment being written is never deleted, so the disk holds up to max_bytes + one segment.
        size = {"x-max-length-bytes": max_bytes} if max_bytes else {}
        if segment_bytes:
            size["x-stream-max-segment-size-bytes"] = segment_bytes
        return {"x-queue-type": "stream", "x-max-age": f"{max(1, int(ttl_s))}s", **size, **replication}

    def _model_args(self, limits: QueueLimits) -> dict[str, object]:
        return self._quorum({
            "x-dead-letter-exchange": self.dead,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
            "x-delivery-limit": BACKSTOP_DELIVERY_LIMIT,
            "x-max-length": limits.max_length,
        })

    def _retry_args(self, routing_key: str) -> dict[str, object]:
        # Messages carry their backoff as a per-message TTL; on expiry they go back to their version's queue.
        return self._quorum({
            "x-dead-letter-exchange": self.requests,
            "x-dead-letter-routing-key": routing_key,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        })


class _translated:
    """Turn a channel-closing declaration failure into a TopologyError."""

    def __init__(self, what: str) -> None:
        self.what = what

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, exc_type, exc, tb) -> bool:
        if isinstance(exc, aiormq.exceptions.ChannelPreconditionFailed):
            raise TopologyError(
                f"declaring {self.what} clashes with what the broker has ({exc}); the queue was made by an "
                "older inferq or another config: 'inferq namespace reset <namespace>' deletes it (and its jobs)"
            ) from exc
        if isinstance(exc, aiormq.exceptions.ChannelNotFoundEntity):
            raise TopologyError(f"{self.what}: a queue is missing ({exc}); it may be being removed") from exc
        return False
