"""RabbitMQ users and their permissions, through the management HTTP API.

``inferq tenant`` makes a broker user per tenant and one service user for
inferq's own processes. It speaks the management API (plugin
``rabbitmq_management``) with aiohttp, which every install has already: unlike
``rabbitmqctl`` it works from any host or container that can reach port 15672
(compose, Kubernetes), needs no Erlang cookie or root, and takes passwords in
a request body instead of a command line other users can read.

Permissions are three regexes per user and virtual host (configure, write,
read), matched against exchange and queue names, plus topic permissions that
match routing keys on a topic exchange::

    tenant T   configure  ^<ns>\\.replies\\.T\\..+$       declare and delete its own reply queues
               write      ^<ns>\\.requests$                publish jobs, nothing else
               read       ^<ns>\\.replies\\.T\\..+$       consume its own reply queues
               topic      <ns>.requests: write only well-formed <model>[.<version>] keys, read nothing
    service    configure, read  ^(<ns>\\..+|amq\\.gen-.+|amq_.+)$   everything of the namespace and its own
                                                                  unnamed queues (aio-pika names them amq_<hex>)
               write            the same, and amq.default            (replies and hand-backs go through it)

So a tenant cannot touch a model queue (publishing there goes through
``amq.default``), the ledger and cancel streams, the dead letters or the
control exchange.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import aiohttp

from inferq.errors import BrokerError, BrokerUnavailable, ConfigError
from inferq.settings import mask_url

log = logging.getLogger("inferq.broker.admin")

# What a tenant may publish to <ns>.requests: the routing keys of model queues, nothing else.
ROUTING_KEY_PATTERN = r"^[a-z0-9_-]{1,64}(\.[0-9]{1,9})?$"


@dataclass(frozen=True)
class Permissions:
    """One user's configure, write and read regexes on one virtual host."""

    configure: str
    write: str
    read: str


@dataclass(frozen=True)
class TopicPermission:
    """Which routing keys a user may publish (``write``) or bind (``read``) on one topic exchange."""

    exchange: str
    write: str
    read: str


def tenant_permissions(namespace: str, tenant: str) -> tuple[Permissions, TopicPermission]:
    """A tenant's least privilege: publish jobs, and use its own reply queues (see the module docstring)."""
    ns = re.escape(namespace)
    replies = rf"^{ns}\.replies\.{re.escape(tenant)}\..+$"
    return (Permissions(configure=replies, write=rf"^{ns}\.requests$", read=replies),
            TopicPermission(f"{namespace}.requests", write=ROUTING_KEY_PATTERN, read="^$"))


def service_permissions(namespace: str) -> Permissions:
    """What inferq's own processes need: every name of the namespace, their control queues, the default exchange."""
    ns = re.escape(namespace)
    # Unnamed queues (control listeners): server-named amq.gen-*, or amq_<hex> as aio-pika's robust channels name them.
    mine = rf"^({ns}\..+|amq\.gen-.+|amq_.+)$"
    return Permissions(configure=mine, write=rf"^({ns}\..+|amq\.gen-.+|amq_.+|amq\.default)$", read=mine)


