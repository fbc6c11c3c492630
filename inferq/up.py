"""``inferq up``: the whole stack on one machine, supervised.

The edge and the autoscaler (which starts the workers) run under a
:class:`~inferq.runtime.supervisor.Supervisor`: a crashed one is started again
with backoff, and five crashes within a minute end the stack with exit status 1.
Nothing is lost across a restart: accepted jobs wait in their quorum queues and
every result is in the ledger stream, which a restarted edge replays.

On Ctrl-C or SIGTERM the edge stops first and the autoscaler after it. The edge
going first closes the door: no job is accepted while the workers drain, so no
client holds a 202 for a job that then waits for the next start without a word.
The workers drain next (in-flight jobs finish and their results reach the
ledger, which needs no edge). The reverse order loses nothing either, as every
accepted job is durable, but it keeps taking jobs that nothing will run.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import socket
import sys
import time
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp

from inferq.broker.connection import BrokerConnection
from inferq.broker.topology import Topology
from inferq.errors import ConfigError, InferqError
from inferq.runtime.demo import write_demo_repository
from inferq.runtime.loader import sync_repository
from inferq.runtime.pidfile import PidFile
from inferq.runtime.services import ensure_etcd, ensure_rabbitmq
from inferq.runtime.supervisor import ChildSpec, Supervisor
from inferq.settings import Settings

log = logging.getLogger("inferq.up")

READY_TIMEOUT_S = 300.0  # the edge replays up to jobs.ttl_s of ledger before it listens
PROGRESS_EVERY_S = 5.0


def preflight(settings: Settings) -> PidFile:
    """Before anything starts: refuse a second stack of this namespace on this node, and a port in use.

    Returns the held pid file (``state_dir/up-<namespace>.pid``); release it when the stack has stopped.
    """
    path = settings.state_dir / f"up-{settings.namespace}.pid"
    pidfile = PidFile.acquire(path, f"inferq up for namespace {settings.namespace!r}")
    try:
        ensure_port_free(settings.edge.host, settings.edge.port)
    except ConfigError:
        pidfile.release()
        raise
    return pidfile


def refuse_running_stack(settings: Settings, doing: str) -> None:
    """ConfigError if an ``inferq up`` of ``settings.namespace`` runs on this node (it holds the pid file)."""
    path = settings.state_dir / f"up-{settings.namespace}.pid"
    if not path.exists():
        return
    try:
        PidFile.acquire(path, f"inferq up for namespace {settings.namespace!r}").release()
    except ConfigError as exc:
        raise ConfigError(f"{exc}: stop it (Ctrl-C) before {doing}") from None


def ensure_port_free(host: str, port: int) -> None:
    """ConfigError if ``host:port`` cannot be bound, tried the way the edge binds it (``SO_REUSEADDR``)."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; stop what holds it, "
                              "or choose another port with --port or INFERQ_EDGE_PORT") from None


def prepare(settings: Settings) -> None:
    """Start local RabbitMQ/etcd if needed and write the demo models into an empty repository."""
    if not settings.broker.urls:  # a cluster (broker.urls) is never ours to start
        url = urlsplit(settings.broker.url)
        ensure_rabbitmq(settings.state_dir, url.hostname or "127.0.0.1", url.port or 5672)
    if not settings.etcd.endpoints:
        ensure_etcd(settings.state_dir, settings.etcd.host, settings.etcd.port)
    repo = settings.model_repository
    if not repo.exists() or not any(repo.iterdir()):
        log.info("no models in %s: writing the demo models", repo)
        write_demo_repository(repo)


async def up(settings: Settings, min_workers: int) -> int:
    """Run the edge and the autoscaler until Ctrl-C/SIGTERM (0) or until one of them crash-loops (1)."""
    models = await sync_repository(settings)
    logs = settings.state_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    stop = _stop_on_signals()
    supervisor = Supervisor("up")
    try:
        for spec in _children(settings, min_workers, logs):
            await supervisor.add(spec)
        if await _wait_ready(settings, stop, supervisor):
            _banner(settings, models, logs)
        await _first(stop, supervisor.failed)
        if supervisor.failed.is_set():
            log.error("a component gave up (see above): stopping everything")
            return 1
        return 0
    finally:
        await supervisor.aclose()  # last added first: the edge, then the autoscaler (see the module docstring)
        _remove_signal_handlers()
        log.info("stopped")


