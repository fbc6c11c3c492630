"""The ``inferq`` command line. Logging handlers are configured here and only here."""

from __future__ import annotations

import argparse
import os
import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from inferq.errors import InferqError
from inferq.settings import Settings

if TYPE_CHECKING:
    from inferq.runtime.actor import Actor

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
    from inferq.runtime.lifeline import arm

    args.lifeline = arm()  # before anything else: a child of inferq dies with its parent
    if args.lifeline is not None and not args.lifeline.intact():
        log.warning("parent process %d is already gone; not starting", args.lifeline.parent)
        return 0
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
    worker.add_argument("--variant", default="", help="serve this device variant of the version (agents pass the one they chose)")
    worker.add_argument("--id-suffix", type=_id_suffix, help="last part of the worker id (launchers pass the one in the log file's name)")
    _metrics_port(worker)
    worker.set_defaults(func=_worker)

    edge = sub.add_parser("edge", help="run the HTTP edge")
    edge.add_argument("--host")
    edge.add_argument("--port", type=int)
    edge.add_argument("--grpc-port", type=int, help="KServe v2 gRPC port (default: settings, 8001; 0 = off)")
    edge.add_argument("--processes", type=_positive, help="edge processes sharing the ports, supervised by this one "
                                                          "(default: edge.processes, else 1)")
    edge.add_argument("--member", type=int, help=argparse.SUPPRESS)  # a child of --processes: binds with SO_REUSEPORT
    edge.set_defaults(func=_edge)

    autoscaler = sub.add_parser("autoscaler", help="run the autoscaler (one acts; others stand by)")
    autoscaler.add_argument("--launcher", choices=["local", "agent", "kubernetes", "none"],
                            help="how workers are started (default: config; none: decisions only, for KEDA)")
    autoscaler.add_argument("--model-repository")
    _metrics_port(autoscaler)
    autoscaler.set_defaults(func=_autoscaler)

    agent = sub.add_parser("agent", help="run the edge-node agent that starts workers on this node (and: join tokens, install)")
    from inferq.agent_cli import add_commands as add_agent

    add_agent(agent, _agent)
    _metrics_port(agent)

    apikey = sub.add_parser("apikey", help="API keys for the HTTP edge")
    asub = apikey.add_subparsers(required=True, metavar="ACTION")
    create = asub.add_parser("create", help="create a key for a tenant (printed once; etcd keeps its hash)")
    create.add_argument("--tenant", required=True)
    create.add_argument("--rate", type=float, default=0.0, help="submissions per second (0: unlimited)")
    create.add_argument("--burst", type=int, default=0)
    create.add_argument("--role", choices=["user", "admin", "node"], default="user",
                        help="admin may also load, unload and change models; node may download model artifacts")
    create.add_argument("--max-priority", choices=["high", "normal"], default="high",
                        help="normal: this tenant's jobs never go ahead of bulk work")
    create.set_defaults(func=_apikey_create)
    rotate = asub.add_parser("rotate", help="replace each of a tenant's keys by a new one (printed once); the old ones stop at once")
    rotate.add_argument("--tenant", required=True)
    rotate.set_defaults(func=_apikey_rotate)

    tenant = sub.add_parser("tenant", help="tenants: API keys and RabbitMQ users for AMQP access")
    tsub = tenant.add_subparsers(required=True, metavar="ACTION")
    tcreate = tsub.add_parser("create", help="a tenant with an API key and, with --amqp, a broker user (secrets printed once)")
    tcreate.add_argument("name")
    tcreate.add_argument("--rate", type=float, default=0.0, help="submissions per second, over HTTP and over AMQP (0: unlimited)")
    tcreate.add_argument("--burst", type=int, default=0)
    tcreate.add_argument("--role", choices=["user", "admin"], default="user", help="admin may also load and unload models")
    tcreate.add_argument("--amqp", action="store_true", help="also a RabbitMQ user that may publish jobs and read its replies")
    tcreate.set_defaults(func=_tenant_create)
    tlist = tsub.add_parser("list", help="tenants with their keys and broker users")
    tlist.set_defaults(func=_tenant_list)
    tdelete = tsub.add_parser("delete", help="revoke a tenant's keys and delete its broker users, at once")
    tdelete.add_argument("name")
    tdelete.set_defaults(func=_tenant_delete)
    whsec = tsub.add_parser("webhook-secret", help="show (making it if needed) the tenant's webhook signing secret")
    whsec.add_argument("name")
    whsec.add_argument("--rotate", action="store_true", help="a new secret; the previous one also signs for 24 h")
    whsec.set_defaults(func=_tenant_webhook_secret)
    service = tsub.add_parser("service-user", help="create or update inferq's own broker user (that of broker.url) with its permissions")
    service.set_defaults(func=_tenant_service_user)

    drain = sub.add_parser("drain", help="ask a worker to drain and exit")
    drain.add_argument("worker_id")
    drain.set_defaults(func=_drain)

    client = _client_options()
    submit = sub.add_parser("submit", parents=[client], help="submit jobs to an edge (files in, files out)",
                            description="One job from --input files, or one job per .npy/.npz file of --inputs-dir "
                                        "(outputs written beside each input as <name>.out.npz).")
    submit.add_argument("model")
    given = submit.add_mutually_exclusive_group(required=True)
    given.add_argument("--input", action="append", default=[], metavar="NAME=FILE.npy",
                       help="an input tensor (repeat for several); FILE.npz alone gives named inputs")
    given.add_argument("--inputs-dir", metavar="DIR", help="every .npy (the model's one input) or .npz (named inputs) in DIR")
    submit.add_argument("--version", help="pin a model version (default: the model's default)")
    submit.add_argument("--wait", action="store_true", help="wait for the job and print its document")
    submit.add_argument("--output", metavar="DIR", help="write each output as DIR/<output>.npy (implies --wait)")
    submit.add_argument("--ttl", type=float, help="seconds the job may wait in its queue before it expires")
    submit.add_argument("--timeout", type=float, help="seconds to wait for each result (default: as long as it takes)")
    submit.add_argument("--concurrency", type=int, default=16, help="jobs in flight with --inputs-dir (default 16)")
    submit.set_defaults(func=_client_command, command="submit")

    jobs = sub.add_parser("jobs", help="look at, watch, list, wait for or cancel jobs")
    jsub = jobs.add_subparsers(required=True, metavar="ACTION")
    for action, text in (("get", "print the job's document now"), ("wait", "wait until the job is final (exit 1 unless it succeeded)"),
                         ("cancel", "cancel the job if it is still queued")):
        command = jsub.add_parser(action, parents=[client], help=text)
        command.add_argument("job_id")
        if action != "cancel":
            command.add_argument("--output", metavar="DIR", help="write each output as DIR/<output>.npy")
        if action == "wait":
            command.add_argument("--timeout", type=float, help="give up after this many seconds")
        command.set_defaults(func=_client_command, command=f"jobs_{action}")
    watch = jsub.add_parser("watch", parents=[client], help="print the job's document at each change until it is final")
    watch.add_argument("job_id")
    watch.set_defaults(func=_client_command, command="jobs_watch")
    jlist = jsub.add_parser("list", parents=[client], help="your jobs, newest first (one line each)")
    jlist.add_argument("--model")
    jlist.add_argument("--version")
    jlist.add_argument("--status", choices=["queued", "running", "succeeded", "failed", "cancelled", "expired"])
    jlist.add_argument("--limit", type=int, default=100, help="jobs to print (default 100; pages of at most 1000)")
    jlist.add_argument("--stats", action="store_true", help="print the counts by status instead")
    jlist.set_defaults(func=_client_command, command="jobs_list")

    models = sub.add_parser("models", help="the model registry: push, pull, aliases, traffic, shadow, removal, sync")
    msub = models.add_subparsers(required=True, metavar="ACTION")
    listing = msub.add_parser("list", parents=[client], help="the models an edge serves: versions, inputs, workers, queue")
    listing.set_defaults(func=_client_command, command="models_list")
    sync = msub.add_parser("sync", help="push every version of a repository to the registry and declare their queues")
    sync.add_argument("--model-repository")
    sync.add_argument("--prune", action="store_true", help="also remove models and versions the repository no longer has")
    sync.set_defaults(func=_models_sync)
    from inferq.models_cli import add_commands

    add_commands(msub, client)
    demo = msub.add_parser("demo", help="write the demo models (mlp, cnn, transformer) into the repository")
    demo.add_argument("--model-repository")
    demo.add_argument("--overwrite", action="store_true")
    demo.set_defaults(func=_models_demo)

    up = sub.add_parser("up", help="run the whole stack locally (demo models by default)")
    up.add_argument("--model-repository")
    up.add_argument("--host")
    up.add_argument("--port", type=int)
    up.add_argument("--min-workers", type=int, default=1, help="workers kept per model (0 = scale to zero when idle)")
    up.add_argument("--edge-processes", type=_positive, help="edge processes sharing the port "
                                                             "(default: edge.processes, else one per two cores, 1 to 4)")
    up.set_defaults(func=_up)

    from inferq.benchmarks.cli import add_parser as add_bench

    add_bench(sub)

    services = sub.add_parser("services", help="start local RabbitMQ and etcd if installed and not running")
    services.add_argument("--stop", nargs="*", choices=["rabbitmq", "etcd"], metavar="SERVICE",
                          help="instead: stop the RabbitMQ and etcd (or only those named) that `inferq services` started here")
    services.add_argument("--cluster", type=int, metavar="N", help="instead: a local N-node RabbitMQ + N-member etcd cluster")
    services.add_argument("--cluster-stop", action="store_true", help="stop the local cluster and remove its data")
    services.add_argument("--min-open-files", type=int, default=0, metavar="N",
                          help="restart a local RabbitMQ (as root) that may open fewer than N files, with the most allowed")
    services.set_defaults(func=_services)

    namespace = sub.add_parser("namespace", help="a namespace's queues, streams, exchanges and etcd keys")
    nsub = namespace.add_subparsers(required=True, metavar="ACTION")
    reset = nsub.add_parser("reset", help="delete everything a namespace holds (asks first)")
    reset.add_argument("name", help="the namespace (the default one is 'inferq')")
    reset.add_argument("--yes", action="store_true", help="do not ask")
    reset.set_defaults(func=_namespace_reset)
    return parser


