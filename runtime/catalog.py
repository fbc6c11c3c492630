"""Model metadata in etcd (``/<ns>/models/<model>``), so an edge needs no model files.

Written when a repository is loaded (``inferq models sync``, ``inferq up``);
read by edges to validate requests before they are queued.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aetcd

from runtime.coordination import get_json_prefix, keys, translated
from runtime.repository import ModelEntry, TensorSpec


def model_record(entry: ModelEntry) -> dict[str, Any]:
    """The JSON record of a model: versions with signatures, default version, batching."""
    return {
        "name": entry.name,
        "default_version": entry.default_version,
        "versions": {
            v: {"inputs": [s.to_dict() for s in mv.inputs], "outputs": [s.to_dict() for s in mv.outputs]}
            for v, mv in sorted(entry.versions.items(), key=lambda kv: int(kv[0]))
        },
        "batching": {"max_batch_size": entry.config.batching.max_batch_size, "max_queue_delay_ms": entry.config.batching.max_queue_delay_ms},
        "allow_nan": entry.config.allow_nan,
        "providers": list(entry.config.providers),
        "require_providers": list(entry.config.require_providers),
        "scaling": dict(entry.config.scaling),
    }


async def publish_models(client: aetcd.Client, namespace: str, entries: dict[str, ModelEntry], timeout: float) -> None:
    """Write (or overwrite) the records of ``entries``."""
    k = keys(namespace)
    for entry in entries.values():
        async with translated(f"writing model {entry.name}"):
            await asyncio.wait_for(client.put(k.model(entry.name).encode(), json.dumps(model_record(entry)).encode()), timeout)


async def read_models(client: aetcd.Client, namespace: str, timeout: float) -> dict[str, dict[str, Any]]:
    """Every model record."""
    return await get_json_prefix(client, keys(namespace).models, timeout)


def signature(record: dict[str, Any], version: str) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs of one version of a model record."""
    v = record["versions"][version]
    return [TensorSpec.from_dict(d) for d in v["inputs"]], [TensorSpec.from_dict(d) for d in v["outputs"]]
