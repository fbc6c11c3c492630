"""Agent join tokens: what an admin hands to a new edge node, and what the node gets for it.

A token reads ``IQJ1.<payload>.<secret>``, k3s-style: the payload (base64url JSON)
carries the edge's URL and, when the edge is reached over TLS, the SHA-256 of its
certificate, so the joining agent can pin it before it sends the secret. etcd keeps
only the SHA-256 of the secret, at ``/<ns>/jointokens/<hash>``, with the token's
expiry and node-name prefix (:class:`JoinTokenRecord`). ``POST /v1/agent/join``
exchanges a valid token for the node's configuration (:class:`AgentConfig`),
including per-node credentials that ``inferq agent revoke NODE`` takes back
(:class:`AgentRecord`): an API key of role ``node`` (model fetch) and, when the
edge can reach RabbitMQ's management API, a broker user of the node's own
(``<ns>.node.<node>``, see :mod:`inferq.edge.node_users`) in the broker URLs.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import hashlib
import json
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

from inferq.errors import CodecError, ConfigError, Unauthorized
from inferq.runtime.coordination import keys, translated
from inferq.runtime.records import build, load_json

PREFIX = "IQJ1"
NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """Seconds of ``30s``, ``15m``, ``24h``, ``7d``; ConfigError otherwise."""
    match = DURATION.match(text.strip())
    if not match:
        raise ConfigError(f"{text!r} is not a duration like 30s, 15m, 24h or 7d")
    return float(match.group(1)) * UNITS[match.group(2)]


def check_node_name(name: str) -> str:
    """``name`` if it can name a node (it ends up in etcd keys and routing keys), else ConfigError."""
    if not NODE_NAME.match(name):
        raise ConfigError(f"node name {name!r} must be 1-63 letters, digits, '.', '_' or '-'")
    return name


def secret_hash(secret: str) -> str:
    """What etcd keeps of a token: the SHA-256 of its secret, hex."""
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class JoinToken:
    """A parsed join token: where the edge is, its certificate's SHA-256 (TLS only) and the secret."""

    url: str
    secret: str
    cert_sha256: str = ""

    def encode(self) -> str:
        payload = json.dumps({"u": self.url, "c": self.cert_sha256}, separators=(",", ":")).encode()
        return f"{PREFIX}.{base64.urlsafe_b64encode(payload).decode().rstrip('=')}.{self.secret}"

    @classmethod
    def parse(cls, text: str) -> JoinToken:
        """The token of ``text``; Unauthorized (a clear message) when it is not one."""
        parts = text.strip().split(".")
        if len(parts) != 3 or parts[0] != PREFIX or not parts[2]:
            raise Unauthorized("this is not an inferq join token (IQJ1.<payload>.<secret>); create one with "
                               "`inferq agent token create`")
        try:
            payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
            return cls(str(payload["u"]), parts[2], str(payload.get("c", "")))
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            raise Unauthorized(f"the join token's payload is unreadable ({exc})") from exc

    @property
    def id(self) -> str:
        """A short public name of the token (to revoke it): the first 12 hex digits of its hash."""
        return secret_hash(self.secret)[:12]


@dataclass(frozen=True)
class JoinTokenRecord:
    """What etcd keeps of a join token."""

    created_at: float
    expires_at: float
    node_name_prefix: str = ""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str) -> JoinTokenRecord:
        return build(cls, load_json(raw, "join token record"), "join token record")


@dataclass(frozen=True)
class AgentRecord:
    """A node that joined: the hash of its API key (role ``node``), its broker user ("": shared), when it joined."""

    node: str
    key_sha256: str
    joined_at: float
    token_id: str = ""
    broker_user: str = ""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str) -> AgentRecord:
        return build(cls, load_json(raw, "agent record"), "agent record")


