"""Fixtures on real services: RabbitMQ and etcd (started by ``make test``), real worker processes.

Every test session works in its own namespace (queue, stream and etcd key
prefix), so it never sees a developer's running stack, and removes its
queues at the end.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import numpy as np
import onnxruntime as ort
import pytest

from inferq.runtime.coordination import keys, open_etcd
from inferq.runtime.demo import write_demo_repository
from inferq.runtime.loader import remove_namespace, sync_repository
from inferq.settings import BrokerSettings, EtcdSettings, JobSettings, Settings
from tests.brokers import local_cluster, own_broker, own_etcd  # noqa: F401 (fixtures)
from tests.models import write_reshape_model, write_slow_model
from tests.support import AmqpClient, Process, live_workers, wait_until

MODELS = {"mlp": "mlp", "cnn": "cnn"}


@pytest.fixture(scope="session")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    root = tmp_path_factory.mktemp("inferq")
    repo = write_demo_repository(root / "models", MODELS)
    # "tiny*": the MLP behind a queue that holds 3 jobs, for backpressure tests; one per test that fills one,
    # so that no test finds a queue another test filled (tiny: test_edge, tiny2: test_faults, tiny_v2:
    # test_v2_conformance, tiny_sdk: test_sdk).
    for name in ("tiny", "tiny2", "tiny_v2", "tiny_sdk"):
        write_demo_repository(repo, {"mlp": name})
        (repo / name / "config.toml").write_text("[queue]\nmax_length = 3\n")
    # "unserved": the MLP that no test ever starts a worker for: its jobs stay queued.
    write_demo_repository(repo, {"mlp": "unserved"})
    # Models the autoscaler tests own, one per test so their workers never meet.
    for name in ("scaled", "drained", "leader", "replaced", "placed", "controlled", "guarded", "kubescaled", "kedascaled", "explained", "paged"):
        write_demo_repository(repo, {"mlp": name})
    write_slow_model(repo, "slow", layers=4000)
    write_slow_model(repo, "poison", layers=4000, config="[queue]\ndelivery_limit = 2\n")
    write_reshape_model(repo, "reshape")
    write_reshape_model(repo, "reshape_retry", '[retry]\nmax_attempts = 3\nbackoff_s = 0.05\ntransient_errors = ["reshape"]\n')
    write_demo_repository(repo, {"mlp": "strict"})
    (repo / "strict" / "config.toml").write_text("allow_nan = false\n")
    return Settings(
        namespace=f"t{uuid.uuid4().hex[:8]}",
        model_repository=repo,
        state_dir=root / "state",
        # INFERQ_TEST_BROKER_URL points a run at another RabbitMQ (a node of one's own while the shared one is sick).
        broker=BrokerSettings(url=os.environ.get("INFERQ_TEST_BROKER_URL", BrokerSettings.url)),
        etcd=EtcdSettings(lease_ttl_s=3),
        jobs=JobSettings(ttl_s=600),
    )


@pytest.fixture(scope="session")
async def synced(settings: Settings) -> AsyncIterator[Settings]:
    """The demo repository declared and published; every namespace queue removed afterwards."""
    await sync_repository(settings)
    yield settings
    await remove_namespace(settings)


@pytest.fixture
async def spawn_worker(synced: Settings, tmp_path: Path) -> AsyncIterator[Callable[..., asyncio.Future]]:
    """Start real ``inferq worker`` processes; each is ready (registered in etcd, warmed up, consuming) when returned."""
    started: list[Process] = []

    async def spawn(model: str = "mlp", *extra: str, env: dict[str, str] | None = None, ready: bool = True) -> Process:
        before = set(await live_workers(synced, model))
        proc = Process(["worker", "--model", model, *extra], synced, tmp_path / f"worker-{len(started)}.log", env)
        started.append(proc)
        if ready:
            async def registered() -> bool:
                assert proc.alive(), proc.output()
                now = await live_workers(synced, model)
                return any(v["pid"] == proc.pid and v["state"] == "ready" for k, v in now.items() if k not in before)
            await wait_until(registered, 30, f"worker {model} to register")
        return proc

    yield spawn
    await asyncio.gather(*(p.stop() for p in started))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Edge:
    """A running ``inferq edge`` process, its base URL and its gRPC port (0 when off)."""

    def __init__(self, process: Process, port: int, grpc_port: int = 0) -> None:
        self.process = process
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.grpc_port = grpc_port


@pytest.fixture
async def spawn_edge(synced: Settings, tmp_path: Path) -> AsyncIterator[Callable[..., asyncio.Future]]:
    """Start real ``inferq edge`` processes; each answers /v2/health/ready when returned.

    gRPC is off unless ``grpc`` is true, then on a free port (never Triton's 8001).
    """
    started: list[Process] = []

    async def spawn(port: int | None = None, env: dict[str, str] | None = None, grpc: bool = False) -> Edge:
        port = port or free_port()
        grpc_port = free_port() if grpc else 0
        args = ["edge", "--port", str(port), "--grpc-port", str(grpc_port)]
        proc = Process(args, synced, tmp_path / f"edge-{len(started)}.log", env)
        started.append(proc)
        edge = Edge(proc, port, grpc_port)

        async def ready() -> bool:
            assert proc.alive(), proc.output()
            try:
                async with aiohttp.ClientSession() as http, http.get(f"{edge.url}/v2/health/ready") as resp:
                    return resp.status == 200
            except aiohttp.ClientConnectionError:
                return False

        await wait_until(ready, 30, "the edge to be ready", interval=0.1)
        return edge

    yield spawn
    await asyncio.gather(*(p.stop() for p in started))


@pytest.fixture
async def spawn_autoscaler(synced: Settings, tmp_path: Path) -> AsyncIterator[Callable[..., asyncio.Future]]:
    """Start real ``inferq autoscaler`` processes scaling only ``models``."""
    started: list[Process] = []

    async def spawn(models: str, *extra: str, env: dict[str, str] | None = None) -> Process:
        env = {"INFERQ_AUTOSCALER_MODELS": models, "INFERQ_AUTOSCALER_INTERVAL_S": "0.5", **(env or {})}
        proc = Process(["autoscaler", *extra], synced, tmp_path / f"autoscaler-{len(started)}.log", env)
        started.append(proc)
        return proc

    yield spawn
    await asyncio.gather(*(p.stop(timeout=40) for p in started))


@pytest.fixture
async def spawn_agent(synced: Settings, tmp_path: Path) -> AsyncIterator[Callable[..., asyncio.Future]]:
    """Start real ``inferq agent`` processes; each is registered in etcd when returned."""
    started: list[Process] = []

    async def spawn(node: str, capacity: int = 2) -> Process:
        proc = Process(["agent", "--node", node, "--capacity", str(capacity)], synced, tmp_path / f"agent-{node}.log")
        started.append(proc)

        async def registered() -> bool:
            assert proc.alive(), proc.output()
            async with open_etcd(synced.etcd) as client:
                return await client.get(keys(synced.namespace).node(node).encode()) is not None

        await wait_until(registered, 30, f"agent {node} to register")
        return proc

    yield spawn
    await asyncio.gather(*(p.stop(timeout=40) for p in started))


async def set_policy(settings: Settings, model: str, **policy: object) -> None:
    """Change a model's scaling policy at run time, through etcd."""
    async with open_etcd(settings.etcd) as client:
        await client.put(keys(settings.namespace).policy(model).encode(), json.dumps(policy).encode())


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


@pytest.fixture
async def amqp(synced: Settings) -> AsyncIterator[AmqpClient]:
    client = await AmqpClient.open(synced)
    yield client
    await client.aclose()


@pytest.fixture(scope="session")
def reference(settings: Settings) -> Callable[[str, np.ndarray], np.ndarray]:
    """Direct onnxruntime inference on the same model files, for comparing outputs."""
    sessions: dict[str, ort.InferenceSession] = {}

    def run(model: str, x: np.ndarray) -> np.ndarray:
        if model not in sessions:
            sessions[model] = ort.InferenceSession(str(settings.model_repository / model / "1" / "model.onnx"))
        return sessions[model].run(None, {"x": x})[0]

    return run


def sample(model: str, n: int = 1, seed: int = 0) -> np.ndarray:
    """Random input for a demo model."""
    shape = {"mlp": (n, 256), "cnn": (n, 3, 64, 64)}[model]
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
