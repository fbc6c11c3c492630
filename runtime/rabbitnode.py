"""A RabbitMQ node of our own, for fault tests, benchmarks and the local cluster.

Debian's installed ``rabbitmq-server`` runs under its own node name, AMQP and
distribution ports, data and log folders, config files and Erlang cookie, all
under one folder. The machine's node (``rabbit@<host>`` on 5672) is never
touched: every command names our node, and signals go only to a pid that
carries our tag (see :mod:`inferq.runtime.daemon`).

Control goes through ``/usr/lib/rabbitmq/bin/rabbitmqctl -n <node>`` with HOME
at the folder holding our cookie; Debian's ``/usr/sbin`` wrapper would switch
to the rabbitmq user's cookie. ``NOTIFY_SOCKET`` is set (to a path nobody
listens on) so that ``rabbitmq-server`` execs the Erlang VM in place, as under
systemd, instead of keeping a shell in front of it: the pid we start is the
beam's, SIGKILL reaches the broker itself, and the parent-death signal holds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from inferq.errors import ServiceError
from inferq.runtime.daemon import Daemon
from inferq.runtime.services import free_port, reachable

log = logging.getLogger("inferq.rabbitnode")

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
HOST = "127.0.0.1"


@dataclass(frozen=True)
class NodeSpec:
    """Name and ports of one node; ``management_port`` 0 leaves the management plugin off."""

    name: str
    port: int
    dist_port: int
    management_port: int = 0

    @property
    def node(self) -> str:
        """The Erlang node name, ``name@localhost``."""
        return f"{self.name}@localhost"

    @property
    def url(self) -> str:
        """The AMQP URL of the node's default vhost (the node's own guest user)."""
        return f"amqp://guest:guest@{HOST}:{self.port}/"

    @classmethod
    def ephemeral(cls, prefix: str = "inferq-t", management: bool = False) -> NodeSpec:
        """A random node name on ports that are free now."""
        return cls(f"{prefix}{secrets.token_hex(4)}", free_port(), free_port(), free_port() if management else 0)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> NodeSpec:
        return cls(**json.loads(text))


class RabbitNode:
    """One RabbitMQ node under ``root``; ``home`` holds its Erlang cookie (a cluster shares one)."""

    def __init__(self, spec: NodeSpec, root: Path, home: Path | None = None, watch_parent: bool = True) -> None:
        self.spec = spec
        self.root = Path(root).resolve()
        self.home = Path(home).resolve() if home else self.root / "home"
        self.watch_parent = watch_parent
        self.tag = f"rabbitmq:{spec.node}:{self.root}"
        self._daemon: Daemon | None = None

    @property
    def url(self) -> str:
        return self.spec.url

    @property
    def pid(self) -> int | None:
        """The beam's OS pid while it runs."""
        return self._daemon.pid if self.running() else None

    def running(self) -> bool:
        return self._daemon is not None and self._daemon.alive()

    @classmethod
    def adopt(cls, spec: NodeSpec, root: Path, home: Path | None = None) -> RabbitNode:
        """The node under ``root`` that another process started, found through its pid file."""
        node = cls(spec, root, home, watch_parent=False)
        try:
            node._daemon = Daemon(node.tag, pid=int(node._path("beam.pid").read_text().strip()))
        except (OSError, ValueError):
            pass
        return node

    def launch(self) -> None:
        """Start the node and return at once (call from a thread that outlives it; see daemon)."""
        if self.running():
            raise ServiceError(f"RabbitMQ node {self.spec.node} is already running (pid {self.pid})")
        self._prepare()
        self._daemon = Daemon.spawn(
            self.tag, [str(RABBITMQ_BIN / "rabbitmq-server")], self._env(server=True),
            self._path("server.log"), cwd=self.root, watch_parent=self.watch_parent,
        )
        log.info("started RabbitMQ node %s (pid %s, amqp %s)", self.spec.node, self._daemon.pid, self.spec.port)

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Block until the node accepts AMQP and ``await_startup`` says it booted."""
        deadline = time.monotonic() + timeout
        while not reachable(HOST, self.spec.port):
            self._check_alive()
            if time.monotonic() > deadline:
                raise ServiceError(f"RabbitMQ node {self.spec.node} did not listen on {self.spec.port} in {timeout:.0f}s")
            time.sleep(0.2)
        while True:
            left = deadline - time.monotonic()
            try:
                self.ctl("await_startup", "--timeout", str(max(1, int(left))), timeout=max(5.0, left + 5))
                break
            except ServiceError:
                self._check_alive()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        self._check_pid()

    def start(self, timeout: float = 90.0) -> None:
        """Start the node and wait until it is ready."""
        self.launch()
        self.wait_ready(timeout)

    def kill(self) -> int:
        """SIGKILL the node's beam process (exactly that pid) and reap it; return the pid."""
        if not self.running():
            raise ServiceError(f"RabbitMQ node {self.spec.node} is not running")
        pid = self._daemon.pid
        self._daemon.kill()
        log.info("SIGKILLed RabbitMQ node %s (pid %s)", self.spec.node, pid)
        return pid

    def stop(self, timeout: float = 60.0) -> None:
        """Stop the node with ``rabbitmqctl stop``; SIGKILL it if it does not exit in time."""
        if not self.running():
            return
        try:
            self.ctl("stop", timeout=timeout)
        except ServiceError as exc:
            log.warning("rabbitmqctl stop failed, killing the node: %s", exc)
        if not self._daemon.wait(timeout):
            log.warning("RabbitMQ node %s did not exit in %.0fs; SIGKILL", self.spec.node, timeout)
        self._daemon.kill()

    def restart(self, timeout: float = 90.0) -> None:
        """Stop the node if it runs (a killed one is simply started), then start it on the same data."""
        self.stop(timeout)
        self.start(timeout)

    def set_vm_memory_high_watermark(self, fraction: float) -> None:
        """Set the memory alarm threshold (a fraction of RAM; a tiny one raises the alarm at once)."""
        self.ctl("set_vm_memory_high_watermark", f"{fraction:.10f}")

    def memory_alarm(self) -> bool:
        """Whether the node's memory alarm is raised (publishers are blocked while it is)."""
        return "resource_limit,memory" in self.ctl("eval", "rabbit_alarm:get_alarms().")

    def partition(self, peers: list[RabbitNode], seconds: float) -> None:
        """Cut this node off from ``peers`` for ``seconds``, then let it heal (fault tests).

        The node takes a cookie nobody else has and drops its links to the
        peers: neither side can connect again, so each sees the other down (a
        network partition as Erlang sees one). ``rabbitmqctl`` cannot reach the
        node meanwhile, so the heal (its own cookie back, a ping to each peer)
        is scheduled inside the node before the cut.
        """
        names = "[" + ",".join(f"'{p.spec.node}'" for p in peers) + "]"
        self.ctl("eval", (
            f"Cookie = erlang:get_cookie(), Peers = {names}, "
            f"spawn(fun() -> timer:sleep({int(seconds * 1000)}), erlang:set_cookie(Cookie), "
            "[net_adm:ping(P) || P <- Peers] end), "
            "erlang:set_cookie(inferq_partitioned), [erlang:disconnect_node(P) || P <- Peers], ok."
        ))
        log.info("partitioned RabbitMQ node %s from %s for %.0fs", self.spec.node, [p.spec.node for p in peers], seconds)

    def join_cluster(self, seed: RabbitNode, timeout: float = 60.0) -> None:
        """Reset this node and join it to ``seed``'s cluster (both must share an Erlang cookie)."""
        self.ctl("stop_app", timeout=timeout)
        self.ctl("reset", timeout=timeout)
        self.ctl("join_cluster", seed.spec.node, timeout=timeout)
        self.ctl("start_app", timeout=timeout)

    def ctl(self, *args: str, timeout: float = 30.0) -> str:
        """Run ``rabbitmqctl -n <node> ARGS`` and return its output."""
        cmd = [str(RABBITMQ_BIN / "rabbitmqctl"), "-n", self.spec.node, *args]
        try:
            done = subprocess.run(cmd, env=self._env(server=False), capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise ServiceError(f"rabbitmqctl {' '.join(args)} on {self.spec.node} timed out after {timeout:.0f}s") from exc
        if done.returncode != 0:
            raise ServiceError(f"rabbitmqctl {' '.join(args)} on {self.spec.node} failed: {(done.stderr or done.stdout)[-800:]}")
        return done.stdout

    async def astart(self, timeout: float = 90.0) -> None:
        """:meth:`start` without blocking the loop; the node is launched from the loop's thread."""
        self.launch()
        await asyncio.to_thread(self.wait_ready, timeout)

    async def astop(self, timeout: float = 60.0) -> None:
        await asyncio.to_thread(self.stop, timeout)

    async def arestart(self, timeout: float = 90.0) -> None:
        await self.astop(timeout)
        await self.astart(timeout)

    async def actl(self, *args: str, timeout: float = 30.0) -> str:
        return await asyncio.to_thread(self.ctl, *args, timeout=timeout)

    def log_tail(self, lines: int = 30) -> str:
        """The end of the node's log, for error messages."""
        path = self.root / "log" / f"{self.spec.node}.log"
        text = path.read_text(errors="replace") if path.exists() else self._path("server.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def _check_alive(self) -> None:
        if not self.running():
            code = self._daemon.exit_code() if self._daemon else None
            raise ServiceError(f"RabbitMQ node {self.spec.node} exited ({code}):\n{self.log_tail()}")

    def _check_pid(self) -> None:
        # The pid we would SIGKILL must be the one the node reports as its own.
        reported = int(self.ctl("eval", "os:getpid().").strip().strip('"'))
        if reported != self._daemon.pid:
            raise ServiceError(f"node {self.spec.node} reports pid {reported}, we started {self._daemon.pid}")

    def _path(self, name: str) -> Path:
        return self.root / name

    def _prepare(self) -> None:
        for folder in (self.root, self.home, self.root / "mnesia", self.root / "log"):
            folder.mkdir(parents=True, exist_ok=True)
        cookie = self.home / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(secrets.token_hex(20))
            cookie.chmod(0o400)
        self._path("rabbitmq-env.conf").write_text("")  # instead of /etc/rabbitmq/rabbitmq-env.conf
        self._path("enabled_plugins").write_text("[rabbitmq_management].\n" if self.spec.management_port else "[].\n")
        self._path("rabbitmq.conf").write_text(self._config())

    def _config(self) -> str:
        lines = [
            "log.console = false",
            "log.file.level = info",
            # A node that finds itself in a minority pauses instead of serving a split brain.
            "cluster_partition_handling = pause_minority",
        ]
        if self.spec.management_port:
            lines += [f"management.tcp.port = {self.spec.management_port}", f"management.tcp.ip = {HOST}"]
        return "\n".join(lines) + "\n"

    def _env(self, server: bool) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            HOME=str(self.home),
            RABBITMQ_NODENAME=self.spec.node,
            RABBITMQ_CONF_ENV_FILE=str(self._path("rabbitmq-env.conf")),
            RABBITMQ_CONFIG_FILE=str(self._path("rabbitmq.conf")),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self._path("enabled_plugins")),
            RABBITMQ_MNESIA_BASE=str(self.root / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.root / "log"),
        )
        if server:
            env.update(
                RABBITMQ_NODE_IP_ADDRESS=HOST,
                RABBITMQ_NODE_PORT=str(self.spec.port),
                RABBITMQ_DIST_PORT=str(self.spec.dist_port),
                RABBITMQ_PID_FILE=str(self._path("beam.pid")),
                RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
                NOTIFY_SOCKET=str(self._path("no-systemd")),
            )
        return env
