"""The operator's tools on real services: `inferq services --stop`, `make clean`, `inferq namespace reset`, worker logs.

The machine's RabbitMQ (5672) and etcd (2379) are never stopped: the etcd these tests
start and stop is their own, on a free port, with its data in a temporary folder.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from inferq.actors.launcher import LocalLauncher
from inferq.broker.connection import BrokerConnection
from inferq.broker.topology import QueueLimits, Topology
from inferq.runtime.coordination import keys, open_etcd
from inferq.runtime.daemon import Daemon, exists
from inferq.runtime.demo import write_demo_repository
from inferq.runtime.loader import sync_repository
from inferq.runtime.pidfile import PidFile
from inferq.runtime.services import free_port, reachable
from inferq.settings import Settings
from tests.support import ROOT, live_workers, settings_env, wait_until

pytestmark = pytest.mark.timeout(120)


def inferq(*args: str, cwd: Path, env: dict[str, str] | None = None, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "inferq.cli", *args], cwd=cwd, env={**os.environ, **(env or {})},
                          input=stdin, capture_output=True, text=True, timeout=90)


@pytest.fixture
def etcd_port() -> int:
    if shutil.which("etcd") is None:
        pytest.skip("etcd is not installed")
    return free_port()


def test_services_stop_stops_the_etcd_it_started_and_leaves_the_running_rabbitmq_alone(tmp_path: Path, etcd_port: int) -> None:
    env = {"INFERQ_ETCD_PORT": str(etcd_port)}
    started = inferq("services", cwd=tmp_path, env=env)
    assert started.returncode == 0, started.stderr
    assert started.stdout.splitlines() == ["rabbitmq: running", "rabbitmq management: running", "etcd: started"]
    pid = int((tmp_path / ".state" / "etcd.pid").read_text().split()[0])
    assert reachable("127.0.0.1", etcd_port)
    again = inferq("services", cwd=tmp_path, env=env)
    assert again.stdout.splitlines()[-1] == "etcd: running", "a second call starts nothing"

    stopped = inferq("services", "--stop", cwd=tmp_path, env=env)
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.splitlines() == ["rabbitmq: not started by `inferq services` here (left alone)",
                                           f"etcd: stopped (pid {pid})"]
    assert not exists(pid) and not reachable("127.0.0.1", etcd_port)
    assert reachable("127.0.0.1", 5672), "the machine's RabbitMQ still runs"
    assert (tmp_path / ".state" / "etcd").is_dir(), "stopping keeps the data"


def test_services_stop_leaves_a_process_alone_whose_start_time_is_not_the_recorded_one(tmp_path: Path) -> None:
    # As after a reboot: the pid in the file now belongs to another process.
    other = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / ".state").mkdir()
        (tmp_path / ".state" / "etcd.pid").write_text(f"{other.pid} 1\n")
        stopped = inferq("services", "--stop", "etcd", cwd=tmp_path)
        assert stopped.returncode == 0, stopped.stderr
        assert stopped.stdout.splitlines() == [f"etcd: not running (pid {other.pid} is gone)"]
        assert other.poll() is None, "a process that is not the one recorded is never signalled"
        assert not (tmp_path / ".state" / "etcd.pid").exists()
    finally:
        other.kill()
        other.wait()


def fake_venv(root: Path) -> None:
    """``root/venv/bin/inferq`` running this interpreter's inferq: what `make clean` calls."""
    bin_dir = root / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "inferq").write_text(f'#!/bin/sh\nexec {sys.executable} -m inferq.cli "$@"\n')
    (bin_dir / "inferq").chmod(0o755)


