"""The ``inferq`` command line. Logging handlers are configured here and only here."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path

from runtime.errors import InferqError
from runtime.settings import Settings

log = logging.getLogger("inferq.cli")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``inferq`` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("aio_pika").setLevel(logging.WARNING)
    logging.getLogger("aiormq").setLevel(logging.WARNING)
    try:
        settings = Settings.load(args.config)
        if getattr(args, "model_repository", None):
            settings = replace(settings, model_repository=Path(args.model_repository))
        return args.func(settings, args) or 0
    except InferqError as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inferq", description="Async inference on RabbitMQ and ONNX Runtime.")
    parser.add_argument("--config", help="TOML settings file (default: built-in defaults, INFERQ_* overrides)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    worker = sub.add_parser("worker", help="run a shard worker for one model version")
    worker.add_argument("--model", required=True)
    worker.add_argument("--version", default=None, help="model version (default: the highest)")
    worker.add_argument("--model-repository")
    worker.set_defaults(func=_worker)

    edge = sub.add_parser("edge", help="run the HTTP edge")
    edge.add_argument("--host")
    edge.add_argument("--port", type=int)
    edge.set_defaults(func=_edge)

    autoscaler = sub.add_parser("autoscaler", help="run the autoscaler (one acts; others stand by)")
    autoscaler.add_argument("--launcher", choices=["local", "agent"], help="how workers are started (default: config)")
    autoscaler.add_argument("--model-repository")
    autoscaler.set_defaults(func=_autoscaler)

    agent = sub.add_parser("agent", help="run the edge-node agent that starts workers on this node")
    agent.add_argument("--node", help="node name (default: settings.node, the host name)")
    agent.add_argument("--capacity", type=int, default=2, help="most workers this node runs at once")
    agent.add_argument("--model-repository")
    agent.set_defaults(func=_agent)

    apikey = sub.add_parser("apikey", help="API keys for the HTTP edge")
    asub = apikey.add_subparsers(required=True, metavar="ACTION")
    create = asub.add_parser("create", help="create a key for a tenant (printed once; etcd keeps its hash)")
    create.add_argument("--tenant", required=True)
    create.add_argument("--rate", type=float, default=0.0, help="submissions per second (0: unlimited)")
    create.add_argument("--burst", type=int, default=0)
    create.set_defaults(func=_apikey_create)

    drain = sub.add_parser("drain", help="ask a worker to drain and exit")
    drain.add_argument("worker_id")
    drain.set_defaults(func=_drain)

    models = sub.add_parser("models", help="model repository commands")
    msub = models.add_subparsers(required=True, metavar="ACTION")
    sync = msub.add_parser("sync", help="publish a repository's models to etcd and declare their queues")
    sync.add_argument("--model-repository")
    sync.set_defaults(func=_models_sync)
    demo = msub.add_parser("demo", help="write the demo models (mlp, cnn, transformer) into the repository")
    demo.add_argument("--model-repository")
    demo.add_argument("--overwrite", action="store_true")
    demo.set_defaults(func=_models_demo)

    up = sub.add_parser("up", help="run the whole stack locally (demo models by default)")
    up.add_argument("--model-repository")
    up.add_argument("--host")
    up.add_argument("--port", type=int)
    up.add_argument("--min-workers", type=int, default=1, help="workers kept per model (0 = scale to zero when idle)")
    up.set_defaults(func=_up)

    from benchmarks.cli import add_parser as add_bench

    add_bench(sub)

    services = sub.add_parser("services", help="start local RabbitMQ and etcd if installed and not running")
    services.set_defaults(func=_services)
    return parser


def _run(coro):
    """Run ``coro`` on uvloop and return its result."""
    import uvloop

    return uvloop.run(coro)


def _worker(settings: Settings, args: argparse.Namespace) -> int:
    from actors.shard import ShardWorker
    from runtime.repository import load_model

    entry = load_model(settings.model_repository, args.model)
    worker = ShardWorker(settings, entry, args.version)
    _run(worker.run())
    return 1 if worker.failure else 0


def _edge(settings: Settings, args: argparse.Namespace) -> int:
    from edge.server import EdgeServer

    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    server = EdgeServer(replace(settings, edge=replace(settings.edge, **overrides)))
    _run(server.run())
    return 1 if server.failure else 0


def _up(settings: Settings, args: argparse.Namespace) -> int:
    from runtime.up import prepare, up

    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    settings = replace(settings, edge=replace(settings.edge, **overrides))
    prepare(settings)
    if args.config:
        os.environ["INFERQ_CONFIG"] = str(Path(args.config).resolve())  # the children read the same file
    return _run(up(settings, args.min_workers))


def _autoscaler(settings: Settings, args: argparse.Namespace) -> int:
    from actors.autoscaler import Autoscaler

    scaler = Autoscaler(settings, args.launcher or settings.autoscaler.launcher)
    _run(scaler.run())
    return 1 if scaler.failure else 0


def _agent(settings: Settings, args: argparse.Namespace) -> int:
    from actors.agent import Agent

    agent = Agent(settings, args.node or settings.node, args.capacity)
    _run(agent.run())
    return 1 if agent.failure else 0


def _apikey_create(settings: Settings, args: argparse.Namespace) -> int:
    from edge.auth import create_key
    from runtime.coordination import open_etcd

    async def main() -> str:
        async with open_etcd(settings.etcd) as client:
            return await create_key(client, settings.namespace, args.tenant, args.rate, args.burst, settings.etcd.timeout_s)

    print(_run(main()))
    return 0


def _drain(settings: Settings, args: argparse.Namespace) -> int:
    from actors.launcher import drain
    from broker.connection import BrokerConnection
    from broker.topology import Topology

    async def main() -> None:
        async with await BrokerConnection.open(settings.broker, "inferq-drain") as connection:
            await drain(connection, Topology(settings.namespace), args.worker_id)

    _run(main())
    print(f"drain sent to {args.worker_id}")
    return 0


def _models_sync(settings: Settings, args: argparse.Namespace) -> int:
    from runtime.loader import sync_repository

    _run(sync_repository(settings))
    return 0


def _models_demo(settings: Settings, args: argparse.Namespace) -> int:
    from runtime.demo import write_demo_repository

    write_demo_repository(settings.model_repository, overwrite=args.overwrite)
    print(f"demo models in {settings.model_repository}")
    return 0


def _services(settings: Settings, args: argparse.Namespace) -> int:
    from urllib.parse import urlsplit

    from runtime.services import ensure_etcd, ensure_rabbitmq

    url = urlsplit(settings.broker.url)
    print("rabbitmq:", ensure_rabbitmq(url.hostname or "127.0.0.1", url.port or 5672))
    print("etcd:", ensure_etcd(settings.state_dir, settings.etcd.host, settings.etcd.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
