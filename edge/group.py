"""``inferq edge --processes N``: N edge processes on one port, kept up by a parent.

One Python process caps out at a few thousand requests/s, so on a machine with
several cores the edge runs several. Each child is a whole edge (``inferq edge
--member I``): it binds the HTTP port with ``SO_REUSEPORT`` (and the gRPC port
likewise), so the kernel spreads new connections over them, and it tails the
ledger stream into a projection of its own, so every child answers the same
job states, as several edges on several machines already do. What must happen
once per namespace is already shared through etcd or the broker (webhook claims,
the idempotency store, the dead-letter and router queues' consumers); OpenTelemetry
spans, which every edge would export for every job, are exported by member 0 alone.

The parent is a :class:`~inferq.runtime.supervisor.Supervisor`: a crashed child
is restarted with backoff while the others keep serving, and a child that crash-
loops ends the parent with exit status 1 (``inferq up`` then restarts the whole
edge). SIGTERM or Ctrl-C reach the parent, which SIGTERMs every child so each
drains, and exits once they have.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import replace

from inferq.errors import ConfigError
from inferq.runtime.supervisor import ChildSpec, Supervisor
from inferq.settings import Settings

log = logging.getLogger("inferq.edge.group")

PID_HEADER = "inferq-edge-pid"  # which member answered, on every response of a member


def member_specs(settings: Settings, processes: int) -> list[ChildSpec]:
    """The children of an edge group: ``inferq edge --member I`` on the group's ports, with its settings."""
    if settings.edge.port == 0:
        raise ConfigError("--processes above 1 needs a fixed --port: members on port 0 would each get a port of their own")
    specs = []
    for member in range(processes):
        child = settings if member == 0 else replace(settings, metrics=replace(settings.metrics, otlp_endpoint=""))
        child = replace(child, edge=replace(child.edge, processes=1))
        args = ("edge", "--member", str(member), "--host", settings.edge.host, "--port", str(settings.edge.port),
                "--grpc-port", str(settings.edge.grpc_port))
        specs.append(ChildSpec(f"edge-{member}", args, child.resolved().to_env()))
    return specs


async def run_group(settings: Settings, processes: int) -> int:
    """Supervise ``processes`` edge members until SIGTERM/SIGINT (0) or until one crash-loops (1)."""
    specs = member_specs(settings, processes)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    supervisor = Supervisor("edge", ordered=False)
    try:
        for spec in specs:
            await supervisor.add(spec)
        log.info("edge group of %d processes on %s:%d: pids %s", processes, settings.edge.host, settings.edge.port,
                 sorted(supervisor.pids().values()))
        await _first(stop, supervisor.failed)
        if supervisor.failed.is_set():
            log.error("an edge process gave up (%s): stopping the group", supervisor.failure)
            return 1
        return 0
    finally:
        await supervisor.aclose()  # SIGTERM to every member at once: each drains its requests
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        log.info("edge group stopped")


async def _first(*events: asyncio.Event) -> None:
    """Return once any of ``events`` is set."""
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
        await asyncio.gather(*waits, return_exceptions=True)
