"""API keys, tenants and per-tenant rate limits for the HTTP edge.

A bearer token maps to a tenant, from the keys file (``edge.api_keys_file``,
TOML) or from etcd (``/<ns>/apikeys/<sha256 of the token>``, written by
``inferq apikey create``). Only hashes are stored in etcd. Jobs belong to the
tenant that submitted them; other tenants get 404 for them. Submissions are
rate limited per tenant with a token bucket (per edge replica). A key has a
role, ``user`` (the default), ``node`` or ``admin``; only admins may load and
unload models and change the registry, and only nodes and admins may download
model artifacts. With auth off every caller is an admin, as everything is open then.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import json
import math
import time
import sys
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

from inferq.edge.errors import respond_error
from inferq.runtime.coordination import keys, translated
from inferq.errors import ConfigError, CoordinationError, Forbidden, InvalidInput

# The agent routes authenticate with a join token of their own, or hold nothing secret (edge/agent_api.py).
# The status page's static files are public (the page then asks for a key); its data routes are not.
PUBLIC_PATHS = ("/v2/health/live", "/v2/health/ready", "/v1/agent/join", "/v1/agent/install.sh", "/v1/agent/inferq.whl",
                "/ui", "/ui/", "/ui/app.js", "/ui/app.css")
CACHE_S = 30.0
ROLES = ("user", "admin", "node")
CACHE_MAX = 10_000  # entries (tokens seen, valid or not): random tokens cannot grow memory without bound


def token_hash(token: str) -> str:
    """What is stored for a token: its SHA-256, hex."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """Who a token belongs to, how fast it may submit (0 = no limit) and its role."""

    tenant: str
    rate_per_s: float = 0.0
    burst: int = 0
    role: str = "user"
    max_priority: str = "high"  # "normal": this tenant's jobs never go ahead of bulk work

    def require_admin(self, what: str) -> None:
        """Raise Forbidden unless this caller has the admin role."""
        self.require_role(what, "admin")

    def require_role(self, what: str, *roles: str) -> None:
        """Raise Forbidden unless this caller has one of ``roles``."""
        if self.role not in roles:
            wanted = " or ".join(roles)
            raise Forbidden(f"{what} needs an API key with the {wanted} role (inferq apikey create --role {roles[0]})")


def check_role(role: str) -> str:
    """``role`` if it is one of ROLES, else ConfigError."""
    if role not in ROLES:
        raise ConfigError(f"API key role must be one of {list(ROLES)}, not {role!r}")
    return role


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
    """``[[keys]]`` tables with ``tenant`` and ``key`` (or ``key_sha256``), optional ``rate_per_s``, ``burst``, ``role``."""
    if not path:
        return {}
    try:
        raw = tomllib.loads(Path(path).read_text())
        entries = raw.get("keys", [])
        return {
            e.get("key_sha256") or token_hash(e["key"]): Principal(
                e["tenant"], float(e.get("rate_per_s", 0)), int(e.get("burst", 0)), check_role(e.get("role", "user")))
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
        self._prefix = keys(namespace).apikeys
        self._timeout = timeout_s
        self._cache: OrderedDict[str, tuple[float, Principal | None]] = OrderedDict()  # least recently used first
        self.cache_max = CACHE_MAX
        self._buckets: dict[str, TokenBucket] = {}
        self._anonymous = Principal("", default_rate, default_burst, role="admin")

    async def principal(self, request: web.Request) -> Principal | None:
        """The caller, or None if auth is on and the token is missing or unknown."""
        return await self.authenticate(request.headers.get("Authorization", ""))

    async def authenticate(self, header: str) -> Principal | None:
        """The caller of an ``Authorization`` header value (HTTP or gRPC metadata), None if not valid."""
        if not self.enabled:
            return self._anonymous
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return await self._lookup(token_hash(token.strip()))

    def forget(self, digest: str | None) -> None:
        """Drop a cached key that changed in etcd (revoked, rotated); None drops them all (the watch had a gap)."""
        if digest is None:
            self._cache.clear()
        else:
            self._cache.pop(digest, None)

    async def _lookup(self, digest: str) -> Principal | None:
        if digest in self._file_keys:
            return self._file_keys[digest]
        cached = self._cache.get(digest)
        if cached and cached[0] > time.monotonic():
            self._cache.move_to_end(digest)
            return cached[1]
        async with translated("looking up an API key"):
            kv = await asyncio.wait_for(self._etcd.get((self._prefix + digest).encode()), self._timeout)
        principal = _principal(kv.value) if kv else None
        self._cache[digest] = (time.monotonic() + (CACHE_S if principal else 2.0), principal)
        self._cache.move_to_end(digest)
        while len(self._cache) > self.cache_max:
            self._cache.popitem(last=False)
        return principal

    @property
    def cached(self) -> int:
        """How many tokens the cache holds now."""
        return len(self._cache)

    def admit(self, principal: Principal) -> float:
        """Seconds the caller must wait before submitting again (0: go ahead)."""
        if principal.rate_per_s <= 0:
            return 0.0
        bucket = self._buckets.get(principal.tenant)
        if bucket is None or (bucket.rate, bucket.burst) != (principal.rate_per_s, max(principal.burst, 1)):
            bucket = self._buckets[principal.tenant] = TokenBucket(principal.rate_per_s, principal.burst or math.ceil(principal.rate_per_s))
        return bucket.take()

    def middleware(self) -> Callable[..., Awaitable[web.StreamResponse]]:
        """aiohttp middleware: 401 without a valid token, 429 over the rate; sets ``request["tenant"]`` and ``["principal"]``."""

        @web.middleware
        async def authenticate(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
            if request.path in PUBLIC_PATHS:
                return await handler(request)
            try:
                principal = await self.principal(request)
            except CoordinationError as exc:
                return respond_error(request, 503, exc.code, str(exc), {"Retry-After": "1"})
            if principal is None:
                return respond_error(request, 401, "unauthorized", UNAUTHORIZED, {"WWW-Authenticate": 'Bearer realm="inferq"'})
            request["tenant"] = principal.tenant or None
            request["principal"] = principal
            if request.method == "POST":
                wait = self.admit(principal)
                if wait > 0:
                    return respond_error(request, 429, "rate_limited", over_rate(principal), {"Retry-After": str(max(1, math.ceil(wait)))})
            return await handler(request)

        return authenticate


UNAUTHORIZED = "a valid API key is required: Authorization: Bearer <key>"


def over_rate(principal: Principal) -> str:
    """Why a submission over the caller's rate is refused."""
    return f"tenant {principal.tenant or 'default'} is over its submission rate"


