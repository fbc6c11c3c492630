"""One member of a local etcd cluster, run from Debian's ``etcd`` binary with its own ports and data folder."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from inferq.errors import ServiceError
from inferq.runtime.daemon import Daemon
from inferq.runtime.services import free_port

log = logging.getLogger("inferq.etcdnode")

HOST = "127.0.0.1"


@dataclass(frozen=True)
class EtcdMemberSpec:
    """Name and ports of one member."""

    name: str
    client_port: int
    peer_port: int

    @property
    def endpoint(self) -> str:
        """``host:port`` of the client API, as ``etcd.endpoints`` lists it."""
        return f"{HOST}:{self.client_port}"

    @property
    def client_url(self) -> str:
        return f"http://{HOST}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{HOST}:{self.peer_port}"

    @classmethod
    def ephemeral(cls, name: str) -> EtcdMemberSpec:
        return cls(name, free_port(), free_port())

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> EtcdMemberSpec:
        return cls(**json.loads(text))


class EtcdMember:
    """One etcd member under ``root``; ``peers`` is the whole cluster, this member included."""

    def __init__(self, spec: EtcdMemberSpec, root: Path, peers: list[EtcdMemberSpec], token: str,
                 watch_parent: bool = True) -> None:
        self.spec = spec
        self.root = Path(root).resolve()
        self.peers = peers
        self.token = token
        self.watch_parent = watch_parent
        self.tag = f"etcd:{spec.name}:{self.root}"
        self._daemon: Daemon | None = None

    @classmethod
    def adopt(cls, spec: EtcdMemberSpec, root: Path, peers: list[EtcdMemberSpec], token: str) -> EtcdMember:
        """The member under ``root`` that another process started, found through the pid file we wrote."""
        member = cls(spec, root, peers, token, watch_parent=False)
        try:
            member._daemon = Daemon(member.tag, pid=int((member.root / "etcd.pid").read_text()))
        except (OSError, ValueError):
            pass
        return member

    @property
    def pid(self) -> int | None:
        return self._daemon.pid if self.running() else None

    def running(self) -> bool:
        return self._daemon is not None and self._daemon.alive()

    def launch(self) -> None:
        """Start the member and return at once; it is healthy only once a quorum of peers runs."""
        binary = shutil.which("etcd")
        if binary is None:
            raise ServiceError("etcd is not installed (Debian: apt-get install etcd-server)")
        if self.running():
            raise ServiceError(f"etcd member {self.spec.name} is already running (pid {self.pid})")
        self.root.mkdir(parents=True, exist_ok=True)
        self._daemon = Daemon.spawn(self.tag, [binary, *self._args()], {"PATH": "/usr/bin:/bin"},
                                    self.root / "etcd.log", cwd=self.root, watch_parent=self.watch_parent)
        (self.root / "etcd.pid").write_text(str(self._daemon.pid))
        log.info("started etcd member %s (pid %s, client %s)", self.spec.name, self._daemon.pid, self.spec.endpoint)

    def healthy(self) -> bool:
        """Whether this member answers ``/health`` with a leader in sight."""
        try:
            with urllib.request.urlopen(f"{self.spec.client_url}/health", timeout=2) as resp:
                return json.loads(resp.read()).get("health") == "true"
        except (OSError, ValueError, urllib.error.URLError):
            return False

    def status(self) -> dict | None:
        """The member's ``/v3/maintenance/status`` (its id, the leader's id), None if it does not answer."""
        request = urllib.request.Request(f"{self.spec.client_url}/v3/maintenance/status", b"{}", method="POST")
        try:
            with urllib.request.urlopen(request, timeout=2) as resp:
                return json.loads(resp.read())
        except (OSError, ValueError, urllib.error.URLError):
            return None

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until the member is healthy."""
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if not self.running():
                raise ServiceError(f"etcd member {self.spec.name} exited:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise ServiceError(f"etcd member {self.spec.name} was not healthy in {timeout:.0f}s:\n{self.log_tail()}")
            time.sleep(0.2)

    def kill(self) -> int:
        """SIGKILL exactly this member's process; return its pid."""
        if not self.running():
            raise ServiceError(f"etcd member {self.spec.name} is not running")
        pid = self._daemon.pid
        self._daemon.kill()
        return pid

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (etcd shuts down cleanly on it), SIGKILL if it does not exit in time."""
        if not self.running():
            return
        self._daemon.signal(signal.SIGTERM)
        if not self._daemon.wait(timeout):
            log.warning("etcd member %s did not exit in %.0fs; SIGKILL", self.spec.name, timeout)
        self._daemon.kill()

    def log_tail(self, lines: int = 20) -> str:
        path = self.root / "etcd.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def _args(self) -> list[str]:
        spec = self.spec
        cluster = ",".join(f"{p.name}={p.peer_url}" for p in self.peers)
        return [
            "--name", spec.name, "--data-dir", str(self.root / "data"), "--logger", "zap",
            "--listen-client-urls", spec.client_url, "--advertise-client-urls", spec.client_url,
            "--listen-peer-urls", spec.peer_url, "--initial-advertise-peer-urls", spec.peer_url,
            "--initial-cluster", cluster, "--initial-cluster-token", self.token, "--initial-cluster-state", "new",
        ]
