"""The wire messages: a job request, its result, and the ledger's job events.

A job request is one AMQP message on ``<ns>.requests``; its ``message_id`` is
the job id. Results and events are msgpack maps (see README, "AMQP contract").
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import numpy as np

from broker.codec import DEFAULT_LIMITS, Limits, decode_tensor_map, encode_tensor, packb, unpackb
from runtime.errors import CodecError

CONTENT_TYPE = "application/msgpack"
TENANT_HEADER = "x-inferq-tenant"
# Integer microseconds since the epoch: the AMQP timestamp has one-second resolution, and
# pamqp sends a Python float in a header table as a 32-bit float (minutes off today).
SUBMITTED_HEADER = "x-inferq-submitted-us"
JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED, EXPIRED = (
    "queued", "running", "succeeded", "failed", "cancelled", "expired",
)
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED, EXPIRED})
STATUSES = (QUEUED, RUNNING) + tuple(sorted(TERMINAL))


def new_job_id() -> str:
    """A fresh random job id."""
    return uuid.uuid4().hex


def check_job_id(job_id: Any) -> str:
    """Return ``job_id`` if it is a well-formed job id, else raise CodecError."""
    if not isinstance(job_id, str) or not JOB_ID_RE.match(job_id):
        raise CodecError("job id must be 1-128 characters of letters, digits and _.:- (message_id on AMQP)")
    return job_id


@dataclass(frozen=True)
class JobRequest:
    """One inference job as it travels to a shard worker."""

    job_id: str
    inputs: Mapping[str, np.ndarray]
    outputs: tuple[str, ...] | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)
    reply_to: str | None = None
    correlation_id: str | None = None
    priority: int | None = None
    ttl_s: float | None = None
    tenant: str | None = None
    attempt: int = 1

    def body(self) -> bytes:
        """The msgpack body."""
        wire: dict[str, Any] = {"inputs": {k: encode_tensor(v) for k, v in self.inputs.items()}}
        if self.outputs is not None:
            wire["outputs"] = list(self.outputs)
        if self.parameters:
            wire["parameters"] = dict(self.parameters)
        return packb(wire)

    def to_message(self, body: bytes | None = None) -> aio_pika.Message:
        """The AMQP message, persistent, with the job id as ``message_id``."""
        now = time.time()
        return aio_pika.Message(
            body if body is not None else self.body(),
            message_id=self.job_id,
            content_type=CONTENT_TYPE,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            reply_to=self.reply_to,
            correlation_id=self.correlation_id,
            priority=self.priority,
            expiration=self.ttl_s,
            headers={SUBMITTED_HEADER: int(now * 1_000_000), **({TENANT_HEADER: self.tenant} if self.tenant else {})},
            timestamp=now,
        )

    @classmethod
    def from_message(cls, message: aio_pika.abc.AbstractIncomingMessage, limits: Limits = DEFAULT_LIMITS) -> JobRequest:
        """Decode an incoming request; raises CodecError on anything malformed."""
        job_id = check_job_id(message.message_id)
        if message.content_type != CONTENT_TYPE:
            raise CodecError(f"content_type must be {CONTENT_TYPE}, got {message.content_type!r}")
        inputs, outputs, parameters = parse_body(message.body, limits)
        headers = message.headers or {}
        tenant = headers.get(TENANT_HEADER)
        return cls(
            job_id=job_id,
            inputs=inputs,
            outputs=outputs,
            parameters=parameters,
            reply_to=message.reply_to,
            correlation_id=message.correlation_id,
            priority=message.priority,
            tenant=tenant if isinstance(tenant, str) else None,
            attempt=delivery_count(message) + 1,
        )


def parse_body(body: bytes, limits: Limits = DEFAULT_LIMITS) -> tuple[dict[str, np.ndarray], tuple[str, ...] | None, dict[str, Any]]:
    """Decode a job body ``{"inputs", "outputs"?, "parameters"?}`` (AMQP, or msgpack over HTTP)."""
    wire = unpackb(body, limits)
    if not isinstance(wire, dict) or "inputs" not in wire or set(wire) - {"inputs", "outputs", "parameters"}:
        raise CodecError("body must be a map with 'inputs' and optional 'outputs', 'parameters'")
    outputs = wire.get("outputs")
    if outputs is not None and not (isinstance(outputs, list) and all(isinstance(o, str) for o in outputs)):
        raise CodecError("'outputs' must be a list of output names")
    parameters = wire.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise CodecError("'parameters' must be a map")
    return decode_tensor_map(wire["inputs"], limits), tuple(outputs) if outputs is not None else None, parameters


def submitted_at(message: aio_pika.abc.AbstractIncomingMessage) -> tuple[float | None, float]:
    """When the job was published, and how uncertain that is (seconds).

    inferq's own publishers set a precise header; other AMQP clients may set
    only the AMQP timestamp, which has one-second resolution.
    """
    precise = (message.headers or {}).get(SUBMITTED_HEADER)
    if isinstance(precise, int) and not isinstance(precise, bool):
        return precise / 1_000_000, 0.0
    if message.timestamp is not None:
        return message.timestamp.timestamp(), 1.0
    return None, 0.0


def delivery_count(message: aio_pika.abc.AbstractIncomingMessage) -> int:
    """How many times a quorum queue delivered this message before."""
    count = (message.headers or {}).get("x-delivery-count", 0)
    return count if isinstance(count, int) else 0


@dataclass(frozen=True)
class JobEvent:
    """One state change of one job, as kept in the job ledger stream."""

    job_id: str
    status: str
    model: str = ""
    version: str = ""
    ts: float = field(default_factory=time.time)
    tenant: str | None = None
    attempt: int = 0
    outputs: Mapping[str, Any] | None = None
    error: Mapping[str, str] | None = None
    timings: Mapping[str, float] | None = None
    worker: str | None = None

    def to_wire(self) -> dict[str, Any]:
        """A compact map: fields left at their empty default are omitted."""
        wire = {"job_id": self.job_id, "status": self.status, "ts": self.ts}
        for key in ("model", "version", "tenant", "attempt", "outputs", "error", "timings", "worker"):
            value = getattr(self, key)
            if value:
                wire[key] = value
        return wire

    @classmethod
    def from_wire(cls, wire: Any) -> JobEvent:
        """Rebuild an event; raises CodecError on a malformed one."""
        if not isinstance(wire, dict) or wire.get("status") not in STATUSES:
            raise CodecError(f"malformed job event {str(wire)[:200]}")
        try:
            return cls(**wire)
        except TypeError as exc:
            raise CodecError(f"malformed job event: {exc}") from exc

    def result(self) -> dict[str, Any]:
        """The reply_to body: job_id, status, outputs, error, timings."""
        return {
            "job_id": self.job_id,
            "status": self.status,
            "outputs": self.outputs or {},
            "error": self.error,
            "timings": self.timings or {},
        }


def error_dict(code: str, message: str) -> dict[str, str]:
    """The ``{"code", "message"}`` map used in results, events and HTTP errors."""
    return {"code": code, "message": message}


def pack_events(events: list[JobEvent]) -> bytes:
    """One ledger message carrying several events."""
    return packb([e.to_wire() for e in events])


def unpack_events(body: bytes) -> list[JobEvent]:
    """Events of one ledger message; raises CodecError if malformed."""
    wire = unpackb(body)
    if not isinstance(wire, list):
        raise CodecError("a ledger message must be a list of events")
    return [JobEvent.from_wire(w) for w in wire]
