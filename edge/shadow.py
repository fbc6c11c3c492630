"""Shadow traffic: a share of a model's unpinned jobs copied to another version, and how the two compare.

A mirrored job is a second job, ``<job id>.shadow``, queued to the shadow version
with no ``reply_to``: its result goes to the ledger only and is never returned to
the caller. Its ``queued`` event carries ``shadow_of`` (the primary's id). Mirroring
is best effort: a failed copy is logged and counted, and the primary is unaffected.

Every edge folds the ledger into its projection, so each edge compares the pairs
itself (:class:`ShadowTracker`, fed with every job that becomes final): whether
the outputs agree (``numpy.allclose``) and the inference latency of both sides.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import aio_pika
import numpy as np

from inferq.broker.codec import decode_tensor_map
from inferq.broker.connection import BrokerConnection
from inferq.broker.handback import copy_of, remaining_ttl
from inferq.broker.ledger import LedgerWriter
from inferq.broker.messages import (ALIAS_HEADER, FAILED, JOB_ID_RE, QUEUED, SUCCEEDED, TENANT_HEADER, WEBHOOK_EVENTS_HEADER,
                                    WEBHOOK_HEADER, JobEvent, JobRequest, error_dict)
from inferq.broker.topology import Topology
from inferq.edge.projection import JobState
from inferq.errors import CodecError, InferqError
from inferq.runtime.routing import percentile

log = logging.getLogger("inferq.edge.shadow")

SUFFIX = ".shadow"
RTOL, ATOL = 1e-4, 1e-5
KEEP_PAIRS = 2000


def shadow_id(job_id: str) -> str:
    """The id of a job's shadow copy (a valid job id even for the longest ones)."""
    candidate = job_id + SUFFIX
    if JOB_ID_RE.match(candidate):
        return candidate
    return "s" + hashlib.sha256(job_id.encode()).hexdigest()[:40] + SUFFIX


