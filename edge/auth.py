"""API keys, tenants and per-tenant rate limits for the HTTP edge.

A bearer token maps to a tenant, from the keys file (``edge.api_keys_file``,
TOML) or from etcd (``/<ns>/apikeys/<sha256 of the token>``, written by
``inferq apikey create``). Only hashes are stored in etcd. Jobs belong to the
tenant that submitted them; other tenants get 404 for them. Submissions are
rate limited per tenant with a token bucket (per edge replica).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import time
import tomllib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from edge.errors import error_response
from runtime.coordination import keys, translated
from runtime.errors import ConfigError, CoordinationError

PUBLIC_PATHS = ("/v2/health/live", "/v2/health/ready")
CACHE_S = 30.0


def token_hash(token: str) -> str:
    """What is stored for a token: its SHA-256, hex."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """Who a token belongs to and how fast it may submit (0 = no limit)."""

    tenant: str
    rate_per_s: float = 0.0
    burst: int = 0


class TokenBucket:
    """``rate`` tokens a second up to ``burst``; :meth:`take` returns seconds to wait (0 when allowed)."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, max(burst, 1)
        self.tokens, self.updated = float(self.burst), time.monotonic()

    def take(self) -> float:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


def load_keys_file(path: str) -> dict[str, Principal]:
    """``[[keys]]`` tables with ``tenant`` and ``key`` (or ``key_sha256``), optional ``rate_per_s``, ``burst``."""
    if not path:
        return {}
    try:
        raw = tomllib.loads(Path(path).read_text())
        entries = raw.get("keys", [])
        return {
            e.get("key_sha256") or token_hash(e["key"]): Principal(e["tenant"], float(e.get("rate_per_s", 0)), int(e.get("burst", 0)))
            for e in entries
        }
    except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"bad API keys file {path}: {exc!r}") from exc


class Authenticator:
    """Resolves bearer tokens to principals (file first, then etcd, cached) and meters submissions."""

    def __init__(self, enabled: bool, file_keys: dict[str, Principal], etcd: Any, namespace: str, timeout_s: float,
                 default_rate: float = 0.0, default_burst: int = 0) -> None:
        self.enabled = enabled
        self._file_keys = file_keys
        self._etcd = etcd
        self._prefix = f"{keys(namespace).root}/apikeys/"
        self._timeout = timeout_s
        self._cache: dict[str, tuple[float, Principal | None]] = {}
        self._buckets: dict[str, TokenBucket] = {}
        self._anonymous = Principal("", default_rate, default_burst)

    async def principal(self, request: web.Request) -> Principal | None:
        """The caller, or None if auth is on and the token is missing or unknown."""
        if not self.enabled:
            return self._anonymous
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return await self._lookup(token_hash(token.strip()))

    async def _lookup(self, digest: str) -> Principal | None:
        if digest in self._file_keys:
            return self._file_keys[digest]
        cached = self._cache.get(digest)
        if cached and cached[0] > time.monotonic():
            return cached[1]
        async with translated("looking up an API key"):
            kv = await asyncio.wait_for(self._etcd.get((self._prefix + digest).encode()), self._timeout)
        principal = _principal(kv.value) if kv else None
        self._cache[digest] = (time.monotonic() + (CACHE_S if principal else 2.0), principal)
        return principal

    def admit(self, principal: Principal) -> float:
        """Seconds the caller must wait before submitting again (0: go ahead)."""
        if principal.rate_per_s <= 0:
            return 0.0
        bucket = self._buckets.get(principal.tenant)
        if bucket is None or (bucket.rate, bucket.burst) != (principal.rate_per_s, max(principal.burst, 1)):
            bucket = self._buckets[principal.tenant] = TokenBucket(principal.rate_per_s, principal.burst or math.ceil(principal.rate_per_s))
        return bucket.take()

    def middleware(self) -> Callable[..., Awaitable[web.StreamResponse]]:
        """aiohttp middleware: 401 without a valid token, 429 over the rate; sets ``request["tenant"]``."""

        @web.middleware
        async def authenticate(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
            if request.path in PUBLIC_PATHS:
                return await handler(request)
            try:
                principal = await self.principal(request)
            except CoordinationError as exc:
                return error_response(503, exc.code, str(exc), {"Retry-After": "1"})
            if principal is None:
                return error_response(401, "unauthorized", "a valid API key is required: Authorization: Bearer <key>",
                                      {"WWW-Authenticate": 'Bearer realm="inferq"'})
            request["tenant"] = principal.tenant or None
            if request.method == "POST":
                wait = self.admit(principal)
                if wait > 0:
                    return error_response(429, "rate_limited", f"tenant {principal.tenant or 'default'} is over its submission rate",
                                          {"Retry-After": str(max(1, math.ceil(wait)))})
            return await handler(request)

        return authenticate


def _principal(raw: bytes) -> Principal | None:
    try:
        doc = json.loads(raw)
        return Principal(str(doc["tenant"]), float(doc.get("rate_per_s", 0)), int(doc.get("burst", 0)))
    except (ValueError, KeyError, TypeError):
        return None


async def create_key(etcd: Any, namespace: str, tenant: str, rate_per_s: float, burst: int, timeout_s: float) -> str:
    """Make a new API key for ``tenant``; only its hash is stored. Returns the key (shown once)."""
    import secrets

    token = "iq_" + secrets.token_urlsafe(32)
    doc = {"tenant": tenant, "rate_per_s": rate_per_s, "burst": burst, "created_at": time.time()}
    async with translated("storing an API key"):
        await asyncio.wait_for(etcd.put(f"{keys(namespace).root}/apikeys/{token_hash(token)}".encode(), json.dumps(doc).encode()), timeout_s)
    return token