@dataclass(frozen=True)
class AgentConfig:
    """The answer to a join: everything a node needs to take part, and its own credential (shown once)."""

    node: str
    namespace: str
    broker_urls: tuple[str, ...]
    etcd_endpoints: tuple[str, ...]
    artifacts_url: str
    api_key: str
    etcd_username: str = ""
    etcd_password: str = ""
    broker_replicas: int = 0
    lease_ttl_s: int = 10
    jobs_ttl_s: float = 3600.0  # namespace-wide: queues and streams are declared with it
    broker_user: str = ""  # the node's own broker user, in broker_urls; "": the shared credentials of the cluster
    service_user: str = ""  # the cluster's service user: its jobs are inferq's own (tenancy.service_user)
    warnings: tuple[str, ...] = ()

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str) -> AgentConfig:
        return build(cls, load_json(raw, "join answer"), "join answer", broker_urls=tuple, etcd_endpoints=tuple,
                     warnings=tuple)

    def settings_doc(self) -> dict[str, Any]:
        """The settings sections (as in ``agent.toml``) that this answer sets."""
        return {
            "namespace": self.namespace, "node": self.node,
            "broker": {"urls": list(self.broker_urls), "url": self.broker_urls[0], "replicas": self.broker_replicas},
            "etcd": {"endpoints": list(self.etcd_endpoints), "username": self.etcd_username,
                     "password": self.etcd_password, "lease_ttl_s": self.lease_ttl_s},
            "registry": {"artifacts_url": self.artifacts_url, "api_key": self.api_key},
            "jobs": {"ttl_s": self.jobs_ttl_s},
            "tenancy": {"service_user": self.service_user},
        }


async def create_token(etcd: Any, namespace: str, url: str, ttl_s: float, node_name_prefix: str = "",
                       cert_sha256: str = "", timeout_s: float = 5.0) -> JoinToken:
    """A new join token for the edge at ``url``, valid ``ttl_s``; only its hash is stored. Returned once."""
    if node_name_prefix:
        check_node_name(node_name_prefix)
    if ttl_s <= 0:
        raise ConfigError("a join token's ttl must be positive")
    token = JoinToken(url.rstrip("/"), secrets.token_urlsafe(32), cert_sha256.lower().replace(":", ""))
    now = time.time()
    record = JoinTokenRecord(now, now + ttl_s, node_name_prefix)
    async with translated("storing a join token"):
        await asyncio.wait_for(etcd.put((keys(namespace).jointokens + secret_hash(token.secret)).encode(),
                                        record.to_json().encode()), timeout_s)
    return token


async def check_token(etcd: Any, namespace: str, secret: str, timeout_s: float = 5.0) -> JoinTokenRecord:
    """The record of a valid token's secret; Unauthorized when it is unknown, revoked or expired."""
    async with translated("looking up a join token"):
        kv = await asyncio.wait_for(etcd.get((keys(namespace).jointokens + secret_hash(secret)).encode()), timeout_s)
    if kv is None:
        raise Unauthorized("unknown or revoked join token: ask an admin for a new one (inferq agent token create)")
    try:
        record = JoinTokenRecord.from_json(kv.value)
    except CodecError as exc:
        raise Unauthorized(f"the join token's record is unreadable ({exc}); create a new token") from exc
    if record.expires_at <= time.time():
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(record.expires_at))
        raise Unauthorized(f"the join token expired at {when}: ask an admin for a new one (inferq agent token create)")
    return record


async def revoke_token(etcd: Any, namespace: str, token_id: str, timeout_s: float = 5.0) -> int:
    """Delete every join token whose hash starts with ``token_id`` (at least 8 hex digits); how many went."""
    if len(token_id) < 8:
        raise ConfigError("give at least 8 hex digits of the token id (printed by `inferq agent token create`)")
    prefix = keys(namespace).jointokens
    async with translated("revoking a join token"):
        found = await asyncio.wait_for(etcd.get_prefix((prefix + token_id.lower()).encode()), timeout_s)
        for kv in found:
            await asyncio.wait_for(etcd.delete(kv.key), timeout_s)
    return len(found)
