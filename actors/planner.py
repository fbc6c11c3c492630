"""Turn a batch of job requests into model runs: validate each job, group compatible ones, split results.

A job that does not fit the model fails alone; the others still run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from broker.messages import JobRequest
from runtime.errors import InvalidInput
from runtime.repository import ModelVersion


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
        """Per-job slices of the batched outputs."""
        bounds = np.cumsum([0, *self.counts])
        return [{n: v[a:b] for n, v in outputs.items()} for a, b in zip(bounds[:-1], bounds[1:])]


def validate(request: JobRequest, version: ModelVersion, allow_nan: bool) -> tuple[Any, int]:
    """Check a request against the model signature; return its group key and sample count."""
    specs = {s.name: s for s in version.inputs}
    if set(request.inputs) != set(specs):
        raise InvalidInput(f"inputs must be exactly {sorted(specs)}, got {sorted(request.inputs)}")
    if request.outputs is not None:
        unknown = set(request.outputs) - {o.name for o in version.outputs}
        if unknown:
            raise InvalidInput(f"unknown output(s) {sorted(unknown)}; the model has {[o.name for o in version.outputs]}")
    counts, key = set(), []
    for name, spec in specs.items():
        array = request.inputs[name]
        _check_tensor(name, array, spec.dtype, spec.shape, allow_nan)
        counts.add(array.shape[0] if array.ndim else 1)
        key.append((name, array.shape[1:]))
    if len(counts) != 1:
        raise InvalidInput("all inputs of a job must have the same batch size (first dim)")
    return (tuple(key), request.outputs), counts.pop()


def _check_tensor(name: str, array: np.ndarray, dtype: str, shape: Sequence[int | None], allow_nan: bool) -> None:
    if array.dtype.name != dtype:
        raise InvalidInput(f"input {name!r} must be {dtype}, got {array.dtype.name}")
    if array.ndim != len(shape):
        raise InvalidInput(f"input {name!r} must have rank {len(shape)} {_fmt(shape)}, got shape {list(array.shape)}")
    for axis, (want, got) in enumerate(zip(shape, array.shape)):
        if want is not None and want != got:
            raise InvalidInput(f"input {name!r} dim {axis} must be {want} {_fmt(shape)}, got shape {list(array.shape)}")
    if not allow_nan and array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InvalidInput(f"input {name!r} contains NaN or infinity, which this model does not accept")


def _fmt(shape: Sequence[int | None]) -> str:
    return "[" + ", ".join("N" if d is None else str(d) for d in shape) + "]"


def is_batchable(version: ModelVersion) -> bool:
    """Whether every input has a dynamic first (batch) dim."""
    return all(s.shape and s.shape[0] is None for s in version.inputs)


def plan(jobs: Sequence[tuple[Any, JobRequest]], version: ModelVersion, allow_nan: bool) -> tuple[list[Group], list[tuple[Any, JobRequest, InvalidInput]]]:
    """Split ``jobs`` into runnable groups and rejected jobs with their error."""
    groups: dict[Any, Group] = {}
    solo: list[Group] = []
    rejected = []
    batchable = is_batchable(version)
    for job, request in jobs:
        try:
            key, count = validate(request, version, allow_nan)
        except InvalidInput as exc:
            rejected.append((job, request, exc))
            continue
        group = groups.setdefault(key, Group()) if batchable else Group()
        if not batchable:
            solo.append(group)
        group.jobs.append(job)
        group.requests.append(request)
        group.counts.append(count)
    return list(groups.values()) + solo, rejected
