"""Turn a batch of job requests into model runs: validate each job, group compatible ones, split results.

A job that does not fit the model fails alone; the others still run. Only a
batchable model (see :mod:`inferq.runtime.signature`) stacks jobs; a group of
one job gets its outputs whole, whatever their shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from inferq.broker.messages import JobRequest
from inferq.errors import InferenceError, InvalidInput
from inferq.runtime.repository import ModelVersion
from inferq.runtime.signature import validate


@dataclass
class Group:
    """Jobs whose inputs stack along the batch axis into one run."""

    jobs: list[Any] = field(default_factory=list)
    requests: list[JobRequest] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)

    def feed(self) -> dict[str, np.ndarray]:
        """The stacked inputs (no copy when there is one job)."""
        names = self.requests[0].inputs.keys()
        if len(self.requests) == 1:
            return dict(self.requests[0].inputs)
        return {n: np.concatenate([r.inputs[n] for r in self.requests], axis=0) for n in names}

    def singles(self) -> list[Group]:
        """One group per job (to isolate a job that breaks a batched run)."""
        return [Group([j], [r], [c]) for j, r, c in zip(self.jobs, self.requests, self.counts)]

    def split(self, outputs: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Per-job outputs: whole for a group of one, else slices along the batch dim.

        Raises InferenceError when a batched output does not have the batch's
        first dim (the model broke its own signature): the caller reruns the
        jobs one by one, where outputs come back whole.
        """
        if len(self.requests) == 1:
            return [outputs]
        total = sum(self.counts)
        for name, value in outputs.items():
            if value.ndim == 0 or value.shape[0] != total:
                raise InferenceError(f"output {name!r} of shape {list(value.shape)} does not follow the batch of {total}")
        bounds = np.cumsum([0, *self.counts])
        return [{n: v[a:b] for n, v in outputs.items()} for a, b in zip(bounds[:-1], bounds[1:])]


def plan(jobs: Sequence[tuple[Any, JobRequest]], version: ModelVersion, allow_nan: bool) -> tuple[list[Group], list[tuple[Any, JobRequest, InvalidInput]]]:
    """Split ``jobs`` into runnable groups and rejected jobs with their error."""
    groups: dict[Any, Group] = {}
    solo: list[Group] = []
    rejected = []
    for job, request in jobs:
        try:
            key, count = validate(request.inputs, request.outputs, version, allow_nan)
        except InvalidInput as exc:
            rejected.append((job, request, exc))
            continue
        group = Group() if key is None else groups.setdefault(key, Group())
        if key is None:
            solo.append(group)
        group.jobs.append(job)
        group.requests.append(request)
        group.counts.append(count)
    return list(groups.values()) + solo, rejected
