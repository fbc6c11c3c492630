"""Supervision on real processes: crashed parts come back, a crash loop ends the stack, nothing outlives its parent.

``inferq up`` runs as a real subprocess in a namespace and state directory of
its own; every test learns the pids of what it started (from /proc) and ends
with all of them gone. The restart policy, the pid file and the watchdog have a
fast unit layer of their own.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
from inferq.actors.launcher import drain
from inferq.broker.connection import BrokerConnection
from inferq.broker.control import agent_key, send
from inferq.broker.topology import Topology
from inferq.runtime.coordination import keys, open_etcd
from inferq.runtime.lifeline import PARENT_ENV, Lifeline, guarding
from inferq.runtime.loader import remove_namespace, sync_repository
from inferq.runtime.pidfile import PidFile
from inferq.runtime.records import NodeRecord
from inferq.runtime.supervisor import RestartPolicy, describe_exit

from inferq.errors import ConfigError
from inferq.settings import Settings
from tests.conftest import free_port, sample
from tests.support import Process, live_workers, wait_until

pytestmark = pytest.mark.faults  # the fault suite: make test-faults (CI runs it after make test)

GRACE_S = 30.0  # ChildProcess's grace: a child that lost its parent drains within it


# ---- the unit layer: no processes --------------------------------------------------------------------------------


def delays(policy: RestartPolicy, crash_times: list[float], ran_s: float = 1.0) -> list[float | None]:
    return [policy.crashed(t, ran_s) for t in crash_times]


def test_restart_delays_double_from_half_a_second_and_stop_at_thirty_seconds() -> None:
    spaced = [i * 100.0 for i in range(9)]  # never two in one window: only the backoff is at work
    assert delays(RestartPolicy(), spaced) == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


def test_the_fifth_crash_within_sixty_seconds_gives_up() -> None:
    assert delays(RestartPolicy(), [0.0, 1.0, 3.0, 6.0, 59.0]) == [0.5, 1.0, 2.0, 4.0, None]


def test_crashes_that_leave_the_sixty_second_window_no_longer_count() -> None:
    assert delays(RestartPolicy(), [0.0, 1.0, 3.0, 6.0, 61.0])[-1] is not None


def test_a_run_longer_than_a_minute_starts_the_backoff_afresh() -> None:
    policy = RestartPolicy()
    assert delays(policy, [0.0, 100.0, 200.0]) == [0.5, 1.0, 2.0]
    assert policy.crashed(400.0, ran_s=120.0) == 0.5


def test_exit_statuses_read_as_words() -> None:
    assert describe_exit(-signal.SIGKILL) == "killed by SIGKILL"
    assert describe_exit(2) == "exit status 2"
    assert describe_exit(0) == "exit status 0"


def test_a_held_pid_file_refuses_a_second_holder_and_names_the_pid(tmp_path: Path) -> None:
    path = tmp_path / "up-x.pid"
    held = PidFile.acquire(path, "inferq up for namespace 'x'")
    with pytest.raises(ConfigError, match=f"already running on this node \\(pid {os.getpid()};"):
        PidFile.acquire(path, "inferq up for namespace 'x'")
    held.release()
    assert not path.exists()
    PidFile.acquire(path, "inferq up for namespace 'x'").release()


@pytest.fixture
def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    return int(done.stdout)


def test_a_pid_file_whose_holder_is_dead_is_taken_over(tmp_path: Path, dead_pid: int) -> None:
    path = tmp_path / "up-x.pid"
    path.write_text(f"{dead_pid}\n")  # the file a SIGKILLed holder leaves: a pid, and no lock on it
    with PidFile.acquire(path, "x"):
        assert path.read_text().strip() == str(os.getpid())


async def test_the_watchdog_asks_for_a_graceful_stop_once_the_parent_is_gone() -> None:
    lost = asyncio.Event()
    async with guarding(Lifeline(parent=-1), lost.set):  # no process has parent -1: as good as gone
        await asyncio.wait_for(lost.wait(), 2)


# ---- processes, learned from /proc --------------------------------------------------------------------------------


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, or None if there is none."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()
    return fields[0], int(fields[1])


def running(pid: int) -> bool:
    """Alive: present and not a zombie (an orphan whose adopter has not reaped it yet has exited)."""
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def descendants(root: int) -> dict[int, str]:
    """Every running descendant of ``root``: pid -> its ``inferq`` command line."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) and stat[0] != "Z":
            parents[int(entry.name)] = stat[1]
    found, frontier = {}, {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier}
        for pid in frontier:
            try:
                found[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                pass
    return found


def role(procs: dict[int, str], name: str) -> list[int]:
    """The pids running ``inferq <name>``; of an edge group (``inferq up`` runs one per two cores), its parent alone.

    The members die with their parent and are not what ``up`` restarts: a member still draining
    must not pass for the edge that replaced a killed one.
    """
    return [pid for pid, cmd in procs.items() if f"inferq.cli {name}" in cmd and " --member " not in cmd]


async def all_gone(pids: list[int] | set[int], timeout: float = GRACE_S) -> None:
    await wait_until(lambda: not [p for p in pids if running(p)], timeout, f"processes {sorted(pids)} to exit")


class Tree:
    """The processes a test started, directly or not; whatever is left of them is killed at teardown."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.seen: set[int] = set()

    def of(self, root: int) -> dict[int, str]:
        procs = descendants(root)
        self.seen |= set(procs)
        return procs

    def ours(self, pid: int) -> bool:
        try:
            return f"INFERQ_NAMESPACE={self.namespace}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            return False

    def leftovers(self) -> list[int]:
        """Running processes of this test's namespace: the ones it learned, and any it never saw (a late worker)."""
        everyone = {int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()}
        return [p for p in self.seen | everyone if p != os.getpid() and running(p) and self.ours(p)]


# ---- fixtures: a stack of its own ---------------------------------------------------------------------------------


@pytest.fixture
async def own(settings: Settings, tmp_path: Path) -> AsyncIterator[Settings]:
    """Settings for a namespace and state dir of this test only, scaling only ``mlp``; removed afterwards."""
    mine = replace(
        settings, namespace=f"t{uuid.uuid4().hex[:8]}", state_dir=tmp_path / "state",
        # A free gRPC port: Triton's 8001, the default, may be held by anything else on a shared machine.
        edge=replace(settings.edge, port=free_port(), grpc_port=free_port()), autoscaler=replace(settings.autoscaler, models="mlp"),
    )
    yield mine
    await remove_namespace(mine)


@pytest.fixture
async def tree(own: Settings) -> AsyncIterator[Tree]:
    processes = Tree(own.namespace)
    yield processes
    leftovers = processes.leftovers()
    for pid in leftovers:
        os.kill(pid, signal.SIGKILL)
    assert not leftovers, f"processes left behind: {leftovers}"


@pytest.fixture
async def start_up(own: Settings, tmp_path: Path, tree: Tree) -> AsyncIterator[Callable[..., Process]]:
    """Start real ``inferq up`` processes on ``own``; stopped (SIGTERM, then SIGKILL) at teardown."""
    started: list[Process] = []

    def start(settings: Settings = own) -> Process:
        proc = Process(["up", "--min-workers", "1"], settings, tmp_path / f"up-{len(started)}.log")
        started.append(proc)
        tree.seen.add(proc.pid)
        return proc

    yield start
    for proc in started:
        tree.of(proc.pid)
        await proc.stop(timeout=60)


async def until_up(up: Process, timeout: float = 90) -> None:
    """Wait for the banner, which ``inferq up`` prints only once the edge is ready."""
    def banner() -> bool:
        assert up.alive(), up.output()
        return "inferq is up:" in up.output()

    await wait_until(banner, timeout, "the 'inferq is up' banner", interval=0.05)


async def ready(http: aiohttp.ClientSession, settings: Settings) -> bool:
    try:
        async with http.get(f"{url(settings)}/v2/health/ready") as resp:
            return resp.status == 200
    except aiohttp.ClientError:
        return False


def url(settings: Settings) -> str:
    return f"http://127.0.0.1:{settings.edge.port}"


async def submit(http: aiohttp.ClientSession, settings: Settings, seed: int = 0, model: str = "mlp") -> str:
    x = sample("mlp", seed=seed)  # the slow model takes the MLP's input shape too
    body = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    async with http.post(f"{url(settings)}/v1/models/{model}/jobs", json=body) as resp:
        doc = await resp.json()
        assert resp.status == 202, doc
        return doc["job_id"]


async def try_submit(http: aiohttp.ClientSession, settings: Settings, seed: int, model: str) -> str | None:
    """A job id if the edge accepted the job (202), None if it refused or is gone."""
    try:
        return await submit(http, settings, seed, model)
    except (aiohttp.ClientError, AssertionError):
        return None


async def final_states(http: aiohttp.ClientSession, settings: Settings, job_ids: list[str], timeout: float = 90) -> dict[str, str]:
    """Poll every job until each is in a final state; its status."""
    states: dict[str, str] = {}

    async def poll_all() -> bool:
        for job_id in [j for j in job_ids if j not in states]:
            async with http.get(f"{url(settings)}/v1/jobs/{job_id}", params={"wait": "5"}) as resp:
                assert resp.status == 200, f"{job_id}: {resp.status} {await resp.text()}"
                doc = await resp.json()
            if doc["status"] not in ("queued", "running"):
                states[job_id] = doc["status"]
        return len(states) == len(job_ids)

    await wait_until(poll_all, timeout, f"{len(job_ids)} jobs to finish")
    return states


async def replaced(tree: Tree, root: int, name: str, old: int, timeout: float = 60) -> int:
    """The pid of the ``inferq <name>`` that took over from ``old``."""
    def new() -> int | None:
        pids = [p for p in role(tree.of(root), name) if p != old]
        return pids[0] if pids else None

    return await wait_until(new, timeout, f"a new {name} after pid {old}")


# ---- inferq up --------------------------------------------------------------------------------------------------


async def test_up_brings_back_a_killed_edge_autoscaler_and_worker_and_their_jobs_finish(own, start_up, tree, http) -> None:
    up = start_up()
    await until_up(up)
    assert await ready(http, own), "the banner came before the edge was ready"
    procs = tree.of(up.pid)
    worker = await wait_until(lambda: role(tree.of(up.pid), "worker"), 60, "the first worker")
    jobs = [await submit(http, own, seed=i) for i in range(5)]

    os.kill(role(procs, "edge")[0], signal.SIGKILL)
    await replaced(tree, up.pid, "edge", role(procs, "edge")[0])
    await wait_until(lambda: ready(http, own), 60, "the restarted edge to be ready")
    assert set((await final_states(http, own, jobs)).values()) == {"succeeded"}

    jobs = [await submit(http, own, seed=i) for i in range(5)]
    os.kill(worker[0], signal.SIGKILL)
    jobs += [await submit(http, own, seed=i) for i in range(5)]  # queued while no worker runs
    worker = [await replaced(tree, up.pid, "worker", worker[0])]
    assert set((await final_states(http, own, jobs)).values()) == {"succeeded"}

    autoscaler = role(tree.of(up.pid), "autoscaler")[0]
    jobs = [await submit(http, own, seed=i) for i in range(5)]
    os.kill(autoscaler, signal.SIGKILL)
    await all_gone(worker)  # the autoscaler's worker dies with it (its lifeline)...
    await replaced(tree, up.pid, "autoscaler", autoscaler)
    await replaced(tree, up.pid, "worker", worker[0])  # ...and the new autoscaler starts another
    assert set((await final_states(http, own, jobs + [await submit(http, own)])).values()) == {"succeeded"}

    log = up.output()
    for name, status in (("edge", "killed by SIGKILL"), ("autoscaler", "killed by SIGKILL")):
        assert f"{name} (pid" in log and f"crashed: {status}; restarting it in 0.5s" in log, log
    children = list(tree.of(up.pid))
    up.signal(signal.SIGINT)
    assert await up.wait(60) == 0, up.output()
    await all_gone(children, 5)
    assert "Traceback" not in (own.state_dir / "logs" / "autoscaler.log").read_text()


def bound(sock: socket.socket, port: int) -> bool:
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        return False
    return True


async def test_an_edge_that_crashes_five_times_in_a_minute_makes_up_stop_everything_and_exit_1(own, start_up, tree) -> None:
    up = start_up()
    await until_up(up)
    procs = tree.of(up.pid)
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        os.kill(role(procs, "edge")[0], signal.SIGKILL)
        # From now on every new edge fails: its port is taken. The supervisor restarts 0.5 s after the crash, and a
        # new edge needs longer than that to reach its port check.
        await wait_until(lambda: bound(squatter, own.edge.port), 1.0, "the edge's port to be free", interval=0.01)
        squatter.listen()
        code = await up.wait(90)
    log = up.output()
    assert code == 1, log
    assert "edge crashed 5 times within 60s (last: exit status 2); giving up on it" in log, log
    assert log.count("crashed: exit status 2; restarting it") == 3, log  # kill, then 3 port failures restarted, 4th gives up
    await all_gone(list(tree.of(up.pid)) + list(procs), 5)


async def test_sigkill_of_up_under_load_leaves_no_process_and_a_new_up_finishes_every_accepted_job(own, start_up, tree, http) -> None:
    slow = replace(own, autoscaler=replace(own.autoscaler, models="slow"))  # ~0.1 s a job: a backlog builds up
    first = start_up(slow)
    await until_up(first)
    second = start_up(slow)
    assert await second.wait(30) == 2
    assert f"inferq up for namespace '{own.namespace}' is already running on this node (pid {first.pid};" in second.output()
    assert "Traceback" not in second.output()
    await wait_until(lambda: role(tree.of(first.pid), "worker"), 60, "the first worker")

    accepted: list[str] = []

    async def load() -> None:
        while (job_id := await try_submit(http, own, len(accepted), "slow")) is not None:
            accepted.append(job_id)

    loader = asyncio.create_task(load())
    await wait_until(lambda: len(accepted) >= 40, 30, "40 accepted jobs")
    assert (await status(http, own, accepted[-1])) in ("queued", "running")  # killed with work in hand
    stack = list(tree.of(first.pid))
    first.kill()
    await all_gone(stack)
    await asyncio.wait_for(loader, 10)

    third = start_up(slow)  # the pid file that the SIGKILLed one left behind does not stop it
    await until_up(third)
    states = await final_states(http, own, accepted)
    assert len(states) == len(accepted) >= 40 and set(states.values()) == {"succeeded"}, states


async def status(http: aiohttp.ClientSession, settings: Settings, job_id: str) -> str:
    async with http.get(f"{url(settings)}/v1/jobs/{job_id}") as resp:
        return (await resp.json())["status"]


async def test_up_on_a_port_in_use_fails_at_once_with_one_line_and_exit_2(own, start_up, tree) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", own.edge.port))
        squatter.listen()
        up = start_up()
        assert await up.wait(30) == 2
        procs = tree.of(up.pid)
    errors = [line for line in up.output().splitlines() if "ERROR" in line]
    assert len(errors) == 1 and f"cannot listen on 127.0.0.1:{own.edge.port}" in errors[0], up.output()
    assert "Traceback" not in up.output() and "started" not in up.output()
    assert not procs


async def test_a_child_whose_parent_died_before_it_started_does_not_run(own, tmp_path, dead_pid) -> None:
    worker = Process(["worker", "--model", "mlp"], own, tmp_path / "orphan.log", {PARENT_ENV: str(dead_pid)})
    assert await worker.wait(30) == 0
    assert f"parent process {dead_pid} is already gone; not starting" in worker.output()


# ---- the edge-node agent ----------------------------------------------------------------------------------------


async def node_record(settings: Settings, node: str) -> NodeRecord | None:
    async with open_etcd(settings.etcd) as client:
        raw = await client.get(keys(settings.namespace).node(node).encode())
    return NodeRecord.from_json(raw.value) if raw else None


async def test_an_agent_restarts_a_killed_worker_leaves_a_drained_one_down_and_its_workers_die_with_it(own, tree, tmp_path) -> None:
    await sync_repository(own)
    agent = Process(["agent", "--node", "n1", "--capacity", "2"], own, tmp_path / "agent.log")
    tree.seen.add(agent.pid)
    connection = await BrokerConnection.open(own.broker, "test-agent")
    try:
        await wait_until(lambda: node_record(own, "n1"), 30, "the agent's node record")

        async def spawned(old: set[int]) -> int:
            await send(connection, Topology(own.namespace).control, agent_key("n1"), {"command": "spawn", "model": "mlp", "version": "1"})
            return await worker_of(old)

        async def worker_of(old: set[int]) -> int:
            async def registered() -> int | None:
                live = {w["pid"]: w for w in (await live_workers(own, "mlp")).values()}
                new = [pid for pid in role(tree.of(agent.pid), "worker") if pid in live and pid not in old]
                return new[0] if new else None
            return await wait_until(registered, 60, "a worker of the agent to register")

        first = await spawned(set())
        os.kill(first, signal.SIGKILL)
        second = await worker_of({first})
        record = await wait_until(lambda: _with_restart(own), 10, "the restart in the node record")
        assert record.restarts == 1 and record.last_exit.endswith("killed by SIGKILL") and record.workers == 1, record

        worker_id = next(w["worker_id"] for w in (await live_workers(own, "mlp")).values() if w["pid"] == second)
        await drain(connection, Topology(own.namespace), worker_id)
        await all_gone([second])
        await wait_until(lambda: "finished (exit status 0); not restarting it" in agent.output(), 10, "the agent to leave it down")
        assert not role(tree.of(agent.pid), "worker")
        assert (await wait_until(lambda: _with_workers(own, 0), 10, "the node record to show 0 workers")).restarts == 1

        third = await spawned({first, second})
        agent.kill()
        await all_gone([third])
        await agent.wait(5)
    finally:
        await connection.aclose()
        await agent.stop()


async def _with_restart(settings: Settings) -> NodeRecord | None:
    record = await node_record(settings, "n1")
    return record if record and record.restarts else None


async def _with_workers(settings: Settings, count: int) -> NodeRecord | None:
    record = await node_record(settings, "n1")
    return record if record and record.workers == count else None