def _children(settings: Settings, min_workers: int, logs: Path) -> list[ChildSpec]:
    """The autoscaler first, so workers warm up while the edge replays the ledger; the edge last."""
    env = replace(settings, autoscaler=replace(settings.autoscaler, min_workers=min_workers)).resolved().to_env()
    edge_args = ("edge", "--host", settings.edge.host, "--port", str(settings.edge.port),
                 "--processes", str(settings.edge.auto_processes()))
    return [
        ChildSpec("autoscaler", ("autoscaler", "--launcher", "local"), env, logs / "autoscaler.log"),
        ChildSpec("edge", edge_args, env, logs / "edge.log"),
    ]


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


def _remove_signal_handlers() -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(sig)


async def _first(*events: asyncio.Event) -> None:
    """Return once any of ``events`` is set."""
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
        await asyncio.gather(*waits, return_exceptions=True)


def _local_url(settings: Settings) -> str:
    host = settings.edge.host
    host = "127.0.0.1" if host in ("", "0.0.0.0") else "[::1]" if host == "::" else f"[{host}]" if ":" in host else host
    return f"http://{host}:{settings.edge.port}"


async def _wait_ready(settings: Settings, stop: asyncio.Event, supervisor: Supervisor) -> bool:
    """Poll the edge's ``/v2/health/ready`` until it answers 200, logging progress while it replays the ledger.

    False if a stop or a give-up came first, or the edge was not ready within ``READY_TIMEOUT_S``.
    """
    url = f"{_local_url(settings)}/v2/health/ready"
    started = time.monotonic()
    next_note = started + PROGRESS_EVERY_S
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as http:
        while not (stop.is_set() or supervisor.failed.is_set()):
            if await _ready(http, url):
                return True
            now = time.monotonic()
            if now - started > READY_TIMEOUT_S:
                log.warning("the edge is not ready after %.0fs; still supervising it (see its log)", now - started)
                return False
            if now >= next_note:
                next_note = now + PROGRESS_EVERY_S
                log.info("waiting for the edge to replay the ledger (%s), %.0fs so far", await _ledger_size(settings), now - started)
            await asyncio.sleep(0.2)
    return False


async def _ready(http: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with http.get(url) as resp:
            return resp.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


async def _ledger_size(settings: Settings) -> str:
    """How many events the ledger stream holds, as words for the progress line."""
    try:
        async with await BrokerConnection.open(settings.broker, "inferq-up") as connection:
            counts = await connection.queue_counts(Topology(settings.namespace, settings.broker.replicas).ledger)
    except InferqError as exc:
        return f"ledger size unknown: {exc}"
    return f"{counts[0]} events in the stream" if counts else "ledger size unknown"


def _banner(settings: Settings, models: list[str], logs: object) -> None:
    url = f"http://{settings.edge.host}:{settings.edge.port}"
    print(f"\ninferq is up: {url}   (models: {', '.join(models)}; logs in {logs})\n")
    if "mlp" in models:
        print(f"""  curl -sS -X POST {url}/v1/models/mlp/jobs -H 'Content-Type: application/json' \\
       -d '{{"inputs":[{{"name":"x","shape":[1,256],"datatype":"FP32","data":'"$(python3 -c 'print([0.1]*256)')"'}}]}}'
  curl -sS '{url}/v1/jobs/<job_id>?wait=10'
""")
    cli = _cli_hint()
    if cli:
        print(cli)
    print("Ctrl-C stops everything.", flush=True)


def _cli_hint() -> str | None:
    """Where the ``inferq`` command is, when a new shell would not find it (a venv that is not activated)."""
    script, found = Path(sys.argv[0]), shutil.which("inferq")
    if script.name != "inferq" or (found and Path(found).resolve() == script.resolve()):
        return None
    return f"The CLI is {script} (not on your PATH; or: . {script.parent}/activate)."
