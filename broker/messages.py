"""The wire messages: a job request, its result, and the ledger's job events.

A job request is one AMQP message on ``<ns>.requests``; its ``message_id`` is
the job id. Results and events are msgpack maps (see README, "AMQP contract").
"""

from __future__ import annotations

import math
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import numpy as np
from inferq.broker.codec import (
    DEFAULT_LIMITS,
    Limits,
    decode_tensor_map,
    encode_tensor,
    packb,
    unpackb,
)
from inferq.broker.stages import ROUTE_HEADER, PipelineRoute
from inferq.broker.status import JobStatus
from inferq.broker.topology import HIGH, NORMAL, PRIORITY_HEADER
from inferq.broker.trace import TRACEPARENT_HEADER, parse_traceparent

from inferq.errors import CodecError

CONTENT_TYPE = "application/msgpack"
TENANT_HEADER = "x-inferq-tenant"
# Integer microseconds since the epoch: the AMQP timestamp has one-second resolution, and
# pamqp sends a Python float in a header table as a 32-bit float (minutes off today).
SUBMITTED_HEADER = "x-inferq-submitted-us"
# The job's TTL in milliseconds, beside the AMQP expiration: RabbitMQ removes the
# expiration of a message it dead-letters (a retry coming back from its backoff).
TTL_HEADER = "x-inferq-ttl-ms"
# What a worker knows of a job it hands back (see broker/handback.py).
STARTS_HEADER = "x-inferq-starts"
RETRIES_HEADER = "x-inferq-retries"
SUSPECT_HEADER = "x-inferq-suspect"
# The sticky key of an unpinned AMQP job: jobs with the same key take the same side of a traffic split.
ROUTE_KEY_HEADER = "x-inferq-route-key"
# The alias that routed an unpinned job, set by the edge that routed it. It travels with the
# job so the worker's events carry it too: an edge that sees the worker's final event before
# the router's queued event (they are written by different processes) still shows the alias.
ALIAS_HEADER = "x-inferq-alias"
ALIAS_RE = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
# A job's webhook (see edge/webhooks.py): its URL, and the events it is told of (comma-separated).
WEBHOOK_HEADER = "x-inferq-webhook"
WEBHOOK_EVENTS_HEADER = "x-inferq-webhook-events"
WEBHOOK_EVENTS = ("start", "completed")
DEFAULT_WEBHOOK_EVENTS = ("completed",)
JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED, EXPIRED = JobStatus
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED, EXPIRED})
STATUSES = tuple(JobStatus)


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
    priority: str = NORMAL  # high jobs go to the version's high queue, which workers drain first
    ttl_s: float | None = None
    tenant: str | None = None
    attempt: int = 1  # this start's number, as far as the message tells (see ``suspect``)
    retries: int = 0  # transient-error retries so far
    suspect: bool = False  # it was in a worker that died: it may have started more often than ``attempt`` says
    route: PipelineRoute | None = None  # a pipeline job: its stages (see :mod:`inferq.broker.stages`)
    traceparent: str | None = None  # W3C trace context: the submitting edge's span (broker/trace.py)
    webhook: Mapping[str, Any] | None = None  # {"url", "events"}: checked by the edge, travels in headers
    alias: str | None = None  # the alias whose traffic split routed it (an unpinned job), for its events

    def body(self) -> bytes:
        """The msgpack body."""
        wire: dict[str, Any] = {"inputs": {k: encode_tensor(v) for k, v in self.inputs.items()}}
        if self.outputs is not None:
            wire["outputs"] = list(self.outputs)
        if self.parameters:
            wire["parameters"] = dict(self.parameters)
        return packb(wire)

    def to_message(self, body: bytes | None = None, user_id: str | None = None) -> aio_pika.Message:
        """The AMQP message, persistent, with the job id as ``message_id``.

        ``user_id`` must be the publishing connection's user (RabbitMQ refuses
        anything else); with auth on it is how workers know the publisher.
        """
        now = time.time()
        return aio_pika.Message(
            body if body is not None else self.body(),
            message_id=self.job_id,
            content_type=CONTENT_TYPE,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            reply_to=self.reply_to,
            correlation_id=self.correlation_id,
            expiration=self.ttl_s,
            headers=self._headers(now),
            timestamp=now,
            user_id=user_id,
        )

    def _headers(self, now: float) -> dict[str, Any]:
        headers: dict[str, Any] = {SUBMITTED_HEADER: int(now * 1_000_000)}
        if self.tenant:
            headers[TENANT_HEADER] = self.tenant
        if self.ttl_s is not None:
            headers[TTL_HEADER] = int(self.ttl_s * 1000)
        if self.priority == HIGH:
            headers[PRIORITY_HEADER] = HIGH
        if self.route is not None:
            headers[ROUTE_HEADER] = self.route.to_json()
        if self.traceparent:
            headers[TRACEPARENT_HEADER] = self.traceparent
        if self.alias:
            headers[ALIAS_HEADER] = self.alias
        if self.webhook:
            headers[WEBHOOK_HEADER] = self.webhook["url"]
            headers[WEBHOOK_EVENTS_HEADER] = ",".join(self.webhook["events"])
        return headers

    @classmethod
    def from_message(cls, message: aio_pika.abc.AbstractIncomingMessage, limits: Limits = DEFAULT_LIMITS) -> JobRequest:
        """Decode an incoming request; raises CodecError on anything malformed."""
        job_id = check_job_id(message.message_id)
        if message.content_type != CONTENT_TYPE:
            raise CodecError(f"content_type must be {CONTENT_TYPE}, got {message.content_type!r}")
        inputs, outputs, parameters = parse_body(message.body, limits)
        headers = message.headers or {}
        tenant = headers.get(TENANT_HEADER)
        route = PipelineRoute.from_json(headers[ROUTE_HEADER]) if ROUTE_HEADER in headers else None
        return cls(
            job_id=job_id,
            inputs=inputs,
            outputs=outputs,
            parameters=parameters,
            reply_to=message.reply_to,
            correlation_id=message.correlation_id,
            priority=HIGH if (message.headers or {}).get(PRIORITY_HEADER) == HIGH else NORMAL,
            tenant=tenant if isinstance(tenant, str) else None,
            attempt=header_int(message, STARTS_HEADER) + 1,
            retries=header_int(message, RETRIES_HEADER),
            suspect=is_suspect(message),
            route=route,
            traceparent=parse_traceparent(headers.get(TRACEPARENT_HEADER)),
            webhook=webhook_from_headers(headers),
            alias=alias_from_headers(headers),
        )