class ShadowMirror:
    """Publishes shadow copies (confirmed) and records their ``queued`` events."""

    def __init__(self, connection: BrokerConnection, topology: Topology, ledger: LedgerWriter) -> None:
        self._connection = connection
        self._topology = topology
        self._ledger = ledger
        self.mirrored = 0
        self.failed = 0

    async def mirror_request(self, request: JobRequest, model: str, version: str) -> None:
        """Copy an HTTP job to ``version`` as its shadow."""
        # A shadow answers nobody: no reply, no webhook; and no alias routed it.
        copy = replace(request, job_id=shadow_id(request.job_id), reply_to=None, correlation_id=None, webhook=None, alias=None)
        await self._send(copy.to_message(), copy.job_id, request.job_id, model, version, request.tenant)

    async def mirror_delivery(self, delivery: aio_pika.abc.AbstractIncomingMessage, job_id: str, model: str,
                              version: str) -> None:
        """Copy an AMQP job (as the router took it) to ``version`` as its shadow."""
        left = remaining_ttl(delivery)
        if left is not None and left <= 0:
            return
        original = copy_of(delivery, {}, left)
        headers = {k: v for k, v in (original.headers or {}).items() if k not in (WEBHOOK_HEADER, WEBHOOK_EVENTS_HEADER, ALIAS_HEADER)}
        message = aio_pika.Message(original.body, headers=headers, content_type=original.content_type,
                                   message_id=shadow_id(job_id), timestamp=original.timestamp,
                                   expiration=original.expiration, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        tenant = (delivery.headers or {}).get(TENANT_HEADER)
        await self._send(message, shadow_id(job_id), job_id, model, version, tenant if isinstance(tenant, str) else None)

    async def _send(self, message: aio_pika.abc.AbstractMessage, job_id: str, primary: str, model: str, version: str,
                    tenant: str | None) -> None:
        # The queued event goes first: the tracker must know a job is a shadow before its result can arrive.
        queued = JobEvent(job_id, QUEUED, model, version, tenant=tenant, shadow_of=primary)
        try:
            await self._ledger.write([queued])
        except InferqError as exc:
            self.failed += 1
            log.warning("could not mirror job %s to %s:%s (%s); the job itself is unaffected", primary, model, version, exc)
            return
        try:
            await self._connection.publish(message, self._topology.routing_key(model, version), self._topology.requests,
                                           mandatory=True)
            self.mirrored += 1
        except InferqError as exc:
            self.failed += 1
            log.warning("could not mirror job %s to %s:%s (%s); the job itself is unaffected", primary, model, version, exc)
            failed = replace(queued, status=FAILED, error=error_dict("shadow_not_sent", str(exc)), ts=time.time())
            try:
                await self._ledger.write([failed])
            except InferqError:
                pass  # the shadow job then stays queued until its TTL; it was never the caller's


@dataclass
class PairStats:
    """Compared pairs of one (model, shadow version)."""

    pairs: int = 0
    agree: int = 0
    disagree: int = 0
    primary_failed: int = 0
    shadow_failed: int = 0
    not_compared: int = 0  # pairs whose outputs are too large for the projection to hold (edge/results.py)
    primary_ms: deque[float] = field(default_factory=lambda: deque(maxlen=KEEP_PAIRS))
    shadow_ms: deque[float] = field(default_factory=lambda: deque(maxlen=KEEP_PAIRS))

    def report(self) -> dict[str, Any]:
        compared = self.agree + self.disagree
        return {
            "pairs": self.pairs, "agree": self.agree, "disagree": self.disagree,
            "agreement": round(self.agree / compared, 4) if compared else None,
            "primary_failed": self.primary_failed, "shadow_failed": self.shadow_failed,
            "not_compared": self.not_compared,
            "latency_ms": {"primary": _latency(self.primary_ms), "shadow": _latency(self.shadow_ms)},
            "tolerance": {"rtol": RTOL, "atol": ATOL},
        }


def _latency(values: deque[float]) -> dict[str, float | None]:
    ordered = list(values)
    mean = sum(ordered) / len(ordered) if ordered else None
    return {"mean": None if mean is None else round(mean, 3), "p50": percentile(ordered, 50), "p95": percentile(ordered, 95)}


def agree(primary: JobState, shadow: JobState) -> bool:
    """Whether two succeeded jobs have the same output names, shapes and values (within RTOL/ATOL)."""
    try:
        a = decode_tensor_map(primary.outputs or {}, what="outputs")
        b = decode_tensor_map(shadow.outputs or {}, what="outputs")
    except CodecError:
        return False
    return set(a) == set(b) and all(a[k].shape == b[k].shape and np.allclose(a[k], b[k], RTOL, ATOL, equal_nan=True) for k in a)


class ShadowTracker:
    """Pairs every shadow job with its primary once both are final; ``lookup`` reads the projection."""

    def __init__(self, lookup: Callable[[str], JobState | None]) -> None:
        self._lookup = lookup
        self._stats: dict[tuple[str, str], PairStats] = {}

    def record(self, state: JobState) -> None:
        """Called for each job that becomes final (never raises)."""
        try:
            if state.shadow_of:
                self._pair(self._lookup(state.shadow_of), state)
            else:
                shadow = self._lookup(shadow_id(state.job_id))
                if shadow is not None and shadow.shadow_of == state.job_id:
                    self._pair(state, shadow)
        except Exception:  # statistics must never break the projection
            log.exception("shadow statistics failed for job %s", state.job_id)

    def _pair(self, primary: JobState | None, shadow: JobState) -> None:
        if primary is None or not primary.terminal or not shadow.terminal:
            return
        stats = self._stats.setdefault((shadow.model, shadow.version), PairStats())
        stats.pairs += 1
        if primary.status != SUCCEEDED or shadow.status != SUCCEEDED:
            stats.primary_failed += primary.status != SUCCEEDED
            stats.shadow_failed += shadow.status != SUCCEEDED
            return
        if primary.held_out or shadow.held_out:  # no read back from the ledger on the projection's path
            stats.not_compared += 1
        elif agree(primary, shadow):
            stats.agree += 1
        else:
            stats.disagree += 1
        for side, state in ((stats.primary_ms, primary), (stats.shadow_ms, shadow)):
            if state.timings and isinstance(state.timings.get("inference_ms"), (int, float)):
                side.append(float(state.timings["inference_ms"]))

    def report(self, model: str, version: str) -> dict[str, Any]:
        """The comparison of ``model``'s primaries with their shadows on ``version``."""
        return self._stats.get((model, version), PairStats()).report()

    def versions(self, model: str) -> list[str]:
        """Shadow versions of ``model`` with pairs seen."""
        return sorted(v for m, v in self._stats if m == model)
