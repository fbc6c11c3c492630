"""The recommender that turns backlog into a worker count under a :class:`~inferq.settings.ScalingPolicy`.

desired = clamp(ceil(backlog / target_backlog_per_worker), min_workers, max_workers),
then smoothed like Kubernetes' HPA: a scale-up takes the lowest recommendation
of the last ``scale_up_stabilization_s``, a scale-down the highest of the last
``scale_down_stabilization_s``, and the last worker goes only after
``idle_before_zero_s`` without backlog. A model at zero workers with a job
waiting gets one at once (activation).
"""

from __future__ import annotations

import math
from collections import deque

from inferq.settings import ScalingPolicy


class Recommender:
    """Remembers recent recommendations of one model version to smooth them."""

    def __init__(self) -> None:
        self._history: deque[tuple[float, int]] = deque()
        self._last_busy: float | None = None
        self.cooldown_s = 0.0  # after a decision held by stabilization: seconds until the window lets it go

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
        self.cooldown_s = 0.0
        if raw > current:
            desired = max(current, min(r for t, r in self._history if t >= now - policy.scale_up_stabilization_s))
            if desired <= current:
                self.cooldown_s = self._held(now, policy.scale_up_stabilization_s, lambda r: r <= current)
            return desired, "scale up" if desired > current else "scale up held by stabilization"
        if raw < current:
            desired = min(current, max(r for t, r in self._history if t >= now - policy.scale_down_stabilization_s))
            if desired >= current:
                self.cooldown_s = self._held(now, policy.scale_down_stabilization_s, lambda r: r >= current)
            return desired, ("scale to zero after idle" if desired == 0 else "scale down") if desired < current else "scale down held by stabilization"
        return current, "steady"

    def _held(self, now: float, window: float, holding) -> float:
        """Seconds until the last recommendation that holds the count leaves the window (the cooldown left)."""
        last = max((t for t, r in self._history if t >= now - window and holding(r)), default=None)
        return 0.0 if last is None else max(0.0, last + window - now)

    def _remember(self, now: float, raw: int, window: float) -> None:
        self._history.append((now, raw))
        while self._history and self._history[0][0] < now - window:
            self._history.popleft()
