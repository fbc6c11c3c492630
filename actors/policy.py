"""Scaling policy and the recommender that turns backlog into a worker count.

desired = clamp(ceil(backlog / target_backlog_per_worker), min_workers, max_workers),
then smoothed like Kubernetes' HPA: a scale-up takes the lowest recommendation
of the last ``scale_up_stabilization_s``, a scale-down the highest of the last
``scale_down_stabilization_s``, and the last worker goes only after
``idle_before_zero_s`` without backlog. A model at zero workers with a job
waiting gets one at once (activation).
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from dataclasses import dataclass
from typing import Any

from runtime.errors import ConfigError


@dataclass(frozen=True)
class ScalingPolicy:
    """Per-model scaling settings (model config ``[scaling]``, overridable in etcd at run time)."""

    min_workers: int = 0
    max_workers: int = 4
    target_backlog_per_worker: int = 64
    scale_up_stabilization_s: float = 0.0
    scale_down_stabilization_s: float = 30.0
    idle_before_zero_s: float = 60.0

    def merged(self, overrides: dict[str, Any] | None) -> ScalingPolicy:
        """This policy with ``overrides`` applied; unknown or invalid fields raise ConfigError."""
        if not overrides:
            return self
        fields = {f.name: f.type for f in dataclasses.fields(self)}
        unknown = set(overrides) - set(fields)
        if unknown:
            raise ConfigError(f"unknown scaling field(s) {sorted(unknown)}")
        try:
            values = {k: (int(v) if fields[k] == "int" else float(v)) for k, v in overrides.items()}
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"bad scaling policy {overrides}: {exc}") from exc
        return dataclasses.replace(self, **values).checked()

    def checked(self) -> ScalingPolicy:
        if not 0 <= self.min_workers <= self.max_workers or self.target_backlog_per_worker < 1:
            raise ConfigError(f"scaling policy needs 0 <= min_workers <= max_workers and target >= 1: {self}")
        return self


@dataclass(frozen=True)
class Decision:
    """One recommendation with the inputs that produced it."""

    model: str
    version: str
    backlog: int
    current: int
    desired: int
    reason: str
    consumers: int = 0  # consumers on the queue, as RabbitMQ counts them (a cross-check of membership)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Recommender:
    """Remembers recent recommendations of one model version to smooth them."""

    def __init__(self) -> None:
        self._history: deque[tuple[float, int]] = deque()
        self._last_busy: float | None = None

    def decide(self, policy: ScalingPolicy, now: float, backlog: int, current: int) -> tuple[int, str]:
        """The worker count to aim for now, and why."""
        if backlog > 0 or self._last_busy is None:
            self._last_busy = now
        raw = min(max(math.ceil(backlog / policy.target_backlog_per_worker), policy.min_workers), policy.max_workers)
        if raw == 0 and current > 0 and now - self._last_busy < policy.idle_before_zero_s:
            raw = 1
        self._remember(now, raw, max(policy.scale_up_stabilization_s, policy.scale_down_stabilization_s))
        if current == 0 and backlog > 0 and policy.max_workers > 0:
            return max(1, raw), "activation: jobs waiting and no worker"
        if raw > current:
            desired = max(current, min(r for t, r in self._history if t >= now - policy.scale_up_stabilization_s))
            return desired, "scale up" if desired > current else "scale up held by stabilization"
        if raw < current:
            desired = min(current, max(r for t, r in self._history if t >= now - policy.scale_down_stabilization_s))
            return desired, ("scale to zero after idle" if desired == 0 else "scale down") if desired < current else "scale down held by stabilization"
        return current, "steady"

    def _remember(self, now: float, raw: int, window: float) -> None:
        self._history.append((now, raw))
        while self._history and self._history[0][0] < now - window:
            self._history.popleft()