PRIORITIES = ("normal", "high")


def priority_for(principal: Principal | None, asked: object, default: str) -> str:
    """The priority class of a submission: what it asked for (or ``default``), within its tenant's allowance."""
    if asked is not None and asked not in PRIORITIES:
        raise InvalidInput(f"priority must be one of {list(PRIORITIES)}, got {asked!r}")
    allowed = principal.max_priority if principal is not None else "high"
    if asked == "high" and allowed != "high":
        raise Forbidden(f"tenant {principal.tenant or 'default'} may submit normal-priority jobs only")
    return asked if asked is not None else (default if allowed == "high" else "normal")


def _principal(raw: bytes) -> Principal | None:
    try:
        doc = json.loads(raw)
        role = doc.get("role", "user")
        if role not in ROLES:
            return None  # a record we cannot read grants nothing
        max_priority = doc.get("max_priority", "high")
        if max_priority not in PRIORITIES:
            return None
        return Principal(str(doc["tenant"]), float(doc.get("rate_per_s", 0)), int(doc.get("burst", 0)), role, max_priority)
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


async def create_key(etcd: Any, namespace: str, tenant: str, rate_per_s: float, burst: int, timeout_s: float,
                     role: str = "user", max_priority: str = "high") -> str:
    """Make a new API key for ``tenant`` with ``role``; only its hash is stored. Returns the key (shown once)."""
    if max_priority not in PRIORITIES:
        raise ConfigError(f"max_priority must be one of {list(PRIORITIES)}")
    token = "iq_" + secrets.token_urlsafe(32)
    doc = {"tenant": tenant, "rate_per_s": rate_per_s, "burst": burst, "role": check_role(role),
           "max_priority": max_priority, "created_at": time.time()}
    async with translated("storing an API key"):
        await asyncio.wait_for(etcd.put(f"{keys(namespace).apikeys}{token_hash(token)}".encode(), json.dumps(doc).encode()), timeout_s)
    return token


async def tenant_keys(etcd: Any, namespace: str, timeout_s: float) -> dict[str, Principal]:
    """Every API key in etcd: its SHA-256 -> principal (unreadable records are left out)."""
    prefix = keys(namespace).apikeys
    async with translated("listing API keys"):
        found = await asyncio.wait_for(etcd.get_prefix(prefix.encode()), timeout_s)
    principals = {kv.key.decode()[len(prefix):]: _principal(kv.value) for kv in found}
    return {digest: p for digest, p in principals.items() if p is not None}


async def revoke_keys(etcd: Any, namespace: str, digests: list[str], timeout_s: float) -> None:
    """Delete these API keys from etcd; edges stop accepting them at once (they follow the prefix)."""
    prefix = keys(namespace).apikeys
    async with translated("revoking API keys"):
        for digest in digests:
            await asyncio.wait_for(etcd.delete((prefix + digest).encode()), timeout_s)
