"""Prometheus metrics every inferq process shares: job outcomes in Triton's names plus histograms, and /metrics.

Each process builds its own :class:`prometheus_client.CollectorRegistry` (never the
library's global one), so several edges or workers in one test process do not collide.

:class:`JobMetrics` is fed once per job that reached a final state: by the edge from
the ledger (every job of the namespace, and again after a restart, as the ledger is
replayed) and by a worker from its own batches. Triton's counters keep Triton's exact
names without a ``_total`` suffix, so existing Triton dashboards read them unchanged;
the ``inferq_*`` histograms are classic-bucket histograms any Prometheus aggregates.

Cardinality budget: labels are ``model``, ``version``, ``status``, ``code``/``reason``
(a closed set of error codes) and, on a worker, nothing per job. No job id, tenant or
trace id is ever a label.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import Metric

from inferq.errors import ConfigError

log = logging.getLogger("inferq.metrics")

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
VERSION_LABELS = ("model", "version")
# Triton's failure reasons (OTHER, BACKEND, CANCELED, REJECTED) from inferq's error codes.
_REASONS = {"inference_error": "BACKEND", "reshape": "BACKEND", "cancelled": "CANCELED", "expired": "REJECTED",
            "queue_full": "REJECTED", "poison": "OTHER"}


def triton_reason(status: str, code: str) -> str:
    """Triton's ``reason`` label of a failed job."""
    if status == "cancelled":
        return "CANCELED"
    if status == "expired":
        return "REJECTED"
    return _REASONS.get(code, "OTHER")


@dataclass
class _TritonVersion:
    success: int = 0
    failure: dict[str, int] = field(default_factory=dict)
    count: int = 0
    exec_count: float = 0.0
    request_us: float = 0.0
    queue_us: float = 0.0
    compute_infer_us: float = 0.0


class TritonCounters:
    """Triton's per-model counters, kept as plain numbers and exposed under Triton's exact names."""

    def __init__(self) -> None:
        self._versions: dict[tuple[str, str], _TritonVersion] = {}

    def record(self, model: str, version: str, status: str, code: str, timings: Mapping[str, float], total_s: float) -> None:
        """Count one final job."""
        v = self._versions.setdefault((model, version), _TritonVersion())
        if status != "succeeded":
            reason = triton_reason(status, code)
            v.failure[reason] = v.failure.get(reason, 0) + 1
            return
        v.success += 1
        v.count += 1
        v.exec_count += 1 / max(1, int(timings.get("batch_size", 1) or 1))  # a batch of b is b jobs of 1/b each
        v.request_us += total_s * 1e6
        v.queue_us += float(timings.get("queue_ms", 0.0)) * 1000
        v.compute_infer_us += float(timings.get("inference_ms", 0.0)) * 1000

    def collect(self) -> Iterator[Metric]:
        """The metric families (the registry's collector protocol)."""
        spec = [("nv_inference_request_success", "successful inference requests (jobs)", lambda v: v.success),
                ("nv_inference_count", "inferences performed (jobs)", lambda v: v.count),
                ("nv_inference_exec_count", "model executions (batches); count / exec_count = mean batch size",
                 lambda v: round(v.exec_count, 6)),
                ("nv_inference_request_duration_us", "cumulative end-to-end job duration of successes (submit to result)",
                 lambda v: v.request_us),
                ("nv_inference_queue_duration_us", "cumulative time successful jobs waited in their queue", lambda v: v.queue_us),
                ("nv_inference_compute_infer_duration_us", "cumulative ONNX Runtime time of successful jobs",
                 lambda v: v.compute_infer_us)]
        for name, text, value in spec:
            metric = Metric(name, text, "counter")
            for (model, version), v in sorted(self._versions.items()):
                metric.add_sample(name, {"model": model, "version": version}, value(v))
            yield metric
        failure = Metric("nv_inference_request_failure", "failed inference requests (jobs) by Triton reason", "counter")
        for (model, version), v in sorted(self._versions.items()):
            for reason, n in sorted(v.failure.items()):
                failure.add_sample("nv_inference_request_failure", {"model": model, "version": version, "reason": reason}, n)
        yield failure


