"""Data sharding: a large job split by the edge into chunk sub-jobs along the batch dimension, and put back together.

A sharded job ``P`` is recorded with ``chunks = n`` on its queued event; its chunks are
ordinary jobs ``P.c00000`` ... that any worker of the version takes. The parent's
state is derived on read from its chunks' states in the projection (every edge reads
the same ledger, so every edge derives the same answer): ``progress`` counts finished
chunks, the parent succeeds with the chunks' outputs concatenated in order once all
succeeded, and fails with the first failed chunk's reason.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Mapping

import numpy as np

from inferq.broker.codec import decode_tensor_map, encode_tensor
from inferq.broker.messages import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, TERMINAL, error_dict
from inferq.edge.projection import JobState, chunk_id
from inferq.errors import InvalidInput

MAX_CHUNKS = 4096


def chunk_count(rows: int, max_batch: int, asked: int | None) -> int:
    """How many chunks a job of ``rows`` becomes: ``asked`` (``?shard=N``), else enough to fit ``max_batch`` (1: none)."""
    if asked is not None:
        if not 1 <= asked <= min(rows, MAX_CHUNKS):
            raise InvalidInput(f"shard must be between 1 and {min(rows, MAX_CHUNKS)} (the job has {rows} rows)")
        return asked
    if max_batch <= 0 or rows <= max_batch:
        return 1
    count = -(-rows // max_batch)
    if count > MAX_CHUNKS:
        raise InvalidInput(f"{rows} rows would make {count} chunks of {max_batch}; at most {MAX_CHUNKS} (ask ?shard=N)")
    return count


def batch_rows(inputs: Mapping[str, np.ndarray]) -> int:
    """The batch dimension every input shares; InvalidInput when they disagree or one is a scalar."""
    rows = {name: value.shape[0] if value.ndim else None for name, value in inputs.items()}
    sizes = set(rows.values())
    if None in sizes or len(sizes) != 1:
        raise InvalidInput(f"a sharded job's inputs must share their first (batch) dimension, got {rows}")
    return sizes.pop()  # type: ignore[return-value]


def split_inputs(inputs: Mapping[str, np.ndarray], count: int) -> list[dict[str, np.ndarray]]:
    """``count`` chunks along the batch dimension, in order, as equal as possible."""
    parts = {name: np.array_split(value, count, axis=0) for name, value in inputs.items()}
    return [{name: np.ascontiguousarray(parts[name][i]) for name in inputs} for i in range(count)]


async def derive(parent: JobState, lookup: Callable[[str], JobState | None],
                 read: Callable[[JobState], Awaitable[Mapping[str, object] | None]]) -> JobState:
    """The parent's state as its chunks make it; a parent that ended on its own (cancelled, expired) stays so.

    ``read`` gives a chunk's outputs (those an edge holds out of memory are read back from the ledger).
    """
    if not parent.chunks or parent.terminal and (parent.status != SUCCEEDED or parent.outputs is not None):
        return parent
    chunks = [lookup(chunk_id(parent.job_id, i)) for i in range(parent.chunks)]
    done = [c for c in chunks if c is not None and c.status in TERMINAL]
    view = dataclasses.replace(parent, progress={"done": len(done), "total": parent.chunks},
                               attempts=max([parent.attempts] + [c.attempts for c in chunks if c is not None]))
    failed = next(((i, c) for i, c in enumerate(chunks) if c is not None and c.status in TERMINAL and c.status != SUCCEEDED), None)
    if failed is not None:
        i, chunk = failed
        reason = chunk.error or error_dict(str(chunk.status), f"chunk {i} ended {chunk.status}")
        view.status = CANCELLED if chunk.status == CANCELLED else FAILED
        view.error = error_dict(reason["code"], f"chunk {i} of {parent.chunks}: {reason['message']}")
        view.finished_at = chunk.finished_at
    elif len(done) == parent.chunks:
        view.status, view.finished_at = SUCCEEDED, max(c.finished_at or 0 for c in done) or None
        view.outputs = concatenated([await read(c) or {} for c in chunks])  # type: ignore[arg-type]
        parent.status, parent.outputs, parent.finished_at = view.status, view.outputs, view.finished_at  # computed once
        parent.progress = view.progress
    elif any(c is not None and c.status != QUEUED for c in chunks):
        view.status = RUNNING
        view.started_at = min((c.started_at for c in chunks if c is not None and c.started_at), default=None)
    return view


def concatenated(outputs: list[Mapping[str, object]]) -> dict[str, object]:
    """The chunks' wire outputs joined along the batch dimension, in chunk order (wire form again)."""
    decoded = [decode_tensor_map(o, what="chunk outputs") for o in outputs]
    return {name: encode_tensor(np.concatenate([d[name] for d in decoded], axis=0)) for name in decoded[0]}
