"""An isolated inferq stack for one bench run: its own namespace, model repository, edge and workers.

The namespace (``bench<hex>``) keeps the run apart from any stack or test
session on the same broker and etcd; :meth:`Stack.remove_namespace` deletes its
queues, exchanges and etcd keys at the end.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

from inferq.benchmarks.procs import Children, python_argv
from inferq.settings import Settings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_LOOP: asyncio.AbstractEventLoop | None = None


def run_async(coro: Any) -> Any:
    """Run one coroutine to completion on the harness's one event loop (the harness itself is synchronous).

    One loop for the whole run: etcd's gRPC client binds itself to the first loop it runs on.
    """
    global _LOOP
    if _LOOP is None or _LOOP.is_closed():
        _LOOP = asyncio.new_event_loop()
    return _LOOP.run_until_complete(coro)


async def until(check: Any, timeout: float, interval: float = 0.1) -> None:
    """Await ``check()`` every ``interval`` seconds until it is true; TimeoutError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {timeout}s")
        await asyncio.sleep(interval)


class Stack:
    """Edge + one worker per model, as child processes of the harness."""

    def __init__(self, settings: Settings, workdir: Path, children: Children) -> None:
        self.settings = settings
        self.workdir = workdir
        self.children = children
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.edge: subprocess.Popen[Any] | None = None
        self.workers: dict[str, subprocess.Popen[Any]] = {}
        self.worker_ids: dict[str, str] = {}
        self._synced = False

    @classmethod
    def create(cls, base: Settings, namespace: str, workdir: Path, models: list[str], children: Children,
               intra_op_threads: int | None = None) -> Stack:
        """``intra_op_threads`` (optional) goes into each model's config.toml: the worker and the raw run both use it."""
        from inferq.runtime.demo import write_demo_repository

        repo = write_demo_repository(workdir / "models", {m: m for m in models})
        if intra_op_threads is not None:
            for m in models:
                config = repo / m / "config.toml"
                config.write_text(f"intra_op_threads = {intra_op_threads}\n" + config.read_text())
        settings = replace(base, namespace=namespace, model_repository=repo, state_dir=workdir / "state",
                           edge=replace(base.edge, host="127.0.0.1"))
        return cls(settings, workdir, children)

    def model_path(self, model: str) -> Path:
        return self.settings.model_repository / model / "1" / "model.onnx"

    def env(self) -> dict[str, str]:
        return {**self.settings.resolved().to_env(), "PYTHONUNBUFFERED": "1"}

    def sync(self) -> list[str]:
        """``inferq models sync``: declare queues, publish model metadata."""
        from inferq.runtime.loader import sync_repository

        self._synced = True
        return run_async(sync_repository(self.settings))

    def start_edge(self, processes: int = 1, timeout: float = 60.0) -> None:
        """``inferq edge --processes N`` on the stack's port; returns once it answers ready."""
        args = python_argv("-m", "inferq.cli", "--log-level", "warning", "edge", "--host", "127.0.0.1", "--port", str(self.port),
                           "--processes", str(processes))
        self.edge = self.children.start("edge", args, self.env(), self.logs / "edge.log")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive(self.edge, "edge")
            try:
                with urllib.request.urlopen(f"{self.url}/v2/health/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"the edge was not ready in {timeout}s; see {self.logs / 'edge.log'}")

    def restart_edge(self, processes: int) -> None:
        """Stop the edge (every process of it) and start it again with ``processes`` processes."""
        if self.edge is not None:
            self.children.stop(self.edge, grace_s=10)
            self.edge = None
        self.start_edge(processes)

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Until the edge answers ready again (after a broker restart, say), then a little settling."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.edge is not None:
                self._check_alive(self.edge, "edge")
            try:
                with urllib.request.urlopen(f"{self.url}/v2/health/ready", timeout=2) as resp:
                    if resp.status == 200:
                        time.sleep(2.0)  # workers reconnect on their own schedule
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the edge did not become ready again in {timeout}s")

    def start_worker(self, model: str, timeout: float = 60.0) -> str:
        """Start ``inferq worker --model M``; return its worker id once it is registered in etcd."""
        proc = self.spawn_worker(model)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive(proc, f"worker {model}")
            try:
                records = self.worker_records()
            except Exception:  # noqa: BLE001 - etcd busy or restarting: ask again
                records = {}
            for worker_id, record in records.items():
                if record.get("pid") == proc.pid:
                    self.worker_ids[model] = worker_id
                    return worker_id
            time.sleep(0.2)
        raise RuntimeError(f"worker {model} did not register in {timeout}s; see {self.logs}")

    def spawn_worker(self, model: str) -> subprocess.Popen[Any]:
        """Start ``inferq worker --model M`` and return at once (callers on the event loop wait their own way)."""
        args = python_argv("-m", "inferq.cli", "--log-level", "warning", "worker", "--model", model)
        proc = self.workers[model] = self.children.start(f"worker {model}", args, self.env(), self.logs / f"worker-{model}.log")
        return proc

    def stop_worker(self, model: str) -> None:
        proc = self.workers.pop(model, None)
        if proc is not None:
            self.children.stop(proc, grace_s=15)

    def worker_records(self) -> dict[str, dict[str, Any]]:
        """Membership records ``/<ns>/workers/<id>`` (with the worker's batch stats)."""
        from inferq.runtime.coordination import get_json_prefix, keys, open_etcd

        async def read() -> dict[str, dict[str, Any]]:
            client = open_etcd(self.settings.etcd)
            try:
                return await get_json_prefix(client, keys(self.settings.namespace).workers, 5)
            finally:
                await client.close()

        return run_async(read())

    def worker_stats(self, model: str) -> dict[str, Any]:
        record = self.worker_records().get(self.worker_ids.get(model, ""), {})
        return dict(record.get("stats") or {})

    def _check_alive(self, proc: subprocess.Popen[Any], name: str) -> None:
        if proc.poll() is not None:
            tail = ""
            for log in sorted(self.logs.glob("*.log")):
                if name.split()[0] in log.name:
                    tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{tail}")

    def stop(self) -> None:
        for model in list(self.workers):
            self.stop_worker(model)
        if self.edge is not None:
            self.children.stop(self.edge, grace_s=10)
            self.edge = None

    def remove_namespace(self) -> None:
        """Delete this run's queues, exchanges and etcd keys (as tests/conftest.py does)."""
        if not self._synced:
            return
        from inferq.runtime.loader import remove_namespace

        run_async(remove_namespace(self.settings))


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=False)


