"""Warm-up: one real inference on a sample built from the signature, before a worker says it is ready.

The sample has every dynamic dim (and the batch dim) set to 1 and every value 0.
It proves the session loads and runs on this node's providers (a provider that is
listed but cannot run fails here, and a TensorRT engine is built here, not on the
first job). A model whose run fails on zeros may still serve real inputs, so a
failed warm-up does not stop the worker: it serves pinned jobs, reports
``warmed: false`` with the error, and its version gets no share of a traffic split.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from inferq.errors import InferenceError
from inferq.runtime.repository import ModelVersion
from inferq.runtime.session import ModelSession
from inferq.runtime.signature import batch_breaking_outputs, unbatched

log = logging.getLogger("inferq.warmup")

WARMUP_TIMEOUT_S = 600.0  # a TensorRT engine build may take minutes on a small device


def sample_feed(version: ModelVersion) -> dict[str, np.ndarray] | None:
    """Zeros of every input's shape with dynamic dims set to 1; None if an input has no known rank or dtype."""
    feed = {}
    for spec in version.inputs:
        if spec.shape is None or spec.dtype.startswith("onnx:"):
            return None
        feed[spec.name] = np.zeros(tuple(1 if d is None else d for d in spec.shape), dtype=np.dtype(spec.dtype))
    return feed


@dataclass(frozen=True)
class WarmUp:
    """What the warm-up found: ``error`` ("" when it ran) and the signature to serve with.

    ``version`` is the one given, except that outputs declared ``[N, ...]``
    which did not follow the one-row sample lose that claim: the model's jobs
    then run one per session run and get those outputs whole (an output shape
    check at load, so a lying signature never slices a batch wrongly).
    """

    error: str
    version: ModelVersion


async def warm_up(session: ModelSession, version: ModelVersion, timeout_s: float = WARMUP_TIMEOUT_S) -> WarmUp:
    """Run the sample once, and check the outputs' batch dim against the signature."""
    feed = sample_feed(version)
    if feed is None:
        reason = "no sample can be built from the signature (an input of unknown rank or dtype)"
        log.warning("model %s:%s not warmed up: %s", version.model, version.version, reason)
        return WarmUp(reason, version)
    started = time.perf_counter()
    try:
        outputs = await session.run(feed, None, timeout_s)
    except InferenceError as exc:
        log.warning("model %s:%s warm-up inference failed (serving pinned jobs anyway): %s", version.model, version.version, exc)
        return WarmUp(f"warm-up inference failed: {exc}", version)
    log.info("model %s:%s warmed up in %.1f ms", version.model, version.version, (time.perf_counter() - started) * 1000)
    breaking = batch_breaking_outputs(version, outputs)
    if breaking:
        log.warning("model %s:%s declares output(s) %s batched ([N, ...]) but a one-row run gave %s: its jobs will run "
                    "one at a time", version.model, version.version, breaking,
                    {name: list(np.shape(outputs[name])) for name in breaking})
        return WarmUp("", unbatched(version, breaking))
    return WarmUp("", version)