class JobMetrics:
    """Final-job counters and histograms on one registry."""

    def __init__(self, registry: CollectorRegistry, subject: str) -> None:
        """``subject`` says whose jobs these are in the help texts (``"the namespace's ledger"``, ``"this worker"``)."""
        self.triton = TritonCounters()
        registry.register(self.triton)
        self.outcomes = Counter("inferq_jobs", f"final jobs of {subject} by status and error code",
                                [*VERSION_LABELS, "status", "code"], registry=registry)
        self.duration = Histogram("inferq_job_duration_seconds", f"end-to-end seconds of succeeded jobs ({subject})",
                                  VERSION_LABELS, registry=registry, buckets=LATENCY_BUCKETS_S)
        self.queue = Histogram("inferq_job_queue_seconds", f"seconds succeeded jobs waited in their queue ({subject})",
                               VERSION_LABELS, registry=registry, buckets=LATENCY_BUCKETS_S)
        self.compute = Histogram("inferq_job_compute_seconds", f"ONNX Runtime seconds of the batch that ran each job ({subject})",
                                 VERSION_LABELS, registry=registry, buckets=LATENCY_BUCKETS_S)
        self.batch = Histogram("inferq_batch_size", f"jobs in the batch that ran each succeeded job ({subject})",
                               VERSION_LABELS, registry=registry, buckets=BATCH_BUCKETS)

    def record(self, model: str, version: str, status: str, error: Mapping[str, Any] | None,
               timings: Mapping[str, float] | None, total_s: float | None) -> None:
        """Count one job that has just become final (never twice for one job: callers see to that)."""
        timings = timings or {}
        code = str((error or {}).get("code", "")) if status != "succeeded" else ""
        self.outcomes.labels(model, version, status, code).inc()
        self.triton.record(model, version, status, code, timings, max(0.0, total_s or 0.0))
        if status != "succeeded":
            return
        if total_s is not None:
            self.duration.labels(model, version).observe(max(0.0, total_s))
        if "queue_ms" in timings:
            self.queue.labels(model, version).observe(float(timings["queue_ms"]) / 1000)
        if "inference_ms" in timings:
            self.compute.labels(model, version).observe(float(timings["inference_ms"]) / 1000)
        self.batch.labels(model, version).observe(int(timings.get("batch_size", 1) or 1))


def exposition(registry: CollectorRegistry) -> web.Response:
    """``registry`` in the Prometheus text format, as an aiohttp response."""
    body = generate_latest(registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


class MetricsEndpoint:
    """A small HTTP server of one registry's ``/metrics`` (workers, autoscaler, agent: ``--metrics-port``)."""

    def __init__(self, runner: web.AppRunner, port: int) -> None:
        self._runner = runner
        self.port = port

    @classmethod
    async def open(cls, registry: CollectorRegistry, host: str, port: int) -> MetricsEndpoint:
        """Listen on ``host:port`` (port 0 here means any free port; callers skip the endpoint when it is off)."""
        async def metrics(request: web.Request) -> web.Response:
            return exposition(registry)

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port, reuse_address=True).start()
        except OSError as exc:  # one clear line (port taken, bad host), not a traceback
            await runner.cleanup()
            raise ConfigError(f"cannot serve /metrics on {host}:{port} (metrics.port, --metrics-port): {exc}") from exc
        bound = runner.addresses[0][1]
        log.info("metrics on http://%s:%s/metrics", host, bound)
        return cls(runner, bound)

    async def aclose(self) -> None:
        await self._runner.cleanup()


def gauge(name: str, text: str, samples: Iterable[tuple[Mapping[str, str], float]], kind: str = "gauge") -> Metric:
    """A metric family from ``(labels, value)`` pairs (for collectors serving state a process already keeps)."""
    metric = Metric(name, text, kind)
    sample_name = f"{metric.name}_total" if kind == "counter" else (f"{metric.name}_info" if kind == "info" else metric.name)
    for labels, value in samples:
        metric.add_sample(sample_name, dict(labels), value)
    return metric


async def open_endpoint(registry: CollectorRegistry, settings: Any) -> MetricsEndpoint | None:
    """The process's ``/metrics`` endpoint per its :class:`~inferq.settings.MetricsSettings`; None when off (port 0)."""
    if not settings.port:
        return None
    return await MetricsEndpoint.open(registry, settings.host, max(0, settings.port))


def advertised(endpoint: MetricsEndpoint | None, settings: Any) -> str:
    """``host:port`` Prometheus scrapes the endpoint at ("" when off), as written in etcd records."""
    if endpoint is None:
        return ""
    host = settings.advertise_host or settings.host
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"{host}:{endpoint.port}"
