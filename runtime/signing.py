"""Tenants' webhook signing secrets in etcd (``/<ns>/webhooksecrets/<tenant>``).

``inferq tenant webhook-secret NAME`` makes (or shows) a tenant's secret,
``--rotate`` replaces it. During a rotation, ``ROTATION_S`` after it, the new
and the previous secret both sign each delivery (``webhook-signature`` then
holds two ``v1,`` signatures), so a receiver can switch at its own pace.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
from dataclasses import asdict, dataclass
from typing import Any

from inferq.runtime.coordination import keys, translated
from inferq.runtime.records import build, load_json

ROTATION_S = 24 * 3600.0  # the previous secret signs this long after a rotation
CACHE_S = 10.0  # a sender reads a tenant's secrets again after this long (a rotation shows within it)


def new_secret() -> str:
    """A fresh Standard Webhooks secret, ``whsec_`` and 32 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass(frozen=True)
class SecretRecord:
    """A tenant's current secret, and the previous one with when it was replaced."""

    current: str
    previous: str = ""
    rotated_at: float = 0.0

    def to_json(self) -> str:
        """The stored document."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str) -> SecretRecord:
        """Rebuild a record; CodecError if malformed."""
        return build(cls, load_json(raw, "webhook secret"), "webhook secret")

    def signing(self, now: float) -> list[str]:
        """The secrets that sign now: the current one, and the previous one during a rotation."""
        keep = self.previous and now < self.rotated_at + ROTATION_S
        return [self.current, self.previous] if keep else [self.current]


class TenantSecrets:
    """Reads (cached) and writes tenants' secrets."""

    def __init__(self, etcd: Any, namespace: str, timeout_s: float) -> None:
        self._etcd = etcd
        self._prefix = f"{keys(namespace).root}/webhooksecrets/"
        self._timeout = timeout_s
        self._cache: dict[str, tuple[float, SecretRecord | None]] = {}

    async def get(self, tenant: str) -> SecretRecord | None:
        """The tenant's record, or None if it has none (the deployment's ``webhooks.secret`` signs then)."""
        cached = self._cache.get(tenant)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        async with translated("reading a webhook secret"):
            kv = await asyncio.wait_for(self._etcd.get((self._prefix + tenant).encode()), self._timeout)
        record = SecretRecord.from_json(kv.value) if kv is not None else None
        self._cache[tenant] = (time.monotonic() + CACHE_S, record)
        return record

    async def ensure(self, tenant: str, rotate: bool = False) -> SecretRecord:
        """The tenant's record, made if it has none; with ``rotate`` a new current secret (the old one kept)."""
        key = (self._prefix + tenant).encode()
        async with translated("writing a webhook secret"):
            kv = await asyncio.wait_for(self._etcd.get(key), self._timeout)
            old = SecretRecord.from_json(kv.value) if kv is not None else None
            if old is not None and not rotate:
                return old
            record = SecretRecord(new_secret(), old.current if old else "", time.time() if old else 0.0)
            await asyncio.wait_for(self._etcd.put(key, record.to_json().encode()), self._timeout)
        self._cache.pop(tenant, None)
        return record
