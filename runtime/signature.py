"""A model version's signature as a contract: does a job fit it, and can its jobs share a run?

Used by the edge (refuse a job before it is queued) and by the worker (which
trusts nothing it reads off a queue). Batching follows Triton's rule: jobs are
stacked along the first dim only when every input *and* every output has a
dynamic first dim; any other model runs one job per session run, and its
outputs come back whole.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from inferq.errors import InvalidInput
from inferq.runtime.repository import ModelVersion, TensorSpec


def validate(inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None, version: ModelVersion, allow_nan: bool) -> tuple[Any, int]:
    """Check a job against the signature; return its group key and sample count (1 for unbatched models)."""
    specs = {s.name: s for s in version.inputs}
    if set(inputs) != set(specs):
        raise InvalidInput(f"inputs must be exactly {sorted(specs)}, got {sorted(inputs)}")
    if outputs is not None:
        unknown = set(outputs) - {o.name for o in version.outputs}
        if unknown:
            raise InvalidInput(f"unknown output(s) {sorted(unknown)}; the model has {[o.name for o in version.outputs]}")
    for name, spec in specs.items():
        check_tensor(name, inputs[name], spec, allow_nan)
    if not is_batchable(version):
        return None, 1
    counts = {inputs[name].shape[0] for name in specs}
    if len(counts) != 1:
        raise InvalidInput("all inputs of a job must have the same batch size (first dim)")
    key = tuple((name, inputs[name].shape[1:]) for name in specs)
    return (key, tuple(outputs) if outputs is not None else None), counts.pop()


def check_tensor(name: str, array: np.ndarray, spec: TensorSpec, allow_nan: bool) -> None:
    """Dtype, rank and fixed dims of one input; NaN and infinity when the model refuses them."""
    if array.dtype.name != spec.dtype:
        raise InvalidInput(f"input {name!r} must be {spec.dtype}, got {array.dtype.name}")
    if spec.shape is None:
        return
    if array.ndim != len(spec.shape):
        raise InvalidInput(f"input {name!r} must have rank {len(spec.shape)} {fmt(spec.shape)}, got shape {list(array.shape)}")
    for axis, (want, got) in enumerate(zip(spec.shape, array.shape)):
        if want is not None and want != got:
            raise InvalidInput(f"input {name!r} dim {axis} must be {want} {fmt(spec.shape)}, got shape {list(array.shape)}")
    if not allow_nan and array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InvalidInput(f"input {name!r} contains NaN or infinity, which this model does not accept")


def fmt(shape: Sequence[int | None]) -> str:
    """A shape as the error messages show it: ``[N, 256]``."""
    return "[" + ", ".join("N" if d is None else str(d) for d in shape) + "]"


def _batch_aligned(spec: TensorSpec) -> bool:
    return spec.shape is not None and len(spec.shape) > 0 and spec.shape[0] is None


def is_batchable(version: ModelVersion) -> bool:
    """Whether jobs may be stacked: every input and every output has a dynamic first (batch) dim."""
    return all(_batch_aligned(s) for s in version.inputs) and all(_batch_aligned(s) for s in version.outputs)


def batch_breaking_outputs(version: ModelVersion, outputs: Mapping[str, np.ndarray]) -> list[str]:
    """Outputs declared batch-aligned whose result for a one-row feed is not: 0-d, or a first dim other than 1.

    Such a model lies about its signature; batching its jobs would slice
    outputs wrongly, so they must run one job per session run.
    """
    if not is_batchable(version):
        return []
    return [spec.name for spec in version.outputs
            if spec.name in outputs and (np.ndim(outputs[spec.name]) == 0 or np.shape(outputs[spec.name])[0] != 1)]


def unbatched(version: ModelVersion, names: Sequence[str]) -> ModelVersion:
    """``version`` with the outputs ``names`` of unknown shape, which makes it unbatchable (one job per run)."""
    outputs = tuple(dataclasses.replace(s, shape=None) if s.name in names else s for s in version.outputs)
    return dataclasses.replace(version, outputs=outputs)