def _metrics_port(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port (default: settings "
                        "metrics.port, 0 = off; -1 = any free port, advertised in etcd)")


def _with_metrics(settings: Settings, args: argparse.Namespace) -> Settings:
    """``settings`` with ``--metrics-port`` applied."""
    if getattr(args, "metrics_port", None) is None:
        return settings
    return replace(settings, metrics=replace(settings.metrics, port=args.metrics_port))


def _client_options() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--url", help="the edge (default: $INFERQ_URL, else http://<edge.host>:<edge.port> from settings)")
    options.add_argument("--api-key", default=os.environ.get("INFERQ_API_KEY"), help="API key (default: $INFERQ_API_KEY)")
    return options


def edge_url(settings: Settings, url: str | None = None) -> str:
    """Where the client commands find the edge: --url, $INFERQ_URL, or the edge settings."""
    if url or os.environ.get("INFERQ_URL"):
        return url or os.environ["INFERQ_URL"]
    host = settings.edge.host if settings.edge.host not in ("", "0.0.0.0", "::") else "127.0.0.1"
    return f"http://{host}:{settings.edge.port}"


def _client_command(settings: Settings, args: argparse.Namespace) -> int:
    # Client code only, imported here: these commands run where only the client is installed.
    import asyncio

    from inferq.client import commands
    from inferq.client.http import AsyncClient

    async def main() -> int:
        async with AsyncClient(edge_url(settings, args.url), args.api_key) as client:
            return await getattr(commands, args.command)(client, args)

    return asyncio.run(main())


def _run(coro):
    """Run ``coro`` on uvloop and return its result."""
    import uvloop

    return uvloop.run(coro)


def _run_actor(actor: Actor, args: argparse.Namespace) -> int:
    """Run an actor until it stops (signal, failure, or its parent gone); 1 if it failed."""
    from inferq.runtime.lifeline import guarding

    async def main() -> None:
        async with guarding(args.lifeline, actor.request_stop):
            await actor.run()

    _run(main())
    return 1 if actor.failure else 0


def _worker(settings: Settings, args: argparse.Namespace) -> int:
    from inferq.actors.shard import ShardWorker
    from inferq.runtime.versions import load_entry

    # From the registry: the repository's files when they are the recorded bytes, else fetched from the edge.
    settings = _with_metrics(settings, args)
    entry = _run(load_entry(settings, args.model, args.version, args.variant))
    return _run_actor(ShardWorker(settings, entry, args.version, args.id_suffix, args.variant), args)


def _id_suffix(text: str) -> str:
    # It ends up in routing keys (worker.<id>) and etcd keys: letters and digits only.
    if not (text.isascii() and text.isalnum() and len(text) <= 32):
        raise argparse.ArgumentTypeError(f"{text!r} is not 1-32 letters and digits")
    return text


def _edge(settings: Settings, args: argparse.Namespace) -> int:
    from inferq.edge.server import EdgeServer
    from inferq.up import ensure_port_free

    overrides = {k: v for k, v in (("host", args.host), ("port", args.port), ("grpc_port", args.grpc_port)) if v is not None}
    settings = replace(settings, edge=replace(settings.edge, **overrides))
    if args.member is not None:  # the group's parent checked the ports; its siblings hold them now
        return _run_actor(EdgeServer(settings, member=args.member), args)
    for port in (settings.edge.port, settings.edge.grpc_port):
        if port:  # one clear line now, not a traceback after the replay
            ensure_port_free(settings.edge.host, port)
    processes = args.processes or settings.edge.processes or 1
    if processes > 1:
        from inferq.edge.group import run_group

        return _run(run_group(settings, processes))
    return _run_actor(EdgeServer(settings), args)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not 1 or more")
    return value


def _up(settings: Settings, args: argparse.Namespace) -> int:
    from inferq.up import preflight, prepare, up

    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    settings = replace(settings, edge=replace(settings.edge, **overrides))
    settings = replace(settings, edge=replace(settings.edge, processes=args.edge_processes or settings.edge.auto_processes()))
    with preflight(settings):
        prepare(settings)
        return _run(up(settings, args.min_workers))


def _autoscaler(settings: Settings, args: argparse.Namespace) -> int:
    from inferq.actors.autoscaler import Autoscaler

    return _run_actor(Autoscaler(_with_metrics(settings, args), args.launcher or settings.autoscaler.launcher), args)


def _agent(settings: Settings, args: argparse.Namespace) -> int:
    from inferq.agent_cli import run_agent

    return run_agent(_with_metrics(settings, args), args, _run_actor)


def _apikey_create(settings: Settings, args: argparse.Namespace) -> int:
    from inferq.edge.auth import create_key
    from inferq.runtime.coordination import open_etcd

    async def main() -> str:
        async with open_etcd(settings.etcd) as client:
            return await create_key(client, settings.namespace, args.tenant, args.rate, args.burst, settings.etcd.timeout_s,
                                    args.role, args.max_priority)

    print(_run(main()))
    return 0


def _apikey_rotate(settings: Settings, args: argparse.Namespace) -> int:
    from inferq.tenants import rotate_keys

    for key in _run(rotate_keys(settings, args.tenant)):
        print(key)
    return 0


def _tenant_create(settings: Settings, args: argparse.Namespace) -> int:
    from inferq.tenants import create_tenant

    made = _run(create_tenant(settings, args.name, args.rate, args.burst, args.role, args.amqp))
    print(f"tenant: {made.name}\napi_key: {made.api_key or '(its keys stay as they are)'}")
    if made.amqp_user:
        print(f"amqp_user: {made.amqp_user}\namqp_password: {made.amqp_password}\namqp_url: {made.amqp_url}\n"
              f"reply_queues: {made.reply_prefix}*")
    print("(the key and password are shown once: etcd keeps only the key's SHA-256)", file=sys.stderr)
    return 0


def _tenant_list(settings: Settings, args: argparse.Namespace) -> int:
    from inferq.tenants import list_tenants

    print(f"{'tenant':20} {'keys':>4} {'roles':12} {'rate/s':>8} {'burst':>6}  amqp users")
    for t in _run(list_tenants(settings)):
        print(f"{t.name:20} {t.keys:>4} {','.join(t.roles) or '-':12} {t.rate_per_s:>8g} {t.burst:>6}  {' '.join(t.amqp_users) or '-'}")
    return 0


def _tenant_webhook_secret(settings: Settings, args: argparse.Namespace) -> int:
    from inferq.tenants import webhook_secret

    record = _run(webhook_secret(settings, args.name, args.rotate))
    print(f"tenant: {args.name}\nwebhook_secret: {record.current}")
    if record.previous and args.rotate:
        print("the previous secret also signs for the next 24 h")
    return 0


def _tenant_delete(settings: Settings, args: argparse.Namespace) -> int:
    from inferq.tenants import delete_tenant

    gone = _run(delete_tenant(settings, args.name))
    print(f"tenant {gone.name}: {gone.keys} API keys revoked, broker users deleted: {' '.join(gone.amqp_users) or 'none'}")
    return 0


def _tenant_service_user(settings: Settings, args: argparse.Namespace) -> int:
    from inferq.tenants import ensure_service_user

    print(f"service user {_run(ensure_service_user(settings))} has the permissions of namespace {settings.namespace}")
    return 0


def _drain(settings: Settings, args: argparse.Namespace) -> int:
    from inferq.actors.launcher import drain
    from inferq.broker.connection import BrokerConnection
    from inferq.broker.topology import Topology

    async def main() -> None:
        async with await BrokerConnection.open(settings.broker, "inferq-drain") as connection:
            await drain(connection, Topology(settings.namespace, settings.broker.replicas), args.worker_id)

    _run(main())
    print(f"drain sent to {args.worker_id}")
    return 0


def _models_sync(settings: Settings, args: argparse.Namespace) -> int:
    from inferq.runtime.loader import sync_repository

    names = _run(sync_repository(settings, prune=args.prune))
    print(f"synced {len(names)} model(s) from {settings.model_repository}: {', '.join(names) or '-'}")
    return 0


def _models_demo(settings: Settings, args: argparse.Namespace) -> int:
    from inferq.runtime.demo import write_demo_repository

    write_demo_repository(settings.model_repository, overwrite=args.overwrite)
    print(f"demo models in {settings.model_repository}")
    return 0


def _services(settings: Settings, args: argparse.Namespace) -> int:
    if args.cluster is not None or args.cluster_stop:
        return _cluster(settings, args)
    if args.stop is not None:
        return _services_stop(settings, tuple(args.stop) or ("rabbitmq", "etcd"))
    from urllib.parse import urlsplit

    from inferq.errors import ServiceError
    from inferq.runtime.services import ensure_etcd, ensure_management, ensure_rabbitmq

    if settings.broker.urls or settings.etcd.endpoints:
        log.warning("broker.urls / etcd.endpoints name a cluster: `inferq services` starts only single local services")
    url = urlsplit(settings.broker.url)
    print("rabbitmq:", ensure_rabbitmq(settings.state_dir, url.hostname or "127.0.0.1", url.port or 5672,
                                       min_open_files=args.min_open_files))
    management = urlsplit(settings.tenancy.management_url)
    if management.hostname in ("127.0.0.1", "localhost"):  # only a local node's plugins can be enabled from here
        try:  # needed by `inferq tenant` only: the rest runs without it
            print("rabbitmq management:", ensure_management(management.hostname, management.port or 15672))
        except ServiceError as exc:
            print(f"rabbitmq management: unavailable ({exc}); `inferq tenant` needs it")
    print("etcd:", ensure_etcd(settings.state_dir, settings.etcd.host, settings.etcd.port))
    return 0


def _services_stop(settings: Settings, which: tuple[str, ...]) -> int:
    from inferq.errors import ServiceError
    from inferq.runtime.services import etcd_using, stop_services

    for name, outcome in stop_services(settings.state_dir, which).items():
        print(f"{name}: {outcome}")
    data_dir = settings.state_dir / "etcd"
    others = etcd_using(data_dir) if "etcd" in which else []
    if others:  # started some other way (an older inferq, by hand): its data would go with `make clean`
        raise ServiceError(f"etcd pid {', '.join(map(str, others))} keeps its data in {data_dir} and was not started "
                           "by `inferq services` here: stop it yourself")
    return 0


def _namespace_reset(settings: Settings, args: argparse.Namespace) -> int:
    from inferq.runtime.namespace import check_namespace, remove_namespace, survey
    from inferq.up import refuse_running_stack

    settings = replace(settings, namespace=check_namespace(args.name))
    refuse_running_stack(settings, "resetting its namespace")
    footprint = _run(survey(settings))
    if footprint.empty:
        print(f"namespace {settings.namespace!r} holds nothing: nothing to remove")
        return 0
    print(footprint.describe())
    if not args.yes and not _confirmed(f"Delete all of it? Type the namespace name ({settings.namespace}) to confirm: ",
                                       settings.namespace):
        print("nothing removed")
        return 1
    done = _run(remove_namespace(settings, footprint))
    print(f"namespace {settings.namespace!r} reset: {len(done.queues)} queues and {done.etcd_keys} etcd keys deleted")
    return 0


def _confirmed(prompt: str, expected: str) -> bool:
    try:
        return input(prompt).strip() == expected
    except EOFError:  # stdin closed or not a terminal: no answer is no
        print()
        return False


def _cluster(settings: Settings, args: argparse.Namespace) -> int:
    from inferq.runtime.cluster import start_local, stop_local

    if args.cluster_stop:
        print(stop_local(settings.state_dir))
        return 0
    cluster, state = start_local(settings.state_dir, args.cluster)
    print(f"local cluster {state}\n{cluster.describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
