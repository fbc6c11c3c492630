"""Who published a job, as RabbitMQ vouches for it, and what a copy of a job keeps of that.

RabbitMQ refuses a message whose ``user_id`` property is not the user of the
connection it is published on, so ``user_id`` names the publisher and cannot
be forged, unlike a header. All of inferq's own processes connect as one
service user, the user of ``broker.url``. The edge publishes a job with that
``user_id`` and the tenant in ``x-inferq-tenant``; the header is honoured for
that reason alone. A worker that hands a job back (a retry, a drain) publishes
a copy under its own ``user_id``, and the copy names the original publisher in
``x-inferq-publisher``, so the copy is judged as the original was::

    user_id = service user, no x-inferq-publisher    inferq's own job: x-inferq-tenant holds
    user_id = service user, x-inferq-publisher = U    a worker's copy of U's job: judged as U's
    user_id = U, anyone else                          U's job: U's tenant comes from etcd, headers are ignored
    no user_id                                        nobody's: refused when auth is on

An edge node that joined with its own broker user (``<ns>.node.<node>``,
made by the join, deleted by ``inferq agent revoke``) is one of inferq's own
processes too: :class:`ServiceUsers` holds the service user, the cluster's
service user as a node knows it (``tenancy.service_user``) and every node
user of the namespace. A copy whose ``x-inferq-publisher`` names one of them
is inferq's own job (a node handed back a job of the edge's).

Nothing here reads etcd: the mapping of broker users to tenants is
:mod:`inferq.runtime.tenancy`'s.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import aio_pika

from inferq.broker.messages import TENANT_HEADER
from inferq.errors import ConfigError

PUBLISHER_HEADER = "x-inferq-publisher"
# Tenant names become parts of queue names and permission regexes: no dots, nothing a regex reads.
TENANT_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
# A node's broker user: the namespace ([A-Za-z0-9_-], no dot), ".node.", the node name. Tenant users
# (<ns>-<tenant>) never hold a dot, and the first dot ends the namespace, so no two rules meet.
NODE_USER_RE = re.compile(r"^(?P<ns>[A-Za-z0-9_-]{1,64})\.node\.(?P<node>[A-Za-z0-9][A-Za-z0-9_.-]{0,62})$")

Message = aio_pika.abc.AbstractIncomingMessage


def check_tenant_name(name: str) -> str:
    """``name`` if it can be a tenant of AMQP jobs (``[a-z0-9][a-z0-9_-]*``, at most 63), else ConfigError."""
    if not isinstance(name, str) or not TENANT_NAME_RE.match(name):
        raise ConfigError(f"tenant name {name!r} must match [a-z0-9][a-z0-9_-]{{0,62}}")
    return name


def broker_user(url: str) -> str | None:
    """The user an AMQP URL logs in as; None if it names none (aio-pika's guest default, or EXTERNAL auth)."""
    parts = urlsplit(url)
    if parts.username is None or "auth=external" in parts.query.lower():
        return None
    return unquote(parts.username) or None


def broker_vhost(url: str) -> str:
    """The virtual host of an AMQP URL: its path without the leading slash, ``/`` when empty."""
    return unquote(urlsplit(url).path[1:]) or "/"


def node_user_name(namespace: str, node: str) -> str:
    """The broker user the join makes for ``node``: ``<ns>.node.<node>`` (RabbitMQ users span namespaces)."""
    return f"{namespace}.node.{node}"


def is_node_user(namespace: str, user: str | None) -> bool:
    """Whether ``user`` is the broker user of a node of ``namespace`` (only an administrator can make one)."""
    match = NODE_USER_RE.match(user or "")
    return match is not None and match.group("ns") == namespace


@dataclass(frozen=True)
class ServiceUsers:
    """The broker users whose jobs are inferq's own: ``names`` and, with ``namespace``, its nodes' users."""

    names: frozenset[str] = field(default_factory=frozenset)
    namespace: str = ""

    @classmethod
    def of(cls, users: ServiceUsers | str | Iterable[str | None] | None, namespace: str = "") -> ServiceUsers:
        """From one user (None: nobody), several, or a ServiceUsers as it is."""
        if isinstance(users, ServiceUsers):
            return users
        if users is None or isinstance(users, str):
            users = (users,)
        return cls(frozenset(u for u in users if u), namespace)

    def __contains__(self, user: object) -> bool:
        if not isinstance(user, str) or not user:
            return False
        return user in self.names or (bool(self.namespace) and is_node_user(self.namespace, user))


def reply_prefix(namespace: str, tenant: str) -> str:
    """Where a tenant's reply queues live: ``<ns>.replies.<tenant>.``; only that tenant may read them."""
    return f"{namespace}.replies.{tenant}."


def may_reply(reply_to: str, namespace: str, tenant: str) -> bool:
    """Whether results may go to ``reply_to`` for ``tenant``: a queue under its reply prefix."""
    prefix = reply_prefix(namespace, tenant)
    return reply_to.startswith(prefix) and len(reply_to) > len(prefix)


@dataclass(frozen=True)
class Publisher:
    """Who a job came from, before etcd is asked.

    ``service``: inferq's own service user published it, so ``tenant`` (the
    header) holds. Otherwise ``user`` is the broker user to map to a tenant
    (None: unknown), and ``copy`` says a worker republished it for ``user``.
    """

    user: str | None
    service: bool = False
    copy: bool = False
    tenant: str | None = None


def publisher_of(message: Message, service_user: ServiceUsers | str | None) -> Publisher:
    """The publisher of ``message`` by the rule of this module's docstring."""
    service = ServiceUsers.of(service_user)
    headers = message.headers or {}
    tenant = _text(headers.get(TENANT_HEADER))
    user = message.user_id or None
    if user in service:
        original = _text(headers.get(PUBLISHER_HEADER))
        if PUBLISHER_HEADER in headers and original not in service:
            return Publisher(original, copy=True, tenant=tenant)
        return Publisher(user, service=True, tenant=tenant)  # its own job, or a copy of another service user's
    return Publisher(user, tenant=tenant)


def carried(delivery: Message, service_user: ServiceUsers | str | None) -> dict[str, str]:
    """Headers a copy of ``delivery`` published by ``service_user`` needs to keep its publisher.

    Nothing for inferq's own job or a copy made before (its headers stand as
    they are); else the original ``user_id`` (empty: it had none), which also
    overrides any ``x-inferq-publisher`` the original publisher wrote itself.
    """
    if delivery.user_id in ServiceUsers.of(service_user):
        return {}
    return {PUBLISHER_HEADER: delivery.user_id or ""}


@dataclass(frozen=True)
class Verdict:
    """What becomes of a job for its publisher's sake.

    ``tenant`` owns it (recorded on its events). With ``error`` set the job
    fails with that ``{"code", "message"}``. ``reply`` says whether its
    ``reply_to`` may be answered. ``later``: the publisher cannot be checked now
    (etcd is away and the user was never seen); the job waits and is judged again.
    """

    tenant: str | None = None
    error: Mapping[str, str] | None = None
    reply: bool = True
    later: bool = False


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None