def make_clean(root: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-s", "-C", str(root), "-f", str(ROOT / "Makefile"), "clean", "VENV=venv"],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=90)


def test_make_clean_stops_the_etcd_of_inferq_services_before_deleting_its_data(tmp_path: Path, etcd_port: int) -> None:
    env = {"INFERQ_ETCD_PORT": str(etcd_port)}
    fake_venv(tmp_path)
    assert inferq("services", cwd=tmp_path, env=env).returncode == 0
    pid = int((tmp_path / ".state" / "etcd.pid").read_text().split()[0])
    cleaned = make_clean(tmp_path, env)
    assert cleaned.returncode == 0, cleaned.stdout + cleaned.stderr
    assert f"etcd: stopped (pid {pid})" in cleaned.stdout
    assert not (tmp_path / ".state").exists() and not exists(pid)


def test_make_clean_refuses_while_another_etcd_keeps_its_data_in_the_state_dir(tmp_path: Path, etcd_port: int) -> None:
    (tmp_path / ".state").mkdir()
    fake_venv(tmp_path)
    peer = free_port()
    etcd = Daemon.spawn(f"test-etcd-{uuid.uuid4().hex[:6]}", [
        "etcd", "--name", "byhand", "--data-dir", ".state/etcd",  # relative, as older inferq versions started it
        "--listen-client-urls", f"http://127.0.0.1:{etcd_port}", "--advertise-client-urls", f"http://127.0.0.1:{etcd_port}",
        "--listen-peer-urls", f"http://127.0.0.1:{peer}", "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
        "--initial-cluster", f"byhand=http://127.0.0.1:{peer}"], os.environ, tmp_path / "etcd.log", cwd=tmp_path)
    try:
        asyncio.run(wait_until(lambda: reachable("127.0.0.1", etcd_port), 30, "the hand-started etcd"))
        refused = make_clean(tmp_path, {"INFERQ_ETCD_PORT": str(etcd_port)})
        assert refused.returncode != 0
        assert f"etcd pid {etcd.pid} keeps its data in .state/etcd" in refused.stderr
        assert (tmp_path / ".state" / "etcd").is_dir() and etcd.alive()
    finally:
        etcd.kill()


@pytest.fixture
async def scratch(settings: Settings, tmp_path: Path) -> Settings:
    """A namespace of its own with the demo mlp synced into it (removed by the test itself)."""
    repo = write_demo_repository(tmp_path / "models", {"mlp": "mlp"})
    mine = replace(settings, namespace=f"{settings.namespace}r", model_repository=repo, state_dir=tmp_path / "state")
    await sync_repository(mine)
    return mine


async def existing(settings: Settings, names: list[str]) -> list[str]:
    async with await BrokerConnection.open(settings.broker, "test-namespace") as connection:
        return [n for n in names if await connection.queue_counts(n) is not None]


async def test_namespace_reset_asks_then_deletes_every_queue_and_key_it_can_find(scratch: Settings, tmp_path: Path) -> None:
    ns, topology = scratch.namespace, Topology(scratch.namespace)
    # Version 7 is in no repository and no model record: only the autoscaler's decision still names it.
    async with await BrokerConnection.open(scratch.broker, "test-namespace") as connection:
        await topology.declare_model(connection.publisher, "mlp", ["7"], QueueLimits())
    async with open_etcd(scratch.etcd) as client:
        await client.put(f"{keys(ns).decisions}mlp.7".encode(), json.dumps({"model": "mlp", "version": "7"}).encode())
    queues = [topology.dead, topology.ledger, topology.cancels, topology.router_queue("mlp")] + [
        q for v in ("1", "7") for q in topology.queues_of("mlp", v)]
    assert await existing(scratch, queues) == queues
    env = settings_env(scratch)

    declined = inferq("namespace", "reset", ns, cwd=tmp_path, env=env, stdin="no\n")
    assert declined.returncode == 1 and "nothing removed" in declined.stdout
    assert f"queue {topology.model_queue('mlp', '7')}" in declined.stdout
    assert await existing(scratch, queues) == queues

    done = inferq("namespace", "reset", ns, cwd=tmp_path, env=env, stdin=f"{ns}\n")
    assert done.returncode == 0, done.stderr
    assert f"namespace '{ns}' reset: {len(queues)} queues" in done.stdout
    assert await existing(scratch, queues) == []
    async with open_etcd(scratch.etcd) as client:
        assert list(await client.get_prefix(f"/{ns}/".encode())) == []
    again = inferq("namespace", "reset", ns, "--yes", cwd=tmp_path, env=env)
    assert again.returncode == 0 and "holds nothing" in again.stdout


async def test_namespace_reset_refuses_while_inferq_up_runs_for_that_namespace(scratch: Settings, tmp_path: Path) -> None:
    holder = PidFile.acquire(scratch.state_dir / f"up-{scratch.namespace}.pid", "inferq up")
    try:
        env = settings_env(scratch)
        refused = inferq("namespace", "reset", scratch.namespace, "--yes", cwd=tmp_path, env=env)
        assert refused.returncode == 2 and "stop it (Ctrl-C) before resetting its namespace" in refused.stderr
        assert await existing(scratch, [Topology(scratch.namespace).ledger]), "nothing was deleted"
    finally:
        holder.release()
    assert inferq("namespace", "reset", scratch.namespace, "--yes", cwd=tmp_path, env=settings_env(scratch)).returncode == 0


async def test_a_launched_workers_log_file_carries_the_end_of_its_worker_id(synced: Settings, tmp_path: Path) -> None:
    launcher = LocalLauncher(synced, tmp_path / "logs")
    try:
        handle = await launcher.spawn("mlp", "1", [])
        pid = int(handle.removeprefix("pid:"))

        async def registered() -> str | None:
            return next((w for w, r in (await live_workers(synced, "mlp")).items() if r["pid"] == pid), None)

        worker_id = await wait_until(registered, 60, "the launched worker to register")
        log_file = tmp_path / "logs" / f"worker-mlp-1-{worker_id.rsplit('-', 1)[1]}.log"
        assert [p.name for p in (tmp_path / "logs").iterdir()] == [log_file.name]
        # It registers (warming) before it logs its id: wait for the line rather than race it.
        await wait_until(lambda: worker_id in log_file.read_text(), 30, f"{worker_id} in {log_file.name}")
    finally:
        await launcher.aclose()
