"""OpenTelemetry spans of finished jobs, built by the edge from the ledger (optional: ``pip install 'inferq[otel]'``).

When a job becomes final, the edge knows its whole story from the ledger: when it was
queued, when a worker started it, how long it waited and ran (``timings``), when its
result was written. :class:`JobSpans` turns that into one span tree in the job's trace
(the ``traceparent`` it travelled with): ``inferq.job`` (its span id is the edge's span
of the job, the one in the job document), with children ``queue wait``, ``inference``
and ``result write``. One process exports, so nothing about OpenTelemetry needs to
cross the broker; jobs replayed from the ledger at start are not exported again.
"""

from __future__ import annotations

import contextvars
import logging
from typing import Any

from inferq.broker.trace import parse_traceparent
from inferq.edge.projection import JobState

log = logging.getLogger("inferq.edge.spans")

_PRESET: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar("inferq_span_ids", default=None)
NS = 1_000_000_000


class JobSpans:
    """Exports a finished job's span tree through ``tracer_provider`` (an ``opentelemetry.sdk`` TracerProvider)."""

    def __init__(self, tracer_provider: Any) -> None:
        self._provider = tracer_provider
        self._tracer = tracer_provider.get_tracer("inferq.edge")
        self.live = False  # set once the ledger replay is over: replayed jobs were exported when they finished

    def record(self, state: JobState) -> None:
        """The span tree of a job that has just become final (the projection's ``on_final`` hook)."""
        parent = parse_traceparent(state.trace)
        if not self.live or parent is None or not (state.created_at and state.finished_at):
            return
        _, trace, span, _ = parent.split("-")
        start, end = _ns(state.created_at), _ns(state.finished_at)
        token = _PRESET.set((int(trace, 16), int(span, 16)))  # the root span takes the job's own ids
        try:
            root = self._tracer.start_span("inferq.job", start_time=start, attributes=_attributes(state))
        finally:
            _PRESET.reset(token)
        self._children(root, state, start, end)
        root.end(end_time=end)

    def _children(self, root: Any, state: JobState, start: int, end: int) -> None:
        from opentelemetry import trace

        context = trace.set_span_in_context(root)
        timings = state.timings or {}
        began = _ns(state.started_at) if state.started_at else start + int(timings.get("queue_ms", 0) * 1e6)
        steps = [("queue wait", start, max(start, began))]
        if "inference_ms" in timings:
            ran = min(end, began + int(timings["inference_ms"] * 1e6))
            steps += [("inference", began, ran), ("result write", ran, end)]
        for name, t0, t1 in steps:
            child = self._tracer.start_span(name, context=context, start_time=t0)
            if name == "inference":
                child.set_attribute("inferq.batch_size", int(timings.get("batch_size", 1)))
            child.end(end_time=t1)

    def shutdown(self) -> None:
        """Flush and stop the exporter."""
        self._provider.shutdown()


def _ns(ts: float) -> int:
    return int(ts * NS)


def _attributes(state: JobState) -> dict[str, Any]:
    attributes = {"inferq.job_id": state.job_id, "inferq.model": state.model, "inferq.version": state.version,
                  "inferq.status": state.status.value, "inferq.attempts": state.attempts}
    if state.worker:
        attributes["inferq.worker"] = state.worker
    if state.error:
        attributes["inferq.error_code"] = str(state.error.get("code", ""))
    return attributes


def preset_id_generator() -> Any:
    """An id generator that gives the next span preset ids (the job's), else random ones."""
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    class PresetIds(RandomIdGenerator):
        def generate_trace_id(self) -> int:
            preset = _PRESET.get()
            return preset[0] if preset else super().generate_trace_id()

        def generate_span_id(self) -> int:
            preset = _PRESET.get()  # set only around the root span's start: its children get random ids
            return preset[1] if preset else super().generate_span_id()

    return PresetIds()


def open_job_spans(endpoint: str) -> JobSpans | None:
    """OTLP/HTTP export to ``endpoint`` (e.g. ``http://collector:4318/v1/traces``); None when off or not installed."""
    if not endpoint:
        return None
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning("metrics.otlp_endpoint is set but opentelemetry is not installed (pip install 'inferq[otel]'); no spans")
        return None
    provider = TracerProvider(resource=Resource.create({"service.name": "inferq-edge"}), id_generator=preset_id_generator())
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, timeout=10)))
    return JobSpans(provider)