def alias_from_headers(headers: Mapping[str, Any]) -> str | None:
    """The routing alias a job carries, or None when absent or not an alias name (headers are client-writable)."""
    alias = headers.get(ALIAS_HEADER)
    if isinstance(alias, bytes):
        alias = alias.decode("utf-8", "replace")
    return alias if isinstance(alias, str) and ALIAS_RE.match(alias) else None


def webhook_from_headers(headers: Mapping[str, Any]) -> dict[str, Any] | None:
    """The webhook an AMQP publisher asked for, or None; its URL is checked where it is delivered.

    Unknown event names are dropped (headers are client-writable); no names means the default.
    """
    url = headers.get(WEBHOOK_HEADER)
    if isinstance(url, bytes):
        url = url.decode("utf-8", "replace")
    if not isinstance(url, str) or not url:
        return None
    raw = headers.get(WEBHOOK_EVENTS_HEADER)
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    items = raw.split(",") if isinstance(raw, str) else raw if isinstance(raw, list) else []
    events = [e for e in WEBHOOK_EVENTS if e in {str(i).strip() for i in items}]
    return {"url": url[:2048], "events": events or list(DEFAULT_WEBHOOK_EVENTS)}


def parse_body(body: bytes, limits: Limits = DEFAULT_LIMITS) -> tuple[dict[str, np.ndarray], tuple[str, ...] | None, dict[str, Any]]:
    """Decode a job body ``{"inputs", "outputs"?, "parameters"?}`` (AMQP)."""
    inputs, outputs, parameters, _ = parse_submission(body, (), limits)
    return inputs, outputs, parameters