class BrokerWatch:
    """Notices broker restarts (someone else's tests may restart a shared RabbitMQ): a connection of
    its own, in a background thread, whose loss is recorded. ``restarts_since(t)`` tells a phase
    whether its figures were disturbed."""

    def __init__(self, url: str) -> None:
        import threading

        self.url = url
        self.losses: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="broker-watch", daemon=True)

    def start(self) -> BrokerWatch:
        import logging

        # Its own connection losses are the point, not errors worth a traceback.
        logging.getLogger("aiormq.connection").setLevel(logging.CRITICAL)
        self._thread.start()
        return self

    def restarts_since(self, t: float) -> int:
        return sum(1 for x in self.losses if x >= t)

    def _run(self) -> None:
        asyncio.run(self._watch())

    async def _watch(self) -> None:
        import aio_pika

        while not self._stop.is_set():
            try:
                connection = await aio_pika.connect(self.url, client_properties={"connection_name": "bench-broker-watch"})
            except Exception:  # noqa: BLE001 - broker down: try again shortly
                await asyncio.sleep(0.5)
                continue
            lost = asyncio.Event()
            connection.close_callbacks.add(lambda *_: lost.set())
            while not self._stop.is_set() and not lost.is_set():
                try:
                    await asyncio.wait_for(lost.wait(), 0.5)
                except TimeoutError:
                    pass
            if lost.is_set() and not self._stop.is_set():
                self.losses.append(time.monotonic())
            try:
                await connection.close()
            except Exception:  # noqa: BLE001
                pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def __repr__(self) -> str:
        return f"<BrokerWatch {len(self.losses)} restarts seen>"
