"""Local RabbitMQ and etcd for development and tests: start them when installed and not running.

Installing them is the Makefile's job (Debian packages); this module only
starts what is installed, with etcd's data under the project's state dir.
"""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import time
from pathlib import Path

log = logging.getLogger("inferq.services")


class ServiceError(RuntimeError):
    """A local service could not be started."""


def reachable(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections at host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _wait(host: str, port: int, what: str, timeout: float) -> None:
    # Synchronous on purpose: the CLI calls this before any event loop exists.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if reachable(host, port):
            return
        time.sleep(0.2)
    raise ServiceError(f"{what} did not come up on {host}:{port} within {timeout:.0f}s")


def ensure_rabbitmq(host: str = "127.0.0.1", port: int = 5672, timeout: float = 90.0) -> str:
    """Make sure RabbitMQ listens; start ``rabbitmq-server -detached`` if it is installed and down."""
    if reachable(host, port):
        return "running"
    if shutil.which("rabbitmq-server") is None:
        raise ServiceError("RabbitMQ is not reachable and not installed (Debian: apt-get install rabbitmq-server)")
    log.info("starting RabbitMQ")
    subprocess.run(["rabbitmq-server", "-detached"], check=False, timeout=60)
    _wait(host, port, "RabbitMQ", timeout)
    if shutil.which("rabbitmqctl"):
        subprocess.run(["rabbitmqctl", "await_startup"], check=False, timeout=timeout, capture_output=True)
    return "started"


def ensure_etcd(state_dir: Path, host: str = "127.0.0.1", port: int = 2379, timeout: float = 30.0) -> str:
    """Make sure etcd listens; start a local single-node etcd with data in ``state_dir/etcd``."""
    if reachable(host, port):
        return "running"
    binary = shutil.which("etcd")
    if binary is None:
        raise ServiceError("etcd is not reachable and not installed (Debian: apt-get install etcd-server)")
    state_dir.mkdir(parents=True, exist_ok=True)
    client, peer = f"http://{host}:{port}", f"http://{host}:{port + 1}"
    args = [
        binary, "--name", "inferq", "--data-dir", str(state_dir / "etcd"),
        "--listen-client-urls", client, "--advertise-client-urls", client,
        "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
        "--initial-cluster", f"inferq={peer}",
    ]
    log.info("starting etcd (data in %s)", state_dir / "etcd")
    with open(state_dir / "etcd.log", "ab") as out:
        subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    _wait(host, port, "etcd", timeout)
    return "started"