def parse_submission(body: bytes, fields: tuple[str, ...], limits: Limits = DEFAULT_LIMITS,
                     ) -> tuple[dict[str, np.ndarray], tuple[str, ...] | None, dict[str, Any], dict[str, Any]]:
    """Decode a job body whose top level may also carry ``fields`` (msgpack over HTTP: ``priority``, ...)."""
    wire = unpackb(body, limits)
    allowed = {"inputs", "outputs", "parameters", *fields}
    if not isinstance(wire, dict) or "inputs" not in wire or set(wire) - allowed:
        raise CodecError(f"body must be a map with 'inputs' and optional {sorted(allowed - {'inputs'})}")
    outputs = wire.get("outputs")
    if outputs is not None and not (isinstance(outputs, list) and all(isinstance(o, str) for o in outputs)):
        raise CodecError("'outputs' must be a list of output names")
    parameters = wire.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise CodecError("'parameters' must be a map")
    extras = {k: wire[k] for k in fields if k in wire}
    return decode_tensor_map(wire["inputs"], limits), tuple(outputs) if outputs is not None else None, parameters, extras


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


def job_ttl(message: aio_pika.abc.AbstractIncomingMessage) -> float | None:
    """The job's TTL in seconds (the AMQP expiration, or inferq's header once RabbitMQ dropped it), None if none."""
    if message.expiration is not None:
        return float(message.expiration)
    ms = (message.headers or {}).get(TTL_HEADER)
    if isinstance(ms, int) and not isinstance(ms, bool) and ms >= 0:
        return ms / 1000
    return None


def header_int(message: aio_pika.abc.AbstractIncomingMessage, name: str) -> int:
    """A non-negative integer header, 0 when absent or malformed (headers are client-writable)."""
    value = (message.headers or {}).get(name, 0)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def is_suspect(message: aio_pika.abc.AbstractIncomingMessage) -> bool:
    """Whether the job was in a worker that died (returned by the broker, or marked so when handed back)."""
    return delivery_count(message) > 0 or bool(message.redelivered) or header_int(message, SUSPECT_HEADER) > 0


def delivery_count(message: aio_pika.abc.AbstractIncomingMessage) -> int:
    """How many times a quorum queue delivered this message before."""
    count = (message.headers or {}).get("x-delivery-count", 0)
    return count if isinstance(count, int) else 0


