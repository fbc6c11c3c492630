"""What an edge offers edge nodes (/v1/agent): the join, the install script and the inferq wheel.

These routes are public (no API key): the join token is the join's credential, and the
script and wheel hold no secret (k3s serves its installer the same way). A join
answers the node's settings with fresh credentials of its own that ``inferq agent
revoke NODE`` deletes: an API key of role ``node`` (tenant ``node:<name>``) and,
when the management API is reachable, a broker user (:mod:`inferq.edge.node_users`),
else the shared broker credentials with a warning in the answer. Joining again
under the same name replaces the old API key and sets a new broker password.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from inferq.broker.identity import broker_user
from inferq.edge.auth import create_key, revoke_keys, token_hash
from inferq.edge.install_script import render_install_script
from inferq.edge.responses import json_response
from inferq.errors import CodecError, ConfigError, InvalidInput, NotFound
from inferq.edge.node_users import issue_node_user
from inferq.runtime.coordination import keys, translated
from inferq.runtime.jointoken import AgentConfig, AgentRecord, JoinToken, check_node_name, check_token
from inferq.settings import Settings

log = logging.getLogger("inferq.edge.agent")



class AgentAPI:
    """Handlers of the /v1/agent routes."""

    def __init__(self, settings: Settings, etcd: Any) -> None:
        self.settings = settings
        self.etcd = etcd

    def register(self, app: web.Application) -> None:
        r = app.router
        r.add_post("/v1/agent/join", self.join)
        r.add_get("/v1/agent/install.sh", self.install_script)
        r.add_get("/v1/agent/inferq.whl", self.wheel)

    async def join(self, request: web.Request) -> web.Response:
        """Exchange a join token for the node's configuration; 401 for an unknown, revoked or expired token."""
        body = await _json_body(request)
        token = JoinToken.parse(str(body.get("token", "")))
        s = self.settings
        record = await check_token(self.etcd, s.namespace, token.secret, s.etcd.timeout_s)
        node = _node_name(str(body.get("node") or ""), record.node_name_prefix)
        broker = await issue_node_user(s, node)
        if broker.warning:
            log.warning("node %s: %s", node, broker.warning)
        api_key = await create_key(self.etcd, s.namespace, f"node:{node}", 0.0, 0, s.etcd.timeout_s, role="node")
        await self._replace_credential(AgentRecord(node, token_hash(api_key), time.time(), token.id, broker.user))
        log.info("node %s joined with token %s as broker user %s", node, token.id, broker.user or "(shared)")
        config = AgentConfig(
            node, s.namespace, broker.urls, tuple(f"{h}:{p}" for h, p in s.etcd.members), token.url, api_key,
            s.etcd.username, s.etcd.password, s.broker.replicas, s.etcd.lease_ttl_s, s.jobs.ttl_s,
            broker.user, broker_user(s.broker.url) or "", (broker.warning,) if broker.warning else ())
        return json_response(json.loads(config.to_json()))

    async def _replace_credential(self, record: AgentRecord) -> None:
        s, key = self.settings, (keys(self.settings.namespace).agents + record.node).encode()
        async with translated("recording a node's credential"):
            old = await asyncio.wait_for(self.etcd.get(key), s.etcd.timeout_s)
            await asyncio.wait_for(self.etcd.put(key, record.to_json().encode()), s.etcd.timeout_s)
        if old is not None:  # a rejoin under the same name: the earlier credential stops working
            try:
                previous = AgentRecord.from_json(old.value)
            except CodecError:
                return
            await revoke_keys(self.etcd, s.namespace, [previous.key_sha256], s.etcd.timeout_s)

    async def install_script(self, request: web.Request) -> web.Response:
        """The POSIX sh installer, with this edge's URL (as the caller reached it) filled in."""
        server = f"{request.scheme}://{request.host}"
        return web.Response(text=render_install_script(server), content_type="text/x-shellscript")

    async def wheel(self, request: web.Request) -> web.StreamResponse:
        """The inferq wheel of this cluster (``edge.agent_wheel``), so a node installs the version the cluster runs."""
        path = Path(self.settings.edge.agent_wheel) if self.settings.edge.agent_wheel else None
        if path is None or not path.is_file():
            raise NotFound("this edge serves no inferq wheel: build one (make wheel) and set edge.agent_wheel, "
                           "or install with --wheel FILE")
        return web.FileResponse(path, headers={"Content-Disposition": f'attachment; filename="{path.name}"',
                                               "X-Inferq-Wheel": path.name})


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError) as exc:
        raise CodecError(f"the join body must be JSON {{\"token\": ..., \"node\": ...}}: {exc}") from exc
    if not isinstance(body, dict):
        raise CodecError("the join body must be a JSON object")
    return body


def _node_name(asked: str, prefix: str) -> str:
    name = asked or secrets.token_hex(3)
    if prefix and not name.startswith(prefix):
        name = prefix + name
    try:
        return check_node_name(name)
    except ConfigError as exc:
        raise InvalidInput(str(exc)) from exc
