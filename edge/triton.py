"""The documents of the v2 protocol and its Triton extensions, built from what the edge knows.

Pure functions (no I/O) from model records (etcd's ``/<ns>/models/<model>``), worker
membership records and statistics counters to the JSON shapes Triton answers over HTTP.
The gRPC endpoint parses the same dicts into its protobuf messages, so both transports say
the same thing.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

from inferq.edge.stats import Duration, VersionStats
from inferq.edge.v2 import to_datatype
from inferq.runtime.records import ModelRecord, WorkerRecord
from inferq.runtime.repository import TensorSpec
from inferq.runtime.signature import is_batchable

PLATFORM = "onnxruntime_onnx"
# Shared memory, classification, sequences and tracing are not offered: see README, "Triton clients".
EXTENSIONS = ("binary_tensor_data", "model_configuration", "model_repository", "statistics")
READY, UNAVAILABLE = "READY", "UNAVAILABLE"
_GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def server_version() -> str:
    """The installed inferq version."""
    try:
        return metadata.version("inferq")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def server_metadata() -> dict[str, Any]:
    """``GET /v2``: name, version and the extensions this server supports."""
    return {"name": "inferq", "version": server_version(), "extensions": list(EXTENSIONS)}


def model_metadata(record: ModelRecord, version: str) -> dict[str, Any]:
    """``GET /v2/models/{m}[/versions/{v}]``: the signature of one version."""
    signature = record.signature(version)
    inputs, outputs = signature.inputs, signature.outputs
    return {
        "name": record.name, "versions": list(record.versions), "platform": PLATFORM,
        "inputs": [_tensor_metadata(s) for s in inputs], "outputs": [_tensor_metadata(s) for s in outputs],
    }


def model_config(record: ModelRecord, version: str, workers: list[WorkerRecord]) -> dict[str, Any]:
    """``GET /v2/models/{m}[/versions/{v}]/config``: a Triton model configuration.

    Models whose inputs and outputs all have a dynamic first dim batch on it: ``max_batch_size`` is
    ``config.toml``'s and ``dims`` leave that dim out, as Triton's do. ``instance_group``
    counts this version's live workers (at least one: the autoscaler starts one on demand).
    """
    signature = record.signature(version)
    inputs, outputs = signature.inputs, signature.outputs
    batched = bool(inputs) and is_batchable(signature)
    max_batch = record.max_batch_size if batched else 0
    mine = [w for w in workers if w.model == record.name and w.version == version]
    gpu = any(p in _GPU_PROVIDERS for w in mine for p in w.providers)
    config: dict[str, Any] = {
        "name": record.name,
        "platform": PLATFORM,
        "backend": "onnxruntime",
        "version_policy": {"all": {}},  # every version is servable by number; the highest is the default
        "max_batch_size": max_batch,
        "input": [_tensor_config(s, batched) for s in inputs],
        "output": [_tensor_config(s, batched) for s in outputs],
        "instance_group": [{"name": f"{record.name}_0", "kind": "KIND_GPU" if gpu else "KIND_CPU",
                            "count": max(1, len(mine))}],
        "default_model_filename": "model.onnx",
    }
    if max_batch > 1:
        delay_us = round(record.max_queue_delay_ms * 1000)
        config["dynamic_batching"] = {"max_queue_delay_microseconds": delay_us}
    return config


def index_entry(name: str, version: str, unloaded: bool) -> dict[str, str]:
    """One model version of ``POST /v2/repository/index``."""
    if unloaded:
        return {"name": name, "version": version, "state": UNAVAILABLE,
                "reason": "unloaded: its workers are drained and inference is refused until it is loaded again"}
    return {"name": name, "version": version, "state": READY, "reason": ""}


def model_statistics(name: str, version: str, stats: VersionStats) -> dict[str, Any]:
    """One entry of ``GET /v2/models/stats``, in Triton's shape (durations in ns).

    compute_input and compute_output are not measured apart from compute_infer (the
    worker's run includes them): they carry the success count and 0 ns.
    """
    around = {"count": stats.success.count, "ns": 0}
    return {
        "name": name,
        "version": version,
        "last_inference": stats.last_inference_ms,
        "inference_count": stats.success.count,
        "execution_count": round(stats.executions),
        "inference_stats": {
            "success": _duration(stats.success), "fail": _duration(stats.fail), "queue": _duration(stats.queue),
            "compute_input": around, "compute_infer": _duration(stats.compute_infer), "compute_output": around,
            "cache_hit": {"count": 0, "ns": 0}, "cache_miss": {"count": 0, "ns": 0},
        },
        "batch_stats": [
            {"batch_size": size, "compute_input": _zero(c.executions(size)),
             "compute_infer": {"count": c.executions(size), "ns": c.execution_ns(size)},
             "compute_output": _zero(c.executions(size))}
            for size, c in sorted(stats.batches.items())
        ],
        "memory_usage": [],
    }


def _duration(duration: Duration) -> dict[str, int]:
    return {"count": duration.count, "ns": duration.ns}


def _zero(count: int) -> dict[str, int]:
    return {"count": count, "ns": 0}


def _tensor_metadata(spec: TensorSpec) -> dict[str, Any]:
    shape = [-1] if spec.shape is None else [-1 if d is None else d for d in spec.shape]
    return {"name": spec.name, "datatype": to_datatype(spec.dtype), "shape": shape}


def _tensor_config(spec: TensorSpec, batched: bool) -> dict[str, Any]:
    if spec.shape is None:
        dims: tuple[int | None, ...] = (-1,)
    else:
        dims = spec.shape[1:] if batched and spec.shape and spec.shape[0] is None else spec.shape
    return {"name": spec.name, "data_type": "TYPE_" + to_datatype(spec.dtype), "dims": [-1 if d is None else d for d in dims]}