class BrokerAdmin:
    """The management API as an administrator; build with :meth:`open`, close with :meth:`aclose`."""

    def __init__(self, session: aiohttp.ClientSession, base: str, vhost: str) -> None:
        self._session = session
        self._base = base
        self.vhost = vhost

    @classmethod
    async def open(cls, management_url: str, vhost: str, timeout_s: float) -> BrokerAdmin:
        """A client of ``management_url`` (``http://user:password@host:15672/``) acting on ``vhost``."""
        parts = urlsplit(management_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"tenancy.management_url must be an http(s) URL, not {mask_url(management_url)!r}")
        login = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}".encode()
        headers = {"Authorization": "Basic " + base64.b64encode(login).decode()}
        netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
        base = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + "/api", "", ""))
        session = aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=timeout_s))
        return cls(session, base, vhost)

    async def aclose(self) -> None:
        """Close the HTTP session; idempotent."""
        await self._session.close()

    async def __aenter__(self) -> BrokerAdmin:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def user(self, name: str) -> dict[str, Any] | None:
        """The user's record (``name``, ``tags``), None if there is no such user."""
        return await self._call("GET", f"/users/{_q(name)}", missing=None)

    async def users(self) -> list[str]:
        """The names of every user of the broker."""
        return [u["name"] for u in await self._call("GET", "/users?columns=name") if isinstance(u, dict) and "name" in u]

    async def put_user(self, name: str, password: str, tags: str = "") -> None:
        """Create the user, or set its password and tags."""
        await self._call("PUT", f"/users/{_q(name)}", {"password": password, "tags": tags})

    async def delete_user(self, name: str) -> bool:
        """Delete the user with its permissions; RabbitMQ closes its connections. False if it did not exist."""
        return await self._call("DELETE", f"/users/{_q(name)}", missing=False) is not False

    async def set_permissions(self, user: str, permissions: Permissions) -> None:
        """Replace the user's permissions on this virtual host."""
        body = {"configure": permissions.configure, "write": permissions.write, "read": permissions.read}
        await self._call("PUT", f"/permissions/{_q(self.vhost)}/{_q(user)}", body)

    async def set_topic_permission(self, user: str, topic: TopicPermission) -> None:
        """Replace the user's topic permission on one exchange of this virtual host."""
        body = {"exchange": topic.exchange, "write": topic.write, "read": topic.read}
        await self._call("PUT", f"/topic-permissions/{_q(self.vhost)}/{_q(user)}", body)

    async def connections_of(self, user: str) -> list[str]:
        """The names of the open connections that logged in as ``user`` (on any virtual host)."""
        found = await self._call("GET", "/connections?columns=name,user")
        return [c["name"] for c in found if isinstance(c, dict) and c.get("user") == user and "name" in c]

    async def close_connection(self, name: str, reason: str) -> bool:
        """Close one connection, telling the client ``reason``; False if it was gone already."""
        return await self._call("DELETE", f"/connections/{_q(name)}", missing=False, headers={"X-Reason": reason}) is not False

    async def queues(self, prefix: str) -> list[tuple[str, int]]:
        """``(name, ready messages)`` of this virtual host's durable, non-exclusive queues named ``prefix...``.

        Exclusive queues are left out: the broker deletes them when their owner (a running
        client's reply queue, a worker's control queue) disconnects.
        """
        found = await self._call("GET", f"/queues/{_q(self.vhost)}?columns=name,messages_ready,exclusive,durable")
        return [(q["name"], int(q.get("messages_ready") or 0)) for q in found
                if isinstance(q, dict) and str(q.get("name", "")).startswith(prefix) and not q.get("exclusive")
                and q.get("durable", True)]

    async def exchanges(self, prefix: str) -> list[str]:
        """The names of this virtual host's exchanges named ``prefix...``."""
        found = await self._call("GET", f"/exchanges/{_q(self.vhost)}?columns=name")
        return [e["name"] for e in found if isinstance(e, dict) and str(e.get("name", "")).startswith(prefix)]

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None, missing: Any = ...,
                    headers: dict[str, str] | None = None) -> Any:
        url = self._base + path
        try:
            async with self._session.request(method, url, json=body, headers=headers) as resp:
                if resp.status == 404 and missing is not ...:
                    return missing
                if resp.status == 401:
                    raise ConfigError(f"the RabbitMQ management API at {self._base} refused the credentials of "
                                      "tenancy.management_url (it needs an administrator)")
                if resp.status >= 300:
                    raise BrokerError(f"management API {method} {path}: {resp.status} {(await resp.text())[:300]}")
                return await resp.json() if resp.content_type == "application/json" else True
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            raise BrokerUnavailable(f"cannot reach the RabbitMQ management API at {self._base} ({exc!r}); is the "
                                    "rabbitmq_management plugin enabled? (inferq services enables it locally)") from exc


def _q(segment: str) -> str:
    return quote(segment, safe="")
