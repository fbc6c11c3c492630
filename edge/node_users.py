"""Edge nodes' own RabbitMQ users: made by the join, deleted by ``inferq agent revoke NODE``.

A node that joins gets a broker user ``<ns>.node.<node>``
(:func:`inferq.broker.identity.node_user_name`) with a fresh random password and the
service permissions of the namespace (it runs workers: model queues, the ledger, the
control exchange), made through the management API with ``tenancy.management_url``.
Joining again under the same name sets a new password: the old one stops opening
connections. Revoking deletes the user and closes its connections, so a revoked node
is cut off the broker at once, as it is from model fetch (its API key goes too).

What a node never gets of its own is an etcd identity: etcd auth is not on in inferq,
so a revoked node can still reach etcd at the endpoints it was given.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from inferq.broker.admin import BrokerAdmin, service_permissions
from inferq.broker.identity import broker_vhost, node_user_name
from inferq.edge.auth import revoke_keys
from inferq.errors import BrokerUnavailable, CodecError, ConfigError, InferqError
from inferq.runtime.coordination import keys, translated
from inferq.runtime.jointoken import AgentRecord
from inferq.settings import Settings, mask_url

log = logging.getLogger("inferq.edge.node_users")

REVOKED = "inferq agent revoke: this node's credential was taken back"


@dataclass(frozen=True)
class NodeBroker:
    """What a join hands a node for the broker: URLs with credentials, the user ("": shared), a warning."""

    urls: tuple[str, ...]
    user: str = ""
    warning: str = ""


@dataclass(frozen=True)
class NodeRevoked:
    """What ``inferq agent revoke`` took back; all False/0 when there was nothing left (revoked before)."""

    node: str
    api_key: bool = False
    broker_user: str = ""  # the broker user deleted ("": none)
    connections: int = 0  # connections of it closed through the management API (RabbitMQ closes most itself)
    note: str = ""


def with_credentials(url: str, user: str, password: str) -> str:
    """``url`` logging in as ``user``/``password``: host, port, virtual host and query kept."""
    parts = urlsplit(url)
    host = f"[{parts.hostname}]" if parts.hostname and ":" in parts.hostname else (parts.hostname or "")
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))


def _shared(settings: Settings, why: str) -> NodeBroker:
    warning = (f"node gets the cluster's shared broker credentials ({why}): `inferq agent revoke` cannot cut "
               "it off the broker; rotate the service user's password to do that")
    return NodeBroker(settings.broker.addresses, warning=warning)


async def issue_node_user(settings: Settings, node: str) -> NodeBroker:
    """Create (or give a new password to) ``node``'s broker user; the shared credentials when that cannot be done.

    ``tenancy.node_users`` decides: ``off`` and an empty ``management_url`` share;
    ``auto`` also shares, with a warning, when the management API is unreachable;
    ``require`` raises BrokerUnavailable then.
    """
    mode, url = settings.tenancy.node_users, settings.tenancy.management_url
    if mode == "off" or (not url and mode == "auto"):
        return _shared(settings, "tenancy.node_users is off" if mode == "off" else "tenancy.management_url is empty")
    if not url:
        raise ConfigError("tenancy.node_users = require needs tenancy.management_url")
    user, password = node_user_name(settings.namespace, node), secrets.token_urlsafe(24)
    try:
        await _put_node_user(settings, user, password)
    except BrokerUnavailable as exc:
        if mode == "require":
            raise
        return _shared(settings, f"the management API at {mask_url(url)} is unreachable: {exc}")
    return NodeBroker(tuple(with_credentials(u, user, password) for u in settings.broker.addresses), user)


async def _put_node_user(settings: Settings, user: str, password: str) -> None:
    async with await _admin(settings) as admin:
        existing = await admin.user(user)
        if existing is not None and str(existing.get("tags", "")).strip("[]"):
            raise ConfigError(f"RabbitMQ user {user} has tags ({existing.get('tags')}): it is not a node user "
                              "inferq made, so it is left alone; delete it or join under another node name")
        await admin.put_user(user, password)
        try:
            await admin.set_permissions(user, service_permissions(settings.namespace))
        except BaseException:
            if existing is None:  # never leave a user behind that no record points at
                await asyncio.shield(_quietly_delete(admin, user))
            raise


async def _quietly_delete(admin: BrokerAdmin, user: str) -> None:
    try:
        await admin.delete_user(user)
    except InferqError as exc:
        log.warning("could not remove half-made broker user %s: %s", user, exc)


async def revoke_node(settings: Settings, etcd: Any, node: str) -> NodeRevoked:
    """Take back everything ``node`` was given: its API key, its broker user and that user's connections.

    Idempotent: a second call finds nothing and says so. The etcd record goes last, so
    a revoke that failed half-way (the management API away) finds it again next time.
    """
    ns, timeout = settings.namespace, settings.etcd.timeout_s
    key = (keys(ns).agents + node).encode()
    async with translated("reading a node's record"):
        kv = await asyncio.wait_for(etcd.get(key), timeout)
    record = _record(kv.value) if kv is not None else None
    if record is not None:
        await revoke_keys(etcd, ns, [record.key_sha256], timeout)
    user = record.broker_user if record is not None else node_user_name(ns, node)
    deleted, closed, note = await _delete_node_user(settings, user, required=bool(record and record.broker_user))
    if record is not None and not record.broker_user:
        note = "it was given the shared broker credentials: rotate the service user's password to cut it off the broker"
    if kv is not None:
        async with translated("deleting a node's record"):
            await asyncio.wait_for(etcd.delete(key), timeout)
    return NodeRevoked(node, record is not None, user if deleted else "", closed, note)


async def _delete_node_user(settings: Settings, user: str, required: bool) -> tuple[bool, int, str]:
    """Delete ``user`` and close what is left of its connections; (deleted, closed, note)."""
    if not user:
        return False, 0, ""
    if not settings.tenancy.management_url:
        if required:  # the record stays, so a revoke with the management API set finishes the job
            raise ConfigError(f"cannot delete node broker user {user}: tenancy.management_url is empty")
        return False, 0, ""
    try:
        async with await _admin(settings) as admin:
            deleted = await admin.delete_user(user)  # RabbitMQ refuses it from now on, and closes its connections
            closed = 0
            for name in await admin.connections_of(user):  # any it has not closed yet
                closed += await admin.close_connection(name, REVOKED)
    except BrokerUnavailable:
        if required:
            raise
        return False, 0, "the management API is unreachable: no broker user was checked"
    return deleted, closed, ""


async def _admin(settings: Settings) -> BrokerAdmin:
    return await BrokerAdmin.open(settings.tenancy.management_url, broker_vhost(settings.broker.url), settings.etcd.timeout_s)


def _record(raw: bytes) -> AgentRecord | None:
    try:
        return AgentRecord.from_json(raw)
    except CodecError as exc:
        log.warning("a node's record is unreadable (%s): revoking by its name only", exc)
        return None
