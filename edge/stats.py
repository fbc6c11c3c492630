"""Inference counters per model version, fed by every job that reaches a final state in the ledger.

The edge's projection calls :meth:`InferenceStats.record` once per job, when the job first
becomes final (duplicates and late events of a finished job are not counted twice). Because
every edge replays the same ledger, every replica reports the same numbers, covering the
ledger's retention window and jobs submitted anywhere (HTTP, gRPC, AMQP). The counters are
plain numbers so the Triton statistics documents and a Prometheus exporter can share them.

Units are requests (jobs): a job of N rows counts once. ``batch_size`` is the number of jobs
a worker ran together, so one execution of a batch of b jobs is b jobs each adding 1/b.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from inferq.broker.messages import EXPIRED, FAILED, SUCCEEDED
from inferq.edge.projection import JobState

_FAILURES = (FAILED, EXPIRED)
NS_PER_MS = 1_000_000


@dataclass
class Duration:
    """A count and the nanoseconds summed over it."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


@dataclass
class BatchCounters:
    """Jobs run in batches of one size, and their compute time summed over those jobs."""

    jobs: int = 0
    compute_ns: int = 0

    def executions(self, batch_size: int) -> int:
        return self.jobs // batch_size

    def execution_ns(self, batch_size: int) -> int:
        return self.compute_ns // batch_size


@dataclass
class VersionStats:
    """Counters of one model version."""

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    last_inference_ms: int = 0
    executions: float = 0.0
    batches: dict[int, BatchCounters] = field(default_factory=dict)

    def record(self, state: JobState) -> None:
        """Fold in one job that has just become final."""
        finished = state.finished_at or 0.0
        timings = state.timings or {}
        queue_ns = int(timings.get("queue_ms", 0.0) * NS_PER_MS)
        infer_ns = int(timings.get("inference_ms", 0.0) * NS_PER_MS)
        total_ns = int((finished - state.created_at) * 1e9) if state.created_at and finished else queue_ns + infer_ns
        if state.status == SUCCEEDED:
            self.success.add(max(total_ns, 0))
            if "queue_ms" in timings:
                self.queue.add(queue_ns)
            self.compute_infer.add(infer_ns)
            self.last_inference_ms = max(self.last_inference_ms, int(finished * 1000))
            self._batch(int(timings.get("batch_size", 1)) or 1, infer_ns)
        elif state.status in _FAILURES:
            self.fail.add(max(total_ns, 0))

    def _batch(self, size: int, infer_ns: int) -> None:
        self.executions += 1 / size
        counters = self.batches.get(size)
        if counters is None:
            counters = self.batches[size] = BatchCounters()
        counters.jobs += 1
        counters.compute_ns += infer_ns


class InferenceStats:
    """VersionStats of every model version that has finished a job."""

    def __init__(self) -> None:
        self._versions: dict[tuple[str, str], VersionStats] = {}

    def record(self, state: JobState) -> None:
        """Count a job that has just become final (the projection's ``on_final`` hook)."""
        key = (state.model, state.version)
        stats = self._versions.get(key)
        if stats is None:
            stats = self._versions[key] = VersionStats()
        stats.record(state)

    def get(self, model: str, version: str) -> VersionStats:
        """The counters of one version (all zero if it has finished nothing)."""
        return self._versions.get((model, version)) or VersionStats()

    def versions(self) -> list[tuple[str, str]]:
        """Every (model, version) with counters."""
        return sorted(self._versions)
