"""Model records in etcd (``/<ns>/models/<model>``), so an edge needs no model files.

Written only by the registry (:mod:`inferq.runtime.registry`: ``inferq models sync``,
``push``, ``alias`` ...); read by edges to validate and route requests before they
are queued, by the autoscaler, and by workers to find their version's files.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aetcd

from inferq.runtime.coordination import get_records, keys, translated
from inferq.runtime.records import ModelRecord
from inferq.runtime.repository import ModelConfig


def config_fields(config: ModelConfig) -> dict[str, Any]:
    """The fields of a ModelRecord that come from the model's config (batching, providers, scaling, the whole config)."""
    return {
        "max_batch_size": config.batching.max_batch_size,
        "max_queue_delay_ms": config.batching.max_queue_delay_ms,
        "allow_nan": config.allow_nan,
        "providers": tuple(config.providers),
        "require_providers": tuple(config.require_providers),
        "require": dict(config.require),
        "scaling": dict(config.scaling),
        "config": json.loads(json.dumps(config.to_dict())),  # as etcd will give it back: lists, not tuples
    }


async def read_models(client: aetcd.Client, namespace: str, timeout: float) -> dict[str, ModelRecord]:
    """Every model record (malformed ones are skipped with a warning)."""
    return await get_records(client, keys(namespace).models, ModelRecord.from_json, timeout)


async def read_model(client: aetcd.Client, namespace: str, name: str, timeout: float) -> tuple[ModelRecord | None, int]:
    """One model record and its mod revision (0 when absent): what a compare-and-swap compares against."""
    async with translated(f"reading model {name}"):
        kv = await asyncio.wait_for(client.get(keys(namespace).model(name).encode()), timeout)
    if kv is None:
        return None, 0
    return ModelRecord.from_json(kv.value), kv.mod_revision
