"""The node's side of a join: send the token to the edge, get its settings, write them as ``agent.toml``.

When the token pins the edge's certificate (an ``https://`` edge), the certificate the
edge presents is hashed and compared with the pin before the secret is sent, and the
connection then trusts that certificate only (k3s does the same with its CA hash).
The join is retried with backoff while the edge is unreachable (a node that boots
before the network), never when the edge refuses the token.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import ssl
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from inferq.errors import ConfigError, IntegrityError, Unauthorized, Unavailable
from inferq.runtime.jointoken import AgentConfig, JoinToken

log = logging.getLogger("inferq.agent.join")


def pinned_context(url: str, cert_sha256: str, timeout_s: float = 10.0) -> ssl.SSLContext | None:
    """For an https URL with a pin: a context that trusts only the presented certificate, if its SHA-256 matches."""
    parts = urlsplit(url)
    if parts.scheme != "https":
        return None
    if not cert_sha256:
        return ssl.create_default_context()
    pem = ssl.get_server_certificate((parts.hostname or "", parts.port or 443), timeout=timeout_s)
    digest = hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest()
    if digest != cert_sha256:
        raise IntegrityError(f"the edge at {url} presented a certificate with SHA-256 {digest}, but the join token "
                             f"pins {cert_sha256}: not sending the token")
    context = ssl.create_default_context(cadata=pem)
    context.check_hostname = False  # the pin is the identity: the exact certificate, whatever name it carries
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # trust that certificate itself, not the CA that signed it
    return context


async def join(token_text: str, node: str = "", server: str = "", timeout_s: float = 10.0) -> AgentConfig:
    """One join: the node's configuration, or Unauthorized (bad, revoked, expired token) / Unavailable."""
    token = JoinToken.parse(token_text)
    url = (server or token.url).rstrip("/")
    try:
        context = await asyncio.to_thread(pinned_context, url, token.cert_sha256, timeout_s)
        connector = aiohttp.TCPConnector(ssl=context) if context is not None else None
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s)) as http:
            async with http.post(f"{url}/v1/agent/join", json={"token": token_text, "node": node}) as resp:
                body = await resp.text()
                return _answer(resp.status, body, url)
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise Unavailable(f"cannot reach the edge at {url} to join: {exc!r}") from exc


def _answer(status: int, body: str, url: str) -> AgentConfig:
    if status == 200:
        config = AgentConfig.from_json(body)
        for warning in config.warnings:  # e.g. a node given the shared broker credentials, which revoke cannot take back
            log.warning("the edge says: %s", warning)
        return config
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body[:300]
    if status == 401:
        raise Unauthorized(f"the edge refused the join token: {message}")
    if status >= 500:
        raise Unavailable(f"the edge at {url} answered {status}: {message}")
    raise ConfigError(f"the edge at {url} refused the join ({status}): {message}")


async def join_with_retry(token_text: str, node: str = "", server: str = "", max_delay_s: float = 30.0) -> AgentConfig:
    """Join, retrying with backoff while the edge cannot be reached; a refused token ends it at once."""
    delay = 0.5
    while True:
        try:
            return await join(token_text, node, server)
        except Unavailable as exc:
            log.warning("%s; retrying in %.1fs", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay_s)


def render_toml(doc: dict[str, Any]) -> str:
    """A settings document as TOML: top-level values first, then one table per section."""
    lines = ["# written by `inferq agent join`: this node's settings and credentials (keep it 0600)"]
    tables = {k: v for k, v in doc.items() if isinstance(v, dict)}
    lines += [f"{k} = {_value(v)}" for k, v in doc.items() if k not in tables]
    for name, table in tables.items():
        lines += ["", f"[{name}]", *(f"{k} = {_value(v)}" for k, v in table.items())]
    return "\n".join(lines) + "\n"


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a TOML basic string


def _existing(path: Path) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # Python 3.10
        import tomli as tomllib
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path} to update it: {exc}") from exc


def write_config(path: Path, config: AgentConfig, local: dict[str, Any]) -> Path:
    """Write ``agent.toml`` (mode 0600, created so: the credentials are never readable by others).

    Settings already in the file stay, except those the join answers (a rejoin replaces the credential).
    """
    doc: dict[str, Any] = _existing(path)
    for key, value in [*config.settings_doc().items(), *local.items()]:  # then state_dir, model_repository, [agent] ...
        if isinstance(value, dict):
            doc.setdefault(key, {}).update(value)
        else:
            doc[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.new")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(render_toml(doc))
    os.chmod(temp, 0o600)
    os.replace(temp, path)
    return path