@dataclass(frozen=True)
class JobEvent:
    """One state change of one job, as kept in the job ledger stream."""

    job_id: str
    status: JobStatus
    model: str = ""
    version: str = ""
    ts: float = field(default_factory=time.time)
    tenant: str | None = None
    attempt: int = 0
    outputs: Mapping[str, Any] | None = None
    error: Mapping[str, str] | None = None
    timings: Mapping[str, float] | None = None
    worker: str | None = None
    run: str | None = None  # one start of the job on ``worker``: attempts count distinct (worker, run)
    ttl_s: float | None = None  # on a queued event: the job's TTL, so every edge can tell when it expires
    alias: str | None = None  # the alias that routed an unpinned job (on its queued event and the worker's)
    shadow_of: str | None = None  # a shadow job's primary job id (on its queued event)
    stage: str | None = None  # a pipeline job: the stage (its model) the event comes from
    chunks: int = 0  # on a sharded job's queued event: how many chunk sub-jobs it was split into
    trace: str | None = None  # the job's W3C traceparent (broker/trace.py), on its queued, running and final events
    webhook: Mapping[str, Any] | None = None  # the job's webhook {"url", "events"} (queued, running, final events)
    # Progress of one webhook delivery {"event", "state", "attempts", "last_status", "last_error"} (the sender's)
    webhook_delivery: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", JobStatus(self.status))

    def to_wire(self) -> dict[str, Any]:
        """A compact map: fields left at their empty default are omitted."""
        wire = {"job_id": self.job_id, "status": self.status.value, "ts": self.ts}
        for key in ("model", "version", "tenant", "attempt", "outputs", "error", "timings", "worker", "run", "ttl_s",
                    "alias", "shadow_of", "stage", "chunks", "trace", "webhook", "webhook_delivery"):
            value = getattr(self, key)
            if value:
                wire[key] = value
        return wire

    @classmethod
    def from_wire(cls, wire: Any) -> JobEvent:
        """Rebuild an event; raises CodecError on a malformed one.

        Fields this version does not know are ignored (a newer writer during a
        rolling upgrade); the fields it knows are type-checked, so a bad one
        cannot reach the projection.
        """
        if not isinstance(wire, dict):
            raise CodecError(f"a job event must be a map, got {type(wire).__name__}")
        try:
            status = JobStatus(wire.get("status"))
        except ValueError:
            raise CodecError(f"job event with unknown status {str(wire.get('status'))[:50]!r}") from None
        ts = wire.get("ts")
        if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts):
            raise CodecError(f"job event ts must be a finite number, got {str(ts)[:50]!r}")
        known = {k: _checked_field(k, wire[k]) for k in _EVENT_FIELDS if k in wire}
        return cls(job_id=check_job_id(wire.get("job_id")), status=status, ts=float(ts), **known)

    def result(self) -> dict[str, Any]:
        """The reply_to body: job_id, status, outputs, error, timings."""
        return {
            "job_id": self.job_id,
            "status": self.status,
            "outputs": self.outputs or {},
            "error": self.error,
            "timings": self.timings or {},
        }


_EVENT_FIELDS = {"model": str, "version": str, "tenant": str, "attempt": int, "outputs": dict, "error": dict,
                 "timings": dict, "worker": str, "run": str, "ttl_s": float, "alias": str, "shadow_of": str, "stage": str,
                 "chunks": int, "trace": str, "webhook": dict, "webhook_delivery": dict}


def _checked_field(name: str, value: Any) -> Any:
    expected = _EVENT_FIELDS[name]
    if value is None:
        return value
    if expected is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
            return float(value)
        raise CodecError(f"job event field {name!r} must be a positive number, got {str(value)[:50]!r}")
    if isinstance(value, expected) and not isinstance(value, bool):
        return value
    raise CodecError(f"job event field {name!r} must be {expected.__name__}, got {type(value).__name__}")


def error_dict(code: str, message: str) -> dict[str, str]:
    """The ``{"code", "message"}`` map used in results, events and HTTP errors."""
    return {"code": code, "message": message}


def pack_events(events: list[JobEvent]) -> bytes:
    """One ledger message carrying several events."""
    return packb([e.to_wire() for e in events])


def pack_event(event: JobEvent) -> bytes:
    """One event packed alone: its size counts against a message's byte budget."""
    return packb(event.to_wire())


def join_packed_events(packed: list[bytes]) -> bytes:
    """The ledger message of events packed by :func:`pack_event`: the same bytes :func:`pack_events` makes."""
    n = len(packed)
    header = bytes([0x90 | n]) if n < 16 else b"\xdc" + n.to_bytes(2, "big") if n < 2**16 else b"\xdd" + n.to_bytes(4, "big")
    return header + b"".join(packed)


def unpack_events(body: bytes) -> tuple[list[JobEvent], int]:
    """Events of one ledger message, and how many malformed ones were skipped (one bad event spoils no other)."""
    wire = unpackb(body)
    if not isinstance(wire, list):
        raise CodecError("a ledger message must be a list of events")
    events, bad = [], 0
    for item in wire:
        try:
            events.append(JobEvent.from_wire(item))
        except CodecError:
            bad += 1
    return events, bad
