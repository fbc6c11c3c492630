"""The edge's Prometheus metrics: the ledger's job outcomes, and the fleet facts of the :class:`Overview`.

Job counters and histograms count every job of the namespace that reaches a final state
in the ledger (each edge replays the same ledger, so every replica reports the same
numbers, and a restarted edge counts its retention window again). Queue, worker and
autoscaler gauges come from the overview's cache: a scrape costs no etcd read and no
queue declare. ``inferq_metrics_stale`` is 1 while those facts may be old (a broker or
etcd outage): the scrape still answers, with the last values known.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

from inferq.broker.messages import STATUSES
from inferq.edge.overview import Overview
from inferq.edge.projection import JobProjection, JobState
from inferq.runtime.metrics import JobMetrics, gauge

WORKER_STATES = ("warming", "ready", "draining")


class EdgeMetrics:
    """The edge's registry: :class:`JobMetrics` fed by the projection, plus the overview's gauges."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()  # the edge's own, never prometheus-client's global one
        self.jobs = JobMetrics(self.registry, "the namespace's ledger")

    def record(self, state: JobState) -> None:
        """Count a job that has just become final (the projection's ``on_final`` hook)."""
        total = state.finished_at - state.created_at if state.finished_at and state.created_at else None
        self.jobs.record(state.model, state.version, state.status.value, state.error, state.timings, total)

    def serve(self, overview: Overview, projection: JobProjection, *collectors: object,
              results_read: Callable[[], int] = lambda: 0) -> None:
        """Add the fleet gauges of ``overview`` and further collectors (the registry API's) to the registry."""
        self.registry.register(_FleetCollector(overview, projection, results_read))
        for collector in collectors:
            self.registry.register(_Collecting(collector.collect))


class _Collecting:
    """A collector from a ``collect`` method alone (the registry must not mistake an object's other methods for its own)."""

    def __init__(self, collect) -> None:
        self.collect = collect


class _FleetCollector:
    def __init__(self, overview: Overview, projection: JobProjection, results_read: Callable[[], int]) -> None:
        self._overview = overview
        self._projection = projection
        self._results_read = results_read

    def collect(self) -> Iterator[Metric]:
        snap, now = self._overview.snapshot, time.time()
        yield from self._queues(snap)
        yield from self._workers(snap)
        yield from self._decisions(snap, now)
        yield gauge("inferq_dead_letter_ready", "dead letters not yet recorded in the ledger (the namespace's DLQ)",
                    [({}, snap.dead_letters)] if snap.dead_letters is not None else [])
        yield gauge("inferq_edge_jobs_in_memory", "jobs in this edge's projection", [({}, len(self._projection))])
        yield gauge("inferq_edge_ledger_events", "ledger events this edge has applied",
                    [({}, self._projection.events_applied)], "counter")
        yield gauge("inferq_edge_projection_bytes", "what this edge's projection counts against edge.max_projection_bytes",
                    [({}, self._projection.bytes)])
        yield gauge("inferq_edge_results_read", "large results this edge read back from the ledger stream",
                    [({}, self._results_read())], "counter")
        yield gauge("inferq_metrics_refresh_age_seconds", "seconds since the broker and etcd facts were refreshed",
                    [({}, round(now - snap.at, 3) if snap.at else -1)])
        yield gauge("inferq_metrics_stale", "1 while queue, worker and autoscaler facts may be out of date",
                    [({}, int(self._overview.stale(now)))])

    def _queues(self, snap) -> Iterator[Metric]:
        ready, pending, consumers, oldest, states = [], [], [], [], []
        inflight = _inflight(snap.workers)
        for (model, version), facts in sorted(snap.versions.items()):
            labels = {"model": model, "version": version}
            busy = inflight.get((model, version), 0)
            if facts.ready is not None:
                ready.append((labels, facts.ready))
                pending.append((labels, facts.ready + busy))
            consumers.append((labels, facts.consumers))
            oldest.append((labels, round(facts.oldest_queued_s, 3)))
            states += [({**labels, "state": s.value}, facts.states.get(s.value, 0)) for s in STATUSES]
        yield gauge("inferq_queue_ready", "jobs waiting in a model version's queues (both priorities)", ready)
        yield gauge("nv_inference_pending_request_count", "jobs waiting or running: queued plus in flight at workers", pending)
        yield gauge("inferq_queue_consumers", "consumers of a model version's queue, as RabbitMQ counts them", consumers)
        yield gauge("inferq_queue_inflight", "jobs delivered to a version's workers and not yet final (unacked)",
                    [({"model": m, "version": v}, n) for (m, v), n in sorted(inflight.items())])
        yield gauge("inferq_queue_oldest_age_seconds", "age of a version's oldest job still queued (ledger time)", oldest)
        yield gauge("inferq_ledger_jobs", "jobs in the ledger's retention window by state", states)

    def _workers(self, snap) -> Iterator[Metric]:
        by_version: dict[tuple[str, str], list] = {}
        for w in snap.workers:
            by_version.setdefault((w.model, w.version), []).append(w)
        keys = sorted(set(snap.versions) | set(by_version))
        yield gauge("inferq_workers", "live workers of a model version by state",
                    [({"model": m, "version": v, "state": s}, sum(1 for w in by_version.get((m, v), []) if w.state.value == s))
                     for m, v in keys for s in WORKER_STATES])
        yield gauge("inferq_worker_inflight", "jobs prefetched or running at a version's workers",
                    [({"model": m, "version": v}, sum(w.stats.inflight for w in by_version.get((m, v), []))) for m, v in keys])
        yield gauge("inferq_worker_jobs", "jobs succeeded by a version's live workers",
                    [({"model": m, "version": v}, sum(w.stats.jobs for w in by_version.get((m, v), []))) for m, v in keys],
                    "counter")

    def _decisions(self, snap, now: float) -> Iterator[Metric]:
        rows = sorted(snap.decisions.values(), key=lambda d: (d.model, d.version))
        labels = [{"model": d.model, "version": d.version} for d in rows]
        yield gauge("inferq_autoscaler_backlog", "backlog in the autoscaler's last decision",
                    [(lab, d.backlog) for lab, d in zip(labels, rows)])
        yield gauge("inferq_autoscaler_desired_workers", "workers the autoscaler last asked for",
                    [(lab, d.desired) for lab, d in zip(labels, rows)])
        yield gauge("inferq_autoscaler_current_workers", "workers the autoscaler counted in its last decision",
                    [(lab, d.current) for lab, d in zip(labels, rows)])
        yield gauge("inferq_autoscaler_decision_age_seconds", "seconds since the autoscaler recorded its last decision",
                    [(lab, round(max(0.0, now - d.at), 3)) for lab, d in zip(labels, rows) if d.at])
        yield gauge("inferq_autoscaler_decision", "the reason of the autoscaler's last decision (value 1)",
                    [({**lab, "reason": d.reason}, 1) for lab, d in zip(labels, rows)], "info")


def _inflight(workers) -> dict[tuple[str, str], int]:
    found: dict[tuple[str, str], int] = {}
    for w in workers:
        found[(w.model, w.version)] = found.get((w.model, w.version), 0) + w.stats.inflight
    return found
