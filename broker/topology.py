"""Names and declarations of every exchange and queue, all idempotent.

::

    <ns>.requests   topic exchange; routing key <model>.<version> or <model> (default version)
      -> <ns>.model.<model>.<version>    quorum queue per model version
         (pipeline stages later: <ns>.model.<model>.<version>.stage<k>)
    <ns>.dead       fanout exchange, dead letters (expired, delivery limit, rejected)
      -> <ns>.dead                       quorum queue
    <ns>.control    topic exchange for commands to actors
    <ns>.jobs       stream: the job ledger (every job event)
    <ns>.cancels    stream: cancellation requests, read by workers

Model queues are quorum queues with an explicit delivery limit (a poison job
cannot loop forever), at-least-once dead-lettering and ``reject-publish``
overflow (a full queue refuses new jobs instead of dropping old ones).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import aio_pika
import aiormq

from runtime.errors import ConfigError, TopologyError

MODEL_NAME_RE = re.compile(r"^[a-z0-9_-]{1,64}$")
VERSION_RE = re.compile(r"^[0-9]{1,9}$")


def check_model_name(name: str) -> str:
    """Return ``name`` if it is a valid model name (``[a-z0-9_-]+``)."""
    if not isinstance(name, str) or not MODEL_NAME_RE.match(name):
        raise ConfigError(f"model name {name!r} must match [a-z0-9_-]{{1,64}}")
    return name


@dataclass(frozen=True)
class QueueLimits:
    """Per-model queue arguments."""

    delivery_limit: int = 5
    max_length: int = 100_000


@dataclass(frozen=True)
class Topology:
    """Every broker name of one namespace."""

    namespace: str = "inferq"

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
    def model_queue_prefix(self) -> str:
        return f"{self.namespace}.model."

    def model_queue(self, model: str, version: str) -> str:
        """Queue of one model version."""
        return f"{self.model_queue_prefix}{model}.{version}"

    @staticmethod
    def routing_key(model: str, version: str | None = None) -> str:
        """Routing key for a pinned version, or for the model's default version."""
        return f"{model}.{version}" if version else model

    async def declare_shared(self, channel: aio_pika.abc.AbstractChannel, ttl_s: float) -> None:
        """Declare the exchanges, the dead-letter queue and the two streams."""
        async with _translated("shared topology"):
            await channel.declare_exchange(self.requests, aio_pika.ExchangeType.TOPIC, durable=True)
            await channel.declare_exchange(self.control, aio_pika.ExchangeType.TOPIC, durable=True)
            dead = await channel.declare_exchange(self.dead, aio_pika.ExchangeType.FANOUT, durable=True)
            dlq = await channel.declare_queue(self.dead, durable=True, arguments={"x-queue-type": "quorum"})
            await dlq.bind(dead, routing_key="")
            for name in (self.ledger, self.cancels):
                await channel.declare_queue(name, durable=True, arguments=_stream_args(ttl_s))

    async def declare_model(
        self,
        channel: aio_pika.abc.AbstractChannel,
        model: str,
        versions: Iterable[str],
        default_version: str,
        limits: QueueLimits,
    ) -> None:
        """Declare one queue per version; bind ``<model>`` to the default version only."""
        check_model_name(model)
        async with _translated(f"queues of model {model}"):
            exchange = await channel.get_exchange(self.requests, ensure=False)
            for version in versions:
                queue = await channel.declare_queue(
                    self.model_queue(model, version), durable=True, arguments=self._model_args(limits)
                )
                await queue.bind(exchange, routing_key=self.routing_key(model, version))
                if version == default_version:
                    await queue.bind(exchange, routing_key=model)
                else:
                    await queue.unbind(exchange, routing_key=model)

    def _model_args(self, limits: QueueLimits) -> dict[str, object]:
        return {
            "x-queue-type": "quorum",
            "x-dead-letter-exchange": self.dead,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
            "x-delivery-limit": limits.delivery_limit,
            "x-max-length": limits.max_length,
        }


def _stream_args(ttl_s: float) -> dict[str, object]:
    return {"x-queue-type": "stream", "x-max-age": f"{max(1, int(ttl_s))}s"}


class _translated:
    """Turn a channel-closing declaration failure into a TopologyError."""

    def __init__(self, what: str) -> None:
        self.what = what

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, exc_type, exc, tb) -> bool:
        if isinstance(exc, aiormq.exceptions.ChannelPreconditionFailed):
            raise TopologyError(
                f"declaring {self.what} clashes with what the broker has ({exc}); "
                "delete the old queue or use another namespace"
            ) from exc
        return False
