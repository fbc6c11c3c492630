"""BentoML and Ray Serve peers: servers in virtualenvs of their own, started and stopped by the harness.

Each peer runs under the interpreter of its virtualenv (``.venv-bench-bentoml``, ``.venv-bench-ray``, made
by ``make bench`` from ``benchmarks/peers/requirements-*.txt``), from ``benchmarks/peers/``, so neither
BentoML nor Ray enters the project's environment. Every process a peer starts inherits a marker in its
environment (``BENCH_PEER_TAG``); after the stop, the harness looks for processes with that marker
(Ray renames its workers ``ray::...``, so their command lines do not tell), kills any it finds, and
records how many there were.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from inferq.benchmarks.procs import ROOT, Children

PEERS_DIR = Path(__file__).resolve().parent / "peers"


def venv_python(name: str) -> Path:
    return ROOT / f".venv-bench-{name}" / "bin" / "python"


def version(name: str, module: str) -> str | None:
    """The peer's version from its own virtualenv, or None if that virtualenv is missing."""
    python = venv_python(name)
    if not python.exists():
        return None
    try:
        out = subprocess.run([str(python), "-c", f"import {module}; print({module}.__version__)"],
                             capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tagged_pids(tag: str) -> list[int]:
    """Processes whose environment carries ``BENCH_PEER_TAG=tag``."""
    needle = f"BENCH_PEER_TAG={tag}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


class HttpPeer:
    """One peer server (``kind``: bentoml, bentoml_task or ray) on a free port of 127.0.0.1."""

    def __init__(self, kind: str, children: Children, logs: Path) -> None:
        self.kind = kind
        self.children = children
        self.logs = logs
        self.proc: subprocess.Popen[Any] | None = None
        self.port = 0
        self.tag = ""
        self.leftovers: list[int] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _argv(self) -> list[str]:
        if self.kind == "ray":
            return [str(venv_python("ray")), "ray_serve.py", str(self.port), f"/tmp/rb-{self.tag[:8]}"]
        service = "MlpTask" if self.kind == "bentoml_task" else "MlpApi"
        return [str(venv_python("bentoml")), "-m", "bentoml", "serve", f"bentoml_service:{service}",
                "--host", "127.0.0.1", "--port", str(self.port)]

    def start(self, model_path: Path, threads: int, timeout: float = 120.0) -> None:
        self.port, self.tag = free_port(), uuid.uuid4().hex
        env = {"BENCH_MODEL_PATH": str(model_path), "BENCH_ORT_THREADS": str(threads), "BENCH_PEER_TAG": self.tag,
               "PYTHONUNBUFFERED": "1",
               # Ray starts its workers at nice 15; at 0 they compete for CPU on equal terms
               "RAY_worker_niceness": "0", "RAY_USAGE_STATS_ENABLED": "0",
               "BENTOML_DO_NOT_TRACK": "true"}
        log = self.logs / f"{self.kind}.log"
        self.proc = self.children.start(self.kind, self._argv(), env, log, cwd=PEERS_DIR)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited with {self.proc.returncode}: {log.read_text(errors='replace')[-2000:]}")
            if self._answers():
                return
            time.sleep(0.5)
        raise RuntimeError(f"{self.kind} did not answer within {timeout:.0f}s; see {log}")

    def _answers(self) -> bool:
        path = "/-/routes" if self.kind == "ray" else "/readyz"
        try:
            with urllib.request.urlopen(self.url + path, timeout=2) as resp:
                return resp.status == 200 and (self.kind != "ray" or b"/" in resp.read())
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        """SIGTERM (each peer's own clean shutdown), then its group; then any tagged process left over."""
        if self.proc is not None:
            self.children.stop(self.proc, grace_s=30)
            self.proc = None
        if not self.tag:
            return
        left = tagged_pids(self.tag)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)  # ours: it carries this run's tag
            except (ProcessLookupError, PermissionError):
                pass
        self.leftovers += left
        deadline = time.monotonic() + 10
        while (still := tagged_pids(self.tag)) and time.monotonic() < deadline:
            time.sleep(0.2)
        if still:
            raise RuntimeError(f"{self.kind}: processes {still} survived SIGKILL")
        if self.kind == "ray":
            import shutil

            shutil.rmtree(f"/tmp/rb-{self.tag[:8]}", ignore_errors=True)
        self.tag = ""

    def pids(self) -> dict[str, int]:
        return {"server": self.proc.pid} if self.proc else {}
