"""The SSRF guard of webhooks: which URLs a job may ask inferq to call.

A webhook is a request inferq makes on a client's behalf, from inside the
network it runs in. So a URL must be http(s), and every address its host
resolves to must be public: loopback, private, link-local (cloud metadata at
169.254.169.254 included), multicast, reserved and unspecified addresses are
refused, as are the other metadata addresses of known clouds. The exception
is a host name or network listed in ``webhooks.allow_hosts``.

The check runs at submit (422 ``webhook_not_allowed``) and again at every
delivery, through :class:`GuardedResolver`: the addresses aiohttp connects to
are the ones that were checked, so a DNS answer that changes between the two
(rebinding) cannot reach an internal address.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from aiohttp.abc import AbstractResolver

from inferq.errors import InvalidInput, WebhookNotAllowed

MAX_URL_CHARS = 2048
RESOLVE_TIMEOUT_S = 5.0
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# Metadata services that are not link-local (Alibaba Cloud, AWS over IPv6, Oracle's alias).
METADATA = frozenset(ipaddress.ip_address(a) for a in ("100.100.100.200", "fd00:ec2::254", "192.0.0.192"))


@dataclass(frozen=True)
class AllowList:
    """``webhooks.allow_hosts``: host names (exact, case-insensitive) and networks that may be internal."""

    names: frozenset[str] = frozenset()
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @classmethod
    def parse(cls, items: Iterable[str]) -> AllowList:
        """Hosts and CIDRs as the setting lists them (a bare address is a /32 or /128)."""
        names, networks = set(), []
        for item in (i.strip() for i in items):
            if not item:
                continue
            try:
                networks.append(ipaddress.ip_network(item.strip("[]"), strict=False))
            except ValueError:
                names.add(item.lower().rstrip("."))
        return cls(frozenset(names), tuple(networks))

    def admits(self, host: str, address: IPAddress) -> bool:
        """Whether an internal ``address`` of ``host`` is allowed anyway."""
        return host.lower().rstrip(".") in self.names or any(address in net for net in self.networks)


def internal(address: IPAddress) -> bool:
    """Whether ``address`` is one a webhook must not reach unless allowed."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return (address.is_loopback or address.is_private or address.is_link_local or address.is_multicast
            or address.is_reserved or address.is_unspecified or address in METADATA
            or not address.is_global)


def check_syntax(url: Any) -> str:
    """``url`` if it is a well-formed http(s) URL with a host; 422 ``invalid_input`` otherwise."""
    if not isinstance(url, str) or not url or len(url) > MAX_URL_CHARS:
        raise InvalidInput(f"'webhook' must be an http or https URL of at most {MAX_URL_CHARS} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InvalidInput(f"'webhook' is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput("'webhook' must be an http or https URL with a host")
    if parts.username or parts.password:
        raise InvalidInput("'webhook' must not carry credentials; verify the signature instead")
    del port
    return url


def masked(url: str) -> str:
    """``url`` with its query string (where receivers keep tokens) replaced by ``***``."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(query="***")) if parts.query else url


async def resolve(host: str, port: int, allow: AllowList) -> list[IPAddress]:
    """Every address of ``host``; WebhookNotAllowed if one of them is internal and not allowed."""
    try:
        literal = ipaddress.ip_address(host.strip("[]"))
        found = [literal]
    except ValueError:
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), RESOLVE_TIMEOUT_S)
        except (OSError, TimeoutError) as exc:
            raise WebhookNotAllowed(f"webhook host {host!r} does not resolve ({exc})") from None
        found = list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))
    for address in found:
        if internal(address) and not allow.admits(host, address):
            raise WebhookNotAllowed(
                f"webhook host {host!r} resolves to {address}, a loopback, private, link-local, multicast or "
                "metadata address; an operator may allow it in webhooks.allow_hosts")
    return found


async def check(url: Any, allow: AllowList) -> str:
    """The URL if a webhook may call it now (syntax, then every address of its host)."""
    url = check_syntax(url)
    parts = urlsplit(url)
    await resolve(parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80), allow)
    return url


class GuardedResolver(AbstractResolver):
    """aiohttp's resolver for webhook deliveries: only checked addresses are ever connected to."""

    def __init__(self, allow: AllowList) -> None:
        self._allow = allow

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[dict[str, Any]]:
        addresses = await resolve(host, port, self._allow)
        return [{"hostname": host, "host": str(a), "port": port, "family": socket.AF_INET6 if a.version == 6 else socket.AF_INET,
                 "proto": 0, "flags": socket.AI_NUMERICHOST} for a in addresses]

    async def close(self) -> None:
        return None
