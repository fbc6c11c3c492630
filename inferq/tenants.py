"""Tenants in one place (``inferq tenant ...``): API keys in etcd, and RabbitMQ users for AMQP access.

A tenant is the owner recorded on its jobs. ``create`` gives it an API key
(``/<ns>/apikeys/<sha256>``) and, for AMQP, a broker user ``<ns>-<tenant>``
with least-privilege permissions (:mod:`inferq.broker.admin`) whose tenant and
rate workers read from ``/<ns>/brokerusers/<user>``. ``delete`` revokes the
keys, removes the mapping and deletes the broker user (RabbitMQ closes its
connections), so both ways in close at once. Broker users are made through the
management API with ``tenancy.management_url`` (an administrator); inferq's own
processes use the service user of ``broker.url`` (:func:`ensure_service_user`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from inferq.broker.admin import BrokerAdmin, service_permissions, tenant_permissions
from inferq.broker.identity import broker_user, broker_vhost, check_tenant_name, reply_prefix
from inferq.edge.auth import check_role, create_key, revoke_keys, tenant_keys
from inferq.errors import ConfigError, InferqError, NotFound
from inferq.runtime.coordination import get_records, keys, open_etcd, translated
from inferq.runtime.records import BrokerUserRecord
from inferq.runtime.signing import SecretRecord, TenantSecrets
from inferq.settings import Settings

log = logging.getLogger("inferq.tenants")


@dataclass(frozen=True)
class NewTenant:
    """What ``create`` made; the key and the password are shown this once and stored nowhere in clear."""

    name: str
    api_key: str
    amqp_user: str | None = None
    amqp_password: str | None = None
    amqp_url: str | None = None
    reply_prefix: str | None = None


@dataclass(frozen=True)
class TenantInfo:
    """One tenant as ``list`` shows it."""

    name: str
    keys: int = 0
    roles: tuple[str, ...] = ()
    rate_per_s: float = 0.0
    burst: int = 0
    amqp_users: tuple[str, ...] = field(default_factory=tuple)


def amqp_user_name(namespace: str, tenant: str) -> str:
    """The broker user of ``tenant``: namespaced, since RabbitMQ users are shared by every namespace."""
    return f"{namespace}-{tenant}"


async def create_tenant(settings: Settings, name: str, rate_per_s: float = 0.0, burst: int = 0, role: str = "user",
                        amqp: bool = False) -> NewTenant:
    """Make tenant ``name``: an API key and, with ``amqp``, a broker user.

    An existing tenant without a broker user gets only that with ``amqp`` (its
    keys stay; the broker user takes their limits unless others are given).
    Anything else that exists already is a ConfigError.
    """
    check_tenant_name(name)
    check_role(role)
    ns, timeout = settings.namespace, settings.etcd.timeout_s
    async with open_etcd(settings.etcd) as etcd:
        existing = next((t for t in await _tenants(etcd, ns, timeout) if t.name == name), None)
        if existing is not None and (existing.amqp_users or not amqp):
            raise ConfigError(f"tenant {name} exists already (inferq apikey create --tenant {name} adds a key)")
        if existing is not None:
            return await _create_broker_user(settings, etcd, name, rate_per_s or existing.rate_per_s, burst or existing.burst)
        made = await _create_broker_user(settings, etcd, name, rate_per_s, burst) if amqp else NewTenant(name, "")
        try:
            key = await create_key(etcd, ns, name, rate_per_s, burst, timeout, role)
        except InferqError:
            if made.amqp_user:
                await _delete_broker_user(settings, etcd, made.amqp_user)
            raise
    return dataclasses.replace(made, api_key=key)


async def _create_broker_user(settings: Settings, etcd: Any, tenant: str, rate_per_s: float, burst: int) -> NewTenant:
    user, password = amqp_user_name(settings.namespace, tenant), secrets.token_urlsafe(24)
    async with await _admin(settings) as admin:
        if await admin.user(user) is not None:
            raise ConfigError(f"RabbitMQ user {user} exists already; delete it first (inferq tenant delete {tenant})")
        await admin.put_user(user, password)
        try:
            permissions, topic = tenant_permissions(settings.namespace, tenant)
            await admin.set_permissions(user, permissions)
            await admin.set_topic_permission(user, topic)
            record = BrokerUserRecord(user, tenant, rate_per_s, burst, time.time())
            async with translated("storing a broker user"):
                await asyncio.wait_for(etcd.put(keys(settings.namespace).brokeruser(user).encode(), record.to_json().encode()),
                                       settings.etcd.timeout_s)
        except BaseException:
            with contextlib.suppress(InferqError):
                await admin.delete_user(user)
            raise
    return NewTenant(tenant, "", user, password, _amqp_url(settings.broker.url, user, password),
                     reply_prefix(settings.namespace, tenant))


async def list_tenants(settings: Settings) -> list[TenantInfo]:
    """Every tenant with a key or a broker user, by name."""
    async with open_etcd(settings.etcd) as etcd:
        return await _tenants(etcd, settings.namespace, settings.etcd.timeout_s)


async def _tenants(etcd: Any, namespace: str, timeout: float) -> list[TenantInfo]:
    found: dict[str, TenantInfo] = {}
    for principal in (await tenant_keys(etcd, namespace, timeout)).values():
        t = found.get(principal.tenant, TenantInfo(principal.tenant))
        found[principal.tenant] = TenantInfo(t.name, t.keys + 1, tuple(sorted({*t.roles, principal.role})),
                                             max(t.rate_per_s, principal.rate_per_s), max(t.burst, principal.burst), t.amqp_users)
    for record in (await get_records(etcd, keys(namespace).brokerusers, BrokerUserRecord.from_json, timeout)).values():
        t = found.get(record.tenant, TenantInfo(record.tenant))
        found[record.tenant] = TenantInfo(t.name, t.keys, t.roles, t.rate_per_s, t.burst, (*t.amqp_users, record.user))
    return [found[name] for name in sorted(found)]


async def delete_tenant(settings: Settings, name: str) -> TenantInfo:
    """Revoke the tenant's keys and delete its broker users (their connections close); NotFound if it has none."""
    ns, timeout = settings.namespace, settings.etcd.timeout_s
    async with open_etcd(settings.etcd) as etcd:
        digests = [d for d, p in (await tenant_keys(etcd, ns, timeout)).items() if p.tenant == name]
        users = [r.user for r in (await get_records(etcd, keys(ns).brokerusers, BrokerUserRecord.from_json, timeout)).values()
                 if r.tenant == name]
        if not digests and not users:
            raise NotFound(f"no tenant {name} (inferq tenant list)")
        await revoke_keys(etcd, ns, digests, timeout)
        for user in users:
            await _delete_broker_user(settings, etcd, user)
        async with translated("deleting a meter"):
            await asyncio.wait_for(etcd.delete(keys(ns).meter(name).encode()), timeout)
    return TenantInfo(name, len(digests), amqp_users=tuple(users))


