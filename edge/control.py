"""Model control (Triton's load/unload) on top of the autoscaler's policy overrides.

"Loaded" means "the autoscaler keeps a worker for it":

* load writes ``min_workers >= 1`` into ``/<ns>/policies/<model>`` and lifts an unload;
* unload writes ``min_workers = max_workers = 0`` with no scale-down delay
  (``idle_before_zero_s = scale_down_stabilization_s = 0``): the autoscaler drains the
  model's workers at once and the edge refuses v2 inference for it until it is loaded again.

Other fields of the override are kept, except that a load after an unload drops the three
fields the unload wrote (back to the model's own scaling). Only an autoscaler that scales the
model acts on this. The model registry (:mod:`inferq.runtime.registry`) does not take this
over: it decides *which version* unpinned jobs reach, while Triton's load/unload decides
*whether workers run at all*, which is the autoscaler's policy; a load serves the versions the
registry routes to (``stable``, split targets), an unload drains them all.
"""

from __future__ import annotations

import asyncio
import math
import json
import logging
import time
from typing import Any

import aetcd

from inferq.errors import CoordinationError
from inferq.runtime.coordination import get_json_prefix, keys, translated

log = logging.getLogger("inferq.edge.control")

REFRESH_S = 1.0  # how stale another edge's unload may be seen here
# What an unload writes besides min_workers: no worker, and no waiting before draining.
_UNLOAD = {"max_workers": 0, "idle_before_zero_s": 0, "scale_down_stabilization_s": 0}


def loaded_policy(override: dict[str, Any] | None) -> dict[str, Any]:
    """The policy override that serves a model: at least one worker, no unload cap."""
    policy = dict(override or {})
    if is_unloaded(policy):
        for name in _UNLOAD:
            policy.pop(name, None)
    policy["min_workers"] = max(_int(policy.get("min_workers")), 1)
    if "max_workers" in policy and _int(policy["max_workers"]) < policy["min_workers"]:
        del policy["max_workers"]  # back to the model's own limit
    return policy


def unloaded_policy(override: dict[str, Any] | None) -> dict[str, Any]:
    """The policy override that drains a model now and keeps it at zero workers."""
    return dict(override or {}, min_workers=0, **_UNLOAD)


def is_unloaded(override: Any) -> bool:
    """Whether a policy override is an unload."""
    return isinstance(override, dict) and "max_workers" in override and _int(override["max_workers"], -1) == 0


def _int(value: Any, default: int = 0) -> int:
    """A whole number from an operator-written override, ``default`` for anything else (NaN, Infinity, "3", True)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value != int(value):
        return default
    return int(value)


class ModelControl:
    """Loads and unloads models through etcd; answers "is it unloaded?" from a cache refreshed each second."""

    def __init__(self, client: aetcd.Client, namespace: str, timeout_s: float) -> None:
        self._client = client
        self._keys = keys(namespace)
        self._timeout = timeout_s
        self._overrides: dict[str, Any] = {}
        self._read_at = -REFRESH_S
        self._lock = asyncio.Lock()

    async def load(self, model: str) -> None:
        """Ask the autoscaler to keep at least one worker of ``model``."""
        await self._rewrite(model, loaded_policy)

    async def unload(self, model: str) -> None:
        """Ask the autoscaler to drain ``model`` and keep it at zero."""
        await self._rewrite(model, unloaded_policy)

    async def unloaded(self, model: str) -> bool:
        """Whether ``model`` is unloaded (at most REFRESH_S stale)."""
        await self._refresh()
        return is_unloaded(self._overrides.get(model))

    async def _refresh(self) -> None:
        if time.monotonic() - self._read_at < REFRESH_S:
            return
        async with self._lock:
            if time.monotonic() - self._read_at < REFRESH_S:
                return
            try:
                self._overrides = await get_json_prefix(self._client, self._keys.policies, self._timeout)
            except CoordinationError as exc:
                # Inference must not stop because etcd hiccups: keep serving from the last view.
                log.warning("policy overrides not refreshed: %s", exc)
            self._read_at = time.monotonic()

    async def _rewrite(self, model: str, change: Any) -> None:
        key = self._keys.policy(model).encode()
        async with self._lock, translated(f"changing the policy of {model}"):
            kv = await asyncio.wait_for(self._client.get(key), self._timeout)
            current = _json(kv.value) if kv else None
            policy = change(current if isinstance(current, dict) else None)
            await asyncio.wait_for(self._client.put(key, json.dumps(policy).encode()), self._timeout)
            self._overrides[model] = policy


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None
