"""``inferq agent``: run the edge-node agent, and its admin commands (join tokens, revocation, install).

``inferq agent [--token T --server URL]`` runs the agent; with a token and no node
credential in its settings yet it joins first and writes ``agent.toml`` (the first
start exchanges the token). ``inferq agent token create`` / ``token revoke``,
``inferq agent revoke NODE`` and ``inferq agent join`` are the admin and node sides
of the join; ``inferq agent install`` lays a node out (see :mod:`inferq.agent_install`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from inferq.settings import Settings

log = logging.getLogger("inferq.cli")


def add_commands(agent: argparse.ArgumentParser, run: Any) -> None:
    """The options of ``inferq agent`` and its admin subcommands."""
    agent.add_argument("--node", help="node name (default: settings.node, the host name)")
    agent.add_argument("--capacity", type=int, help="most workers this node runs at once (default: agent.capacity, 2)")
    agent.add_argument("--model-repository")
    agent.add_argument("--sysroot", help="where device facts are read (default: agent.sysroot, /)")
    agent.add_argument("--cache-gb", type=float, help="model cache bound in GiB (default: agent.cache_gb)")
    agent.add_argument("--token", default=os.environ.get("INFERQ_TOKEN"),
                       help="join token: join first if the settings hold no node credential (default: $INFERQ_TOKEN)")
    agent.add_argument("--server", help="the edge to join through (default: the URL in the token)")
    agent.add_argument("--write-config", metavar="PATH",
                       help="where the join writes the node's settings (default: --config, else <state_dir>/agent.toml)")
    agent.set_defaults(func=run)
    sub = agent.add_subparsers(metavar="ACTION")

    token = sub.add_parser("token", help="join tokens for new edge nodes").add_subparsers(required=True, metavar="ACTION")
    create = token.add_parser("create", help="a join token (printed once; etcd keeps its hash)")
    create.add_argument("--ttl", default="24h", help="how long it is valid: 30m, 24h, 7d (default 24h)")
    create.add_argument("--node-name-prefix", default="", help="prefix of the names of nodes that join with it, e.g. jetson-")
    create.add_argument("--url", help="the edge URL nodes reach (default: $INFERQ_URL or the edge settings)")
    create.add_argument("--edge-cert", metavar="PEM", help="the edge's TLS certificate: its SHA-256 goes into the token (pinned)")
    create.set_defaults(func=_token_create)
    revoke_token = token.add_parser("revoke", help="revoke a join token by its id (nodes that joined keep their credential)")
    revoke_token.add_argument("token_id")
    revoke_token.set_defaults(func=_token_revoke)

    revoke = sub.add_parser("revoke", help="take back a node's credentials: its API key (model fetch) and its broker user")
    revoke.add_argument("node_name", metavar="NODE")
    revoke.set_defaults(func=_revoke)

    join = sub.add_parser("join", help="exchange a join token for this node's settings, written to agent.toml")
    join.add_argument("--token", dest="join_token", default=os.environ.get("INFERQ_TOKEN"), required=not os.environ.get("INFERQ_TOKEN"))
    join.add_argument("--server", dest="join_server", help="the edge (default: the URL in the token)")
    join.add_argument("--node", dest="join_node", help="this node's name (default: the host name)")
    join.add_argument("--output", default="agent.toml", help="the settings file to write (mode 0600)")
    join.set_defaults(func=_join)

    from inferq.agent_install import add_install

    add_install(sub)


def run_agent(settings: Settings, args: argparse.Namespace, run_actor: Any) -> int:
    """``inferq agent``: join first if a token is given and no credential is held, then run."""
    if args.token and not settings.registry.api_key:
        settings = _first_join(settings, args)
    agent_overrides = {k: v for k, v in (("sysroot", args.sysroot), ("cache_gb", args.cache_gb)) if v is not None}
    settings = replace(settings, agent=replace(settings.agent, **agent_overrides))
    from inferq.actors.agent import Agent

    node = args.node or settings.node
    return run_actor(Agent(settings, node, args.capacity or settings.agent.capacity), args)


def _first_join(settings: Settings, args: argparse.Namespace) -> Settings:
    import asyncio

    from inferq.agent_join import join_with_retry, write_config

    config = asyncio.run(join_with_retry(args.token, args.node or settings.node, args.server or ""))
    path = Path(args.write_config or args.config or settings.state_dir / "agent.toml")
    local = {"state_dir": str(settings.state_dir.resolve()), "model_repository": str(settings.model_repository.resolve())}
    write_config(path, config, local)
    log.info("joined as node %s; settings written to %s", config.node, path)
    args.node = config.node
    return Settings.load(path)


def _token_create(settings: Settings, args: argparse.Namespace) -> int:
    import asyncio
    import hashlib
    import ssl

    from inferq.cli import edge_url
    from inferq.runtime.coordination import open_etcd
    from inferq.runtime.jointoken import create_token, parse_duration

    pin = ""
    if args.edge_cert:
        pin = hashlib.sha256(ssl.PEM_cert_to_DER_cert(Path(args.edge_cert).read_text())).hexdigest()

    async def main() -> Any:
        async with open_etcd(settings.etcd) as client:
            return await create_token(client, settings.namespace, edge_url(settings, args.url), parse_duration(args.ttl),
                                      args.node_name_prefix, pin, settings.etcd.timeout_s)

    token = asyncio.run(main())
    print(token.encode())
    print(f"(token id {token.id}, valid {args.ttl}; shown once: etcd keeps only its hash; "
          f"inferq agent token revoke {token.id} takes it back)", file=sys.stderr)
    return 0


def _token_revoke(settings: Settings, args: argparse.Namespace) -> int:
    import asyncio

    from inferq.runtime.coordination import open_etcd
    from inferq.runtime.jointoken import revoke_token

    async def main() -> int:
        async with open_etcd(settings.etcd) as client:
            return await revoke_token(client, settings.namespace, args.token_id, settings.etcd.timeout_s)

    count = asyncio.run(main())
    print(f"{count} join token(s) revoked")
    return 0 if count else 1


def _revoke(settings: Settings, args: argparse.Namespace) -> int:
    import asyncio

    from inferq.edge.node_users import revoke_node
    from inferq.runtime.coordination import open_etcd

    async def main() -> Any:
        async with open_etcd(settings.etcd) as client:
            return await revoke_node(settings, client, args.node_name)

    done = asyncio.run(main())
    taken = [what for what, held in (("API key (model fetch)", done.api_key),
                                     (f"broker user {done.broker_user}", done.broker_user)) if held]
    if done.connections:
        taken.append(f"{done.connections} open broker connection(s) closed")
    print(f"node {done.node}: " + ("revoked " + ", ".join(taken) if taken else
                                    "nothing left to revoke (revoked already, or it never joined this namespace)"))
    if done.note:
        print(f"note: {done.note}", file=sys.stderr)
    return 0


def _join(settings: Settings, args: argparse.Namespace) -> int:
    import asyncio

    from inferq.agent_join import join, write_config

    config = asyncio.run(join(args.join_token, args.join_node or settings.node, args.join_server or ""))
    path = write_config(Path(args.output), config, {})
    print(f"joined as node {config.node}; settings in {path} (run: inferq --config {path} agent)")
    return 0