async def _delete_broker_user(settings: Settings, etcd: Any, user: str) -> None:
    # RabbitMQ first (it closes the user's connections), then the mapping (workers then refuse its queued jobs):
    # if either step fails, the mapping is still there for the next `tenant delete` to find.
    async with await _admin(settings) as admin:
        if not await admin.delete_user(user):
            log.info("RabbitMQ user %s was already gone", user)
    async with translated("deleting a broker user"):
        await asyncio.wait_for(etcd.delete(keys(settings.namespace).brokeruser(user).encode()), settings.etcd.timeout_s)


async def rotate_keys(settings: Settings, tenant: str) -> list[str]:
    """Replace each of the tenant's API keys by a new one with the same role and limits; the new keys."""
    ns, timeout = settings.namespace, settings.etcd.timeout_s
    async with open_etcd(settings.etcd) as etcd:
        old = {d: p for d, p in (await tenant_keys(etcd, ns, timeout)).items() if p.tenant == tenant}
        if not old:
            raise NotFound(f"tenant {tenant} has no API key in etcd (keys of edge.api_keys_file are rotated in that file)")
        new = [await create_key(etcd, ns, tenant, p.rate_per_s, p.burst, timeout, p.role) for p in old.values()]
        await revoke_keys(etcd, ns, list(old), timeout)
    return new


async def webhook_secret(settings: Settings, tenant: str, rotate: bool = False) -> SecretRecord:
    """The tenant's webhook signing secret, made if it has none; ``rotate`` replaces it (both sign for a day)."""
    check_tenant_name(tenant)
    async with open_etcd(settings.etcd) as etcd:
        return await TenantSecrets(etcd, settings.namespace, settings.etcd.timeout_s).ensure(tenant, rotate)


async def ensure_service_user(settings: Settings) -> str:
    """Create or update the user of ``broker.url`` with the service permissions of its namespace; its name."""
    user = broker_user(settings.broker.url)
    password = unquote(urlsplit(settings.broker.url).password or "")
    if user is None or not password:
        raise ConfigError("broker.url must name the service user and its password (amqp://USER:PASSWORD@host/)")
    async with await _admin(settings) as admin:
        existing = await admin.user(user)
        if existing is not None and "administrator" in str(existing.get("tags", "")):
            raise ConfigError(f"RabbitMQ user {user} is an administrator; inferq's service user should be a user of its own "
                              "(set broker.url to it), so its permissions are left alone")
        await admin.put_user(user, password)
        await admin.set_permissions(user, service_permissions(settings.namespace))
    return user


async def _admin(settings: Settings) -> BrokerAdmin:
    return await BrokerAdmin.open(settings.tenancy.management_url, broker_vhost(settings.broker.url), settings.etcd.timeout_s)


def _amqp_url(broker_url: str, user: str, password: str) -> str:
    parts = urlsplit(broker_url)
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path or "/", "", ""))
