"""``inferq edge --processes N``: several edge processes on one port, supervised by a parent (real processes)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest

from inferq.edge.group import PID_HEADER, member_specs
from inferq.errors import ConfigError
from inferq.settings import Settings
from tests.conftest import free_port, sample
from tests.support import Process, wait_until

JOBS = 40


class Group:
    """A running edge group: the parent process and its port."""

    def __init__(self, process: Process, port: int) -> None:
        self.process = process
        self.url = f"http://127.0.0.1:{port}"

    def members(self) -> set[int]:
        """The pids of the parent's children now."""
        found = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True, check=False)
        return {int(pid) for pid in found.stdout.split()}


def fresh_connections() -> aiohttp.ClientSession:
    """A session that opens a new connection for every request, so the kernel picks a member each time."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True), headers={"Connection": "close"},
                                 timeout=aiohttp.ClientTimeout(total=60))


async def answering_pid(http: aiohttp.ClientSession, group: Group) -> int | None:
    """The pid of the member that answered ready, None while none is."""
    try:
        async with http.get(f"{group.url}/v2/health/ready") as resp:
            return int(resp.headers[PID_HEADER]) if resp.status == 200 else None
    except aiohttp.ClientConnectionError:
        return None


@pytest.fixture
async def group(synced: Settings, tmp_path: Path) -> AsyncIterator[Group]:
    """``inferq edge --processes 2`` on a free port, every member ready; stopped (and its members gone) afterwards.

    gRPC is on too: a member that could not share its port would crash-loop and never be ready.
    """
    port = free_port()
    args = ["edge", "--processes", "2", "--port", str(port), "--grpc-port", str(free_port())]
    proc = Process(args, synced, tmp_path / "edge-group.log")
    group = Group(proc, port)
    seen: set[int] = set()

    async def both_ready() -> bool:
        assert proc.alive(), proc.output()
        async with fresh_connections() as http:
            for _ in range(8):
                if (pid := await answering_pid(http, group)) is not None:
                    seen.add(pid)
        return len(group.members()) == 2 and seen >= group.members()

    await wait_until(both_ready, 60, "both edge members to be ready", interval=0.2)
    yield group
    members = group.members()
    await proc.stop(timeout=40)
    for pid in members:  # the parent reaped them, so a pid still there is a member left behind
        await wait_until(lambda: not Path(f"/proc/{pid}").exists(), 10, f"edge member {pid} to be gone")


async def submit_and_poll(http: aiohttp.ClientSession, group: Group, seed: int) -> tuple[int, int]:
    """Submit one mlp job and poll it until it succeeded; the pids of the members that took and answered it."""
    body = {"inputs": [{"name": "x", "shape": [1, 256], "datatype": "FP32", "data": sample("mlp", seed=seed).ravel().tolist()}]}
    async with http.post(f"{group.url}/v1/models/mlp/jobs", json=body) as resp:
        assert resp.status == 202, await resp.text()
        job_id, submitted_by = (await resp.json())["job_id"], int(resp.headers[PID_HEADER])
    while True:
        async with http.get(f"{group.url}/v1/jobs/{job_id}", params={"wait": "10"}) as resp:
            doc = await resp.json()
            assert resp.status == 200, doc
            if doc["status"] == "succeeded":
                return submitted_by, int(resp.headers[PID_HEADER])
            assert doc["status"] in ("queued", "running"), doc


def test_a_group_needs_a_fixed_port_and_only_its_first_member_exports_spans() -> None:
    settings = Settings()
    settings = replace(settings, metrics=replace(settings.metrics, otlp_endpoint="http://127.0.0.1:4318"))
    with pytest.raises(ConfigError, match="fixed --port"):
        member_specs(replace(settings, edge=replace(settings.edge, port=0)), 2)
    specs = member_specs(settings, 3)
    assert [s.env["INFERQ_METRICS_OTLP_ENDPOINT"] for s in specs] == ["http://127.0.0.1:4318", "", ""]
    assert all(s.env["INFERQ_EDGE_PROCESSES"] == "1" and "--member" in s.args for s in specs)


async def test_jobs_through_a_two_process_edge_are_served_by_both_members_alike(spawn_worker, group) -> None:
    await spawn_worker("mlp")
    async with fresh_connections() as http:
        served = await asyncio.gather(*(submit_and_poll(http, group, seed) for seed in range(JOBS)))
    assert {pid for pair in served for pid in pair} == group.members()
    assert any(took != answered for took, answered in served)  # a job taken by one member is polled through the other


async def test_a_killed_member_comes_back_while_the_port_keeps_answering(group) -> None:
    before = group.members()
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    await wait_until(lambda: victim not in group.members(), 10, "the killed member to be reaped")
    async with fresh_connections() as http:
        async def replaced() -> bool:
            assert await answering_pid(http, group) is not None  # the survivor answers every new connection
            return len(group.members()) == 2
        await wait_until(replaced, 20, "the parent to restart the member", interval=0.1)
        (new,) = group.members() - before

        async def new_member_answers() -> bool:
            return any([await answering_pid(http, group) == new for _ in range(8)])
        await wait_until(new_member_answers, 60, "the restarted member to answer", interval=0.2)
    assert "crashed: killed by SIGKILL; restarting it" in group.process.output()


async def test_sigterm_to_the_parent_drains_every_member_and_leaves_no_process(group) -> None:
    members = group.members()
    group.process.signal(signal.SIGTERM)
    assert await group.process.wait(40) == 0
    assert not any(Path(f"/proc/{pid}").exists() for pid in members)
