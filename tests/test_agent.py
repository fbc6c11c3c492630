"""The edge-node agent as a product: join tokens, install, proven providers, Jetson facts, model fetch, offline.

The unit layer reads fixture system trees and runs onnxruntime; everything else runs
real processes: ``inferq edge``, ``inferq agent`` (from a venv that ``inferq agent
install`` or the edge's ``install.sh`` made, on Python 3.11 and 3.10), its workers,
and for the offline test a RabbitMQ node and an etcd member of the test's own that
are down when the agent starts.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import numpy as np
import onnxruntime as ort
import pytest

from inferq.agent_join import render_toml, write_config
from inferq.broker.admin import BrokerAdmin, service_permissions
from inferq.broker.control import agent_key, send
from inferq.broker.identity import broker_user, node_user_name
from inferq.broker.topology import Topology
from inferq.client.registry import RegistryClient
from inferq.edge.auth import create_key
from inferq.errors import Unauthorized
from inferq.runtime.coordination import keys, open_etcd
from inferq.runtime.demo import write_demo_repository
from inferq.runtime.device import read_facts
from inferq.runtime.jointoken import AgentConfig, JoinToken, JoinTokenRecord, create_token, revoke_token, secret_hash
from inferq.runtime.loader import remove_namespace, sync_repository
from inferq.runtime.modelcache import ModelCache
from inferq.runtime.proof import prove, proven
from inferq.runtime.records import NodeRecord
from inferq.edge.node_users import REVOKED, with_credentials
from inferq.settings import EtcdSettings, Settings
from tests.conftest import sample
from tests.test_edge import v2_input
from tests.jetson import HOST, ORIN, XAVIER, write_sysroot
from tests.models import write_mlp
from tests.test_tls import certificates  # noqa: F401 (fixture)
from tests.support import ROOT, AmqpClient, Process, live_workers, wait_until

pytestmark = pytest.mark.features  # a feature suite that starts many processes: make test-features (CI runs it after make test)

PYTHON310 = sorted(Path.home().glob(".pyenv/versions/3.10*/bin/python"))


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


# ---- the unit layer ----------------------------------------------------------------------------------------------


def test_an_orin_sysroot_reads_as_a_jetson_with_l4t_soc_cuda_arch_memory_and_power_mode(tmp_path: Path) -> None:
    facts = read_facts(write_sysroot(tmp_path, ORIN))
    assert (facts.kind, facts.model, facts.soc, facts.cuda_arch, facts.l4t) == \
        ("jetson", "NVIDIA Jetson AGX Orin Developer Kit", "tegra234", "8.7", "36.4.3")
    assert facts.power_mode == "MAXN" and facts.cpu_cores == 12 and facts.memory_bytes == 64335836 * 1024
    assert facts.ort_version == ort.__version__


def test_a_xavier_sysroot_without_nvpmodel_reads_as_tegra194_with_cuda_arch_7_2(tmp_path: Path) -> None:
    facts = read_facts(write_sysroot(tmp_path, XAVIER))
    assert (facts.kind, facts.soc, facts.cuda_arch, facts.l4t, facts.power_mode) == ("jetson", "tegra194", "7.2", "35.5.0", "")


def test_a_host_without_tegra_files_reports_its_cpu_model_cores_and_memory(tmp_path: Path) -> None:
    facts = read_facts(write_sysroot(tmp_path, HOST))
    assert (facts.kind, facts.model, facts.cpu_cores, facts.memory_bytes, facts.soc) == \
        ("host", "AMD EPYC 7B13", 4, 16303428 * 1024, "")


def test_tensorrt_engines_are_cached_per_device_model_bytes_and_onnxruntime_version(tmp_path: Path) -> None:
    from inferq.runtime.device import engine_cache_dir

    sha = "c" * 64
    cached = tmp_path / "state" / "artifacts" / sha / "model.onnx"
    orin, host = write_sysroot(tmp_path / "orin", ORIN), write_sysroot(tmp_path / "host", HOST)
    on_orin = engine_cache_dir(tmp_path / "state", cached, orin)
    assert on_orin == tmp_path / "state" / "trt" / f"tegra234-{sha[:16]}-ort{ort.__version__}"
    assert engine_cache_dir(tmp_path / "state", cached, host) != on_orin, "another device builds its own engines"
    other = write_mlp(tmp_path / "m", seed=5)
    assert hashlib.sha256(other.read_bytes()).hexdigest()[:16] in engine_cache_dir(tmp_path / "state", other, orin).name


def test_only_providers_that_ran_the_tiny_model_are_proven() -> None:
    proofs = {p.provider: p for p in prove(("tensorrt", "cuda", "cpu"))}
    assert proofs["cpu"].proven
    for gpu in ("tensorrt", "cuda"):  # this machine's onnxruntime has neither: they are reported, never advertised
        assert not proofs[gpu].proven and proofs[gpu].detail, proofs[gpu]
    assert proven(list(proofs.values())) == ("cpu",)


def test_a_join_token_carries_the_edge_url_and_certificate_pin_and_garbage_is_refused() -> None:
    token = JoinToken("https://edge:8443", "s3cret", "ab" * 32)
    assert JoinToken.parse(token.encode()) == token and token.id == secret_hash("s3cret")[:12]
    for bad in ("", "K10abc::server:xyz", "IQJ1.%%%.x", "IQJ1.e30."):
        with pytest.raises(Unauthorized):
            JoinToken.parse(bad)


def test_the_join_answer_written_as_agent_toml_is_0600_and_loads_as_the_nodes_settings(tmp_path: Path) -> None:
    config = AgentConfig("jetson-1", "prod", ("amqp://u:p@10.0.0.2:5672/", "amqp://u:p@10.0.0.3:5672/"),
                         ("10.0.0.2:2379", "10.0.0.3:2379"), "http://10.0.0.2:8000", "iq_key", "root", "pw \"q\"", 3, 7)
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "agent.toml").write_text('[edge]\nport = 9000\n\n[registry]\napi_key = "old"\n')  # a rejoin keeps the rest
    path = write_config(tmp_path / "etc" / "agent.toml", config, {"state_dir": "/var/lib/inferq", "agent": {"capacity": 3}})
    assert path.stat().st_mode & 0o777 == 0o600
    loaded = Settings.load(path, env={})
    assert (loaded.namespace, loaded.node, loaded.broker.urls, loaded.etcd.endpoints) == \
        ("prod", "jetson-1", config.broker_urls, config.etcd_endpoints)
    assert (loaded.etcd.password, loaded.registry.api_key, loaded.agent.capacity, loaded.broker.replicas) == ('pw "q"', "iq_key", 3, 3)
    assert loaded.edge.port == 9000
    assert render_toml({"a": True, "t": {"x": [1.5]}}) .endswith('a = true\n\n[t]\nx = [1.5]\n')


def _cached_version(root: Path, sha: str, size: int, used: float) -> None:
    directory = root / sha
    directory.mkdir(parents=True)
    (directory / "model.onnx").write_bytes(b"\0" * size)
    (directory / ".verified").touch()
    (directory / ".used").touch()
    os.utime(directory / ".used", (used, used))


def test_the_model_cache_evicts_the_least_recently_used_versions_but_never_one_in_use(tmp_path: Path) -> None:
    now = time.time()
    a, b, c = "a" * 64, "b" * 64, "c" * 64
    _cached_version(tmp_path, a, 400, now - 300)  # oldest, but in use
    _cached_version(tmp_path, b, 400, now - 200)
    _cached_version(tmp_path, c, 400, now - 100)
    cache = ModelCache(tmp_path, max_bytes=900)
    assert cache.evict(in_use={a}) == [b]
    assert sorted(cache.cached()) == [a, c]


# ---- join tokens on a real edge ----------------------------------------------------------------------------------


async def _join(http: aiohttp.ClientSession, url: str, token: str, node: str = "") -> tuple[int, dict]:
    async with http.post(f"{url}/v1/agent/join", json={"token": token, "node": node}) as resp:
        return resp.status, await resp.json()


async def test_a_join_gives_a_node_credential_that_revoke_takes_back_and_expired_or_revoked_tokens_get_401(
        synced, spawn_edge, http, tmp_path) -> None:
    edge = await spawn_edge(env={"INFERQ_EDGE_AUTH": "true"})
    timeout = synced.etcd.timeout_s
    async with open_etcd(synced.etcd) as etcd:
        admin = await create_key(etcd, synced.namespace, unique("admin"), 0, 0, timeout, role="admin")
        token = await create_token(etcd, synced.namespace, edge.url, 3600, "jetson-", timeout_s=timeout)
        expired = JoinToken(edge.url, uuid.uuid4().hex)
        await etcd.put((keys(synced.namespace).jointokens + secret_hash(expired.secret)).encode(),
                       JoinTokenRecord(time.time() - 20, time.time() - 10).to_json().encode())
        revoked = await create_token(etcd, synced.namespace, edge.url, 3600, timeout_s=timeout)
        assert await revoke_token(etcd, synced.namespace, revoked.id, timeout) == 1
    name = unique("joined")
    async with RegistryClient(edge.url, admin) as registry:
        await registry.push(name, [(write_mlp(tmp_path / "m", seed=811), "model.onnx")])

    status, body = await _join(http, edge.url, expired.encode(), "x")
    assert status == 401 and body["error"]["code"] == "unauthorized" and "expired" in body["error"]["message"], body
    status, body = await _join(http, edge.url, revoked.encode(), "x")
    assert status == 401 and "unknown or revoked" in body["error"]["message"], body
    status, body = await _join(http, edge.url, "not-a-token", "x")
    assert status == 401 and "not an inferq join token" in body["error"]["message"], body

    node = unique("orin")
    status, body = await _join(http, edge.url, token.encode(), node)
    assert status == 200, body
    joined = AgentConfig.from_json(json.dumps(body))
    assert joined.node == f"jetson-{node}" and joined.namespace == synced.namespace and joined.artifacts_url == edge.url
    assert joined.broker_user == node_user_name(synced.namespace, joined.node) and not joined.warnings, body
    assert [broker_user(u) for u in joined.broker_urls] == [joined.broker_user] * len(synced.broker.addresses)
    assert joined.etcd_endpoints == ("127.0.0.1:2379",) and joined.service_user == broker_user(synced.broker.url)
    artifact = f"{edge.url}/v1/models/{name}/versions/1/artifact"
    headers = {"Authorization": f"Bearer {joined.api_key}"}
    async with http.get(artifact, headers=headers) as resp:
        assert resp.status == 200, await resp.text()

    revoke = Process(["agent", "revoke", joined.node], synced, tmp_path / "revoke.log")
    assert await revoke.wait(30) == 0, revoke.output()
    async def refused() -> bool:
        async with http.get(artifact, headers=headers) as resp:
            return resp.status == 401
    await wait_until(refused, 10, "the revoked node credential to be refused")


@pytest.fixture(scope="module", autouse=True)
async def no_node_users_left(settings: Settings) -> AsyncIterator[None]:
    """RabbitMQ users outlive a namespace: those the joins of this module made (``<ns>.node.*``) go afterwards."""
    yield
    async with await BrokerAdmin.open(settings.tenancy.management_url, "/", 10) as admin:
        for user in await admin.users():
            if user.startswith(f"{settings.namespace}.node."):
                await admin.delete_user(user)


async def _does_what_a_worker_does(connection: aio_pika.abc.AbstractConnection, namespace: str) -> None:
    """Find the shared queues and exchanges, declare a queue of the namespace and round-trip a message through it."""
    topology = Topology(namespace)
    channel = await connection.channel(publisher_confirms=True)
    await channel.declare_queue(topology.model_queue("mlp", "1"), passive=True)
    await channel.declare_queue(topology.ledger, passive=True)
    await channel.get_exchange(topology.control, ensure=True)
    listener = await channel.declare_queue(exclusive=True)  # as a control listener: server-named, bound to control
    await listener.bind(topology.control, routing_key=f"nodecheck.{uuid.uuid4().hex}")
    queue = await channel.declare_queue(f"{namespace}.nodecheck.{uuid.uuid4().hex}", auto_delete=True)
    await channel.default_exchange.publish(aio_pika.Message(b"hello"), routing_key=queue.name)
    message = await wait_until(lambda: queue.get(fail=False), 10, "the message back")
    assert message.body == b"hello"
    await queue.delete()
    await channel.close()


@pytest.fixture
async def node_connection() -> AsyncIterator:
    """Open plain (not robust) AMQP connections, as a node would; each still open is closed afterwards."""
    opened: list[aio_pika.abc.AbstractConnection] = []

    async def connect(url: str) -> aio_pika.abc.AbstractConnection:
        opened.append(await aio_pika.connect(url, timeout=10))
        return opened[-1]

    yield connect
    for connection in opened:
        if not connection.is_closed:
            await connection.close()


async def test_a_joined_node_reaches_the_broker_as_its_own_user_and_revoke_refuses_it_and_closes_its_connections(
        synced, spawn_edge, http, node_connection, tmp_path) -> None:
    edge = await spawn_edge()
    async with open_etcd(synced.etcd) as etcd:
        token = await create_token(etcd, synced.namespace, edge.url, 3600, timeout_s=synced.etcd.timeout_s)
    node = unique("nano")
    status, body = await _join(http, edge.url, token.encode(), node)
    assert status == 200, body
    first = AgentConfig.from_json(json.dumps(body))
    user = node_user_name(synced.namespace, node)
    assert first.broker_user == user and broker_user(first.broker_urls[0]) == user
    connection = await node_connection(first.broker_urls[0])
    closed: list[BaseException | None] = []
    connection.close_callbacks.add(lambda _sender, exc=None: closed.append(exc))
    await _does_what_a_worker_does(connection, synced.namespace)
    channel = await connection.channel()
    with pytest.raises(aio_pika.exceptions.ChannelClosed, match="ACCESS_REFUSED"):  # nothing of another namespace
        await channel.declare_queue(f"other{uuid.uuid4().hex[:6]}.requests", auto_delete=True)

    status, body = await _join(http, edge.url, token.encode(), node)  # a rejoin: a new password, the old one is refused
    assert status == 200, body
    second = AgentConfig.from_json(json.dumps(body))
    assert second.broker_user == user and second.broker_urls != first.broker_urls
    with pytest.raises(aio_pika.exceptions.ProbableAuthenticationError):
        await aio_pika.connect(first.broker_urls[0], timeout=10)
    await node_connection(second.broker_urls[0])

    revoke = Process(["agent", "revoke", node], synced, tmp_path / "revoke.log")
    assert await revoke.wait(30) == 0, revoke.output()
    assert f"broker user {user}" in revoke.output() and "API key" in revoke.output(), revoke.output()
    await wait_until(lambda: closed, 5, "the revoked node's open connection to be closed")
    assert "CONNECTION_FORCED" in repr(closed[0]), closed
    with pytest.raises(aio_pika.exceptions.ProbableAuthenticationError):
        await aio_pika.connect(second.broker_urls[0], timeout=10)
    again = Process(["agent", "revoke", node], synced, tmp_path / "revoke-again.log")
    assert await again.wait(30) == 0, again.output()
    assert "nothing left to revoke" in again.output(), again.output()


async def test_the_management_api_lists_a_users_connections_and_closes_them_with_a_reason(synced, node_connection) -> None:
    user, password = node_user_name(synced.namespace, unique("closing")), uuid.uuid4().hex
    async with await BrokerAdmin.open(synced.tenancy.management_url, "/", 10) as admin:
        await admin.put_user(user, password)
        await admin.set_permissions(user, service_permissions(synced.namespace))
        connection = await node_connection(with_credentials(synced.broker.url, user, password))
        closed: list[BaseException | None] = []
        connection.close_callbacks.add(lambda _sender, exc=None: closed.append(exc))
        names = await wait_until(lambda: admin.connections_of(user), 10, "the management API to list the connection")
        assert len(names) == 1 and await admin.close_connection(names[0], REVOKED)
        await wait_until(lambda: closed, 5, "the connection to be closed")
        assert REVOKED in repr(closed[0]), closed
        assert not await admin.close_connection(names[0], REVOKED), "a connection gone already is no error"
        assert await admin.delete_user(user) and not await admin.delete_user(user)


async def test_without_the_management_api_a_join_shares_the_cluster_credentials_and_says_revoke_cannot_cut_them(
        synced, spawn_edge, http, tmp_path) -> None:
    edge = await spawn_edge(env={"INFERQ_TENANCY_MANAGEMENT_URL": "http://guest:guest@127.0.0.1:1/"})  # nothing there
    async with open_etcd(synced.etcd) as etcd:
        token = await create_token(etcd, synced.namespace, edge.url, 3600, timeout_s=synced.etcd.timeout_s)
    node = unique("shared")
    status, body = await _join(http, edge.url, token.encode(), node)
    assert status == 200, body
    joined = AgentConfig.from_json(json.dumps(body))
    assert joined.broker_urls == synced.broker.addresses and joined.broker_user == ""
    assert len(joined.warnings) == 1 and "shared broker credentials" in joined.warnings[0], joined.warnings
    assert "shared broker credentials" in edge.process.output()
    revoke = Process(["agent", "revoke", node], synced, tmp_path / "revoke.log")
    assert await revoke.wait(30) == 0, revoke.output()
    assert "revoked API key" in revoke.output() and "rotate the service user's password" in revoke.output(), revoke.output()


async def _tls_proxy(certificates: Path, target_port: int) -> asyncio.AbstractServer:
    """A TLS-terminating proxy in front of the edge (as a deployment puts one), on a free port."""
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificates / "server.pem", certificates / "server.key")

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True)

    return await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)


async def test_a_token_pinning_the_edge_certificate_joins_over_tls_and_a_wrong_pin_sends_nothing(
        synced, spawn_edge, certificates, tmp_path) -> None:
    from inferq.agent_join import join
    from inferq.errors import IntegrityError

    edge = await spawn_edge()
    proxy = await _tls_proxy(certificates, edge.port)
    try:
        url = f"https://127.0.0.1:{proxy.sockets[0].getsockname()[1]}"
        proc = Process(["agent", "token", "create", "--url", url, "--edge-cert", str(certificates / "server.pem")],
                       synced, tmp_path / "token.log")
        assert await proc.wait(30) == 0, proc.output()
        token = next(line for line in proc.output().splitlines() if line.startswith("IQJ1."))
        assert len(JoinToken.parse(token).cert_sha256) == 64
        config = await join(token, unique("tls"))
        assert config.namespace == synced.namespace and config.api_key

        wrong = JoinToken(url, JoinToken.parse(token).secret, "0" * 64).encode()
        node = unique("pinned")
        with pytest.raises(IntegrityError, match="not sending the token"):
            await join(wrong, node)
        async with open_etcd(synced.etcd) as etcd:
            assert await etcd.get((keys(synced.namespace).agents + node).encode()) is None, "the edge never saw it"
    finally:
        proxy.close()
        await proxy.wait_closed()


# ---- install, join, serve, drain, uninstall: the installed agent on the real stack -----------------------------------


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The inferq wheel of this checkout (what an edge serves at /v1/agent/inferq.whl)."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(ROOT)],
                   check=True, timeout=300, capture_output=True)
    return next(out.glob("inferq-*.whl"))


async def _run(command: list[str] | str, timeout: float, env: dict[str, str] | None = None, shell: bool = False) -> str:
    runner = asyncio.create_subprocess_shell if shell else asyncio.create_subprocess_exec
    args = [command] if shell else command
    proc = await runner(*args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode == 0, out.decode(errors="replace")[-3000:]
    return out.decode(errors="replace")


def _clean_env() -> dict[str, str]:
    """The environment of a fresh node: no INFERQ_* of the test session, no venv of ours."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"), "PYTHONUNBUFFERED": "1",
            **{k: v for k, v in os.environ.items() if k.startswith(("PIP_", "LANG", "LC_"))}}


async def _token(synced: Settings, tmp_path: Path, url: str) -> str:
    proc = Process(["agent", "token", "create", "--ttl", "1h", "--node-name-prefix", "jetson-", "--url", url],
                   synced, tmp_path / "token.log")
    assert await proc.wait(30) == 0, proc.output()
    return next(line for line in proc.output().splitlines() if line.startswith("IQJ1."))


def _check_layout(root: Path, synced: Settings, node: str) -> Settings:
    config = root / "etc/inferq/agent.toml"
    assert config.stat().st_mode & 0o777 == 0o600 and config.stat().st_uid == os.geteuid()
    settings = Settings.load(config, env={})
    assert (settings.namespace, settings.node, settings.state_dir) == (synced.namespace, node, root / "var/lib/inferq")
    assert settings.registry.api_key.startswith("iq_")
    for sub in ("artifacts", "trt", "spool", "logs"):
        assert (root / "var/lib/inferq" / sub).is_dir()
    assert (root / "opt/inferq/venv/bin/inferq").is_file()
    unit = (root / "etc/systemd/system/inferq-agent.service").read_text()
    for line in ("Restart=always", "After=network-online.target", "KillMode=mixed", "TimeoutStopSec=90",
                 f"ExecStart={root}/opt/inferq/venv/bin/inferq --config {config} agent"):
        assert line in unit.splitlines(), (line, unit)
    assert (root / "usr/local/bin/inferq-agent-uninstall").stat().st_mode & 0o777 == 0o755
    return settings


def _verify_unit(root: Path) -> None:
    """``systemd-analyze verify`` on the unit, where the tool exists (only this step is skipped without it)."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        return
    done = subprocess.run([tool, "verify", str(root / "etc/systemd/system/inferq-agent.service")],
                          capture_output=True, text=True, timeout=60)
    problems = [line for line in (done.stdout + done.stderr).splitlines() if "inferq-agent.service" in line]
    assert not problems, problems


async def _node(settings: Settings, node: str) -> NodeRecord | None:
    async with open_etcd(settings.etcd) as client:
        raw = await client.get(keys(settings.namespace).node(node).encode())
    return NodeRecord.from_json(raw.value) if raw else None


async def _ready_worker(settings: Settings, model: str) -> dict | None:
    ready = [w for w in (await live_workers(settings, model)).values() if w["state"] == "ready"]
    return ready[0] if ready else None


@pytest.mark.install
@pytest.mark.timeout(420)
@pytest.mark.parametrize("how", ["agent-install-py311", "install-sh-py310"])
async def test_an_installed_agent_joins_proves_cpu_reports_orin_facts_fetches_by_sha256_serves_200_jobs_and_drains(
        how, synced, spawn_edge, spawn_worker, amqp, wheel, tmp_path) -> None:
    if how.endswith("py310") and not PYTHON310:
        pytest.skip("no Python 3.10 under ~/.pyenv")
    edge = await spawn_edge(env={"INFERQ_EDGE_AGENT_WHEEL": str(wheel)})
    name, path = unique("edgemodel"), write_mlp(tmp_path / "model", seed=907)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    async with RegistryClient(edge.url) as registry:
        await registry.push(name, [(path, "model.onnx")])
    token, root, sysroot = await _token(synced, tmp_path, edge.url), tmp_path / "node", write_sysroot(tmp_path / "sys", ORIN)
    if how == "agent-install-py311":
        await _run([sys.executable, "-m", "inferq.cli", "agent", "install", "--server", edge.url, "--token", token,
                    "--root", str(root), "--no-start", "--wheel", str(wheel), "--python", sys.executable,
                    "--node", "orin1"], 300, _clean_env())
    else:  # the one-liner, with the wheel the edge serves and JetPack 6's Python
        await _run(f"curl -sfL {edge.url}/v1/agent/install.sh | INFERQ_TOKEN={token} sh -s -- --root {root} "
                   f"--no-start --python {PYTHON310[-1]} --node orin1", 300, _clean_env(), shell=True)
        assert (root / "opt/inferq/venv/bin/python3.10").exists()
    node_settings = _check_layout(root, synced, "jetson-orin1")
    _verify_unit(root)

    log = tmp_path / "agent.log"
    with open(log, "ab") as out:
        agent = subprocess.Popen([str(root / "opt/inferq/venv/bin/inferq"), "--config", str(root / "etc/inferq/agent.toml"),
                                  "agent", "--sysroot", str(sysroot)], env=_clean_env(), stdout=out, stderr=subprocess.STDOUT,
                                 cwd=root / "var/lib/inferq")  # as the unit's WorkingDirectory: no source tree in sight
    try:
        record = await wait_until(lambda: _node(synced, "jetson-orin1"), 60, "the installed agent's node record")
        assert record.providers == ("cpu",) and record.pid == agent.pid, record
        assert (record.facts.kind, record.facts.soc, record.facts.cuda_arch, record.facts.l4t, record.facts.power_mode) == \
            ("jetson", "tegra234", "8.7", "36.4.3", "MAXN"), record.facts

        await send(amqp.connection, amqp.topology.control, agent_key("jetson-orin1"),
                   {"command": "spawn", "model": name, "version": "1"})
        await wait_until(lambda: _ready_worker(synced, name), 90, f"the agent's worker to be ready\n{log.read_text()[-3000:]}")
        cached = root / "var/lib/inferq/artifacts" / digest / "model.onnx"
        assert hashlib.sha256(cached.read_bytes()).hexdigest() == digest, "fetched by sha256 into the node's cache"
        assert not any((root / "var/lib/inferq/repository").iterdir()), "nothing came from a model repository"
        await wait_until(lambda: _cached_in_record(synced, digest), 10, "the cache in the node record")

        inputs = [sample("mlp", seed=i) for i in range(200)]
        ids = [await amqp.submit(name, {"x": x}, job_id=f"{name}-{i}") for i, x in enumerate(inputs)]
        await wait_until(lambda: sum(j in amqp.results for j in ids) >= 20, 60, "the first results")
        agent.send_signal(signal.SIGTERM)  # as systemd stops it: the worker drains, hands back what it has not begun
        assert await asyncio.to_thread(agent.wait, 60) == 0, log.read_text()[-3000:]
        assert not await _ready_worker(synced, name)
        served_by_agent = sum(j in amqp.results for j in ids)
        await spawn_worker(name, "--version", "1")  # another node takes over the rest: none was lost
        results = await amqp.wait_results(ids, 120)
        reference = ort.InferenceSession(str(path))
        for i, job_id in enumerate(ids):
            assert results[job_id]["status"] == "succeeded", results[job_id]
            np.testing.assert_allclose(amqp.outputs(results[job_id])["probs"], reference.run(None, {"x": inputs[i]})[0],
                                       rtol=1e-5, atol=1e-6)
        assert served_by_agent >= 20 and max(amqp.reply_counts[j] for j in ids) == 1, "each job answered once"
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(10)
    await _run([str(root / "usr/local/bin/inferq-agent-uninstall")], 60, _clean_env())
    assert not root.exists(), sorted(str(p) for p in root.rglob("*"))[:20]


async def _cached_in_record(settings: Settings, digest: str) -> bool:
    record = await _node(settings, "jetson-orin1")
    return record is not None and digest in record.cached


# ---- model fetch: a corrupted download is rejected and retried -----------------------------------------------------


@pytest.fixture
async def spawn_node_agent(tmp_path: Path) -> AsyncIterator:
    """Real ``inferq agent`` processes with a state dir and an empty model repository of their own (a node)."""
    started: list[Process] = []

    def spawn(node: str, settings: Settings, repository: Path | None = None) -> Process:
        if repository is None:
            repository = tmp_path / f"{node}-repo"
            repository.mkdir(exist_ok=True)
        mine = replace(settings, state_dir=tmp_path / f"{node}-state", model_repository=repository)
        proc = Process(["agent", "--node", node], mine, tmp_path / f"agent-{node}.log")
        started.append(proc)
        return proc

    yield spawn
    await asyncio.gather(*(p.stop(timeout=40) for p in started))


async def test_a_corrupted_artifact_download_is_rejected_and_retried_until_the_bytes_match(
        synced, spawn_edge, spawn_node_agent, amqp, tmp_path) -> None:
    edge = await spawn_edge()
    name, path = unique("corrupt"), write_mlp(tmp_path / "model", seed=913)
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    async with RegistryClient(edge.url) as registry:
        await registry.push(name, [(path, "model.onnx")])
    node = unique("n")
    agent = spawn_node_agent(node, replace(synced, registry=replace(synced.registry, artifacts_url=edge.url)))
    await wait_until(lambda: _node(synced, node), 30, "the agent's node record")
    blob = synced.model_repository / ".blobs" / "sha256" / digest
    os.chmod(blob, 0o644)
    blob.write_bytes(data[:-4] + b"\x00\x00\x00\x00")  # the store gone bad: same size, other bytes
    try:
        await send(amqp.connection, amqp.topology.control, agent_key(node), {"command": "spawn", "model": name, "version": "1"})
        await wait_until(lambda: "the download was discarded" in agent.output() and "retrying" in agent.output(), 30,
                         "the bad download to be rejected")
        assert not await live_workers(synced, name), "no worker started on unverified bytes"
    finally:
        blob.write_bytes(data)
    await wait_until(lambda: _ready_worker(synced, name), 60, "the worker, once a download verified")
    cached = tmp_path / f"{node}-state" / "artifacts" / digest / "model.onnx"
    assert cached.read_bytes() == data and not cached.with_name("model.onnx.part").exists()


# ---- variants: an Orin runs the tegra234 variant, a host the default ------------------------------------------------


async def _ready_by_node(settings: Settings, model: str, nodes: set[str]) -> dict[str, dict] | None:
    ready = {w["node"]: w for w in (await live_workers(settings, model)).values() if w["state"] == "ready"}
    return ready if set(ready) >= nodes else None


async def test_an_orin_agent_runs_the_tegra234_variant_and_a_host_agent_the_default_each_fetched_by_its_sha256(
        synced, spawn_edge, spawn_node_agent, amqp, http, tmp_path) -> None:
    name = unique("variant")
    default, int8 = write_mlp(tmp_path / "v1", seed=921), write_mlp(tmp_path / "int8", seed=922)  # other weights, other outputs
    edge = await spawn_edge()
    async with RegistryClient(edge.url) as registry:
        await registry.push(name, [(default, "model.onnx"), (int8, "model-int8.onnx")],
                            config='[variants.int8]\nfile = "model-int8.onnx"\nsoc = "tegra234"\n')
    orin, host = unique("orin"), unique("host")
    fetching = replace(synced, registry=replace(synced.registry, artifacts_url=edge.url))
    for node, files in ((orin, ORIN), (host, HOST)):
        sysroot = write_sysroot(tmp_path / f"{node}-sys", files)
        spawn_node_agent(node, replace(fetching, agent=replace(fetching.agent, sysroot=str(sysroot))))
        await wait_until(lambda: _node(synced, node), 30, f"the node record of {node}")
        await send(amqp.connection, amqp.topology.control, agent_key(node), {"command": "spawn", "model": name, "version": "1"})
    workers = await wait_until(lambda: _ready_by_node(synced, name, {orin, host}), 90, "a ready worker on each node")
    assert (workers[orin]["variant"], workers[host]["variant"]) == ("int8", ""), workers
    for node, path in ((orin, int8), (host, default)):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assert (tmp_path / f"{node}-state" / "artifacts" / digest / "model.onnx").read_bytes() == path.read_bytes()
    async with http.get(f"{edge.url}/v1/models/{name}") as resp:
        shown = {w["node"]: w["variant"] for w in (await resp.json())["workers"]}
    assert shown == {orin: "int8", host: ""}, "GET /v1/models/{m} says which variant each worker runs"

    inputs = [sample("mlp", seed=i) for i in range(200)]
    ids = [await amqp.submit(name, {"x": x}, job_id=f"{name}-{i}") for i, x in enumerate(inputs)]
    results = await amqp.wait_results(ids, 60)
    references = {"int8": ort.InferenceSession(str(int8)), "default": ort.InferenceSession(str(default))}
    ran = Counter()
    for i, job_id in enumerate(ids):
        assert results[job_id]["status"] == "succeeded", results[job_id]
        got = amqp.outputs(results[job_id])["probs"]
        expected = {k: ref.run(None, {"x": inputs[i]})[0] for k, ref in references.items()}
        assert not np.allclose(expected["int8"], expected["default"], rtol=1e-3), "the two files give other outputs"
        (which,) = [k for k, want in expected.items() if np.allclose(got, want, rtol=1e-5, atol=1e-6)]
        ran[which] += 1
    assert set(ran) == {"int8", "default"} and sum(ran.values()) == len(ids), ran  # both nodes served, each its own file


async def _decision_reason(settings: Settings, model: str) -> str:
    async with open_etcd(settings.etcd) as client:
        raw = await client.get(f"{keys(settings.namespace).decisions}{model}.1".encode())
    return json.loads(raw.value)["reason"] if raw else ""


async def test_the_autoscaler_places_a_model_requiring_a_jetson_only_on_one_and_says_why_each_other_node_was_passed_over(
        synced, spawn_edge, spawn_node_agent, spawn_autoscaler, tmp_path) -> None:
    name = unique("jetsononly")
    edge = await spawn_edge()
    async with RegistryClient(edge.url) as registry:
        await registry.push(name, [(write_mlp(tmp_path / "v1", seed=931), "model.onnx"),
                                   (write_mlp(tmp_path / "int8", seed=932), "model-int8.onnx")],
                            config='require = { kind = "jetson" }\n[scaling]\nmin_workers = 1\nmax_workers = 1\n'
                                   'scale_up_stabilization_s = 0\n[variants.int8]\nfile = "model-int8.onnx"\nsoc = "tegra234"\n')
    fetching = replace(synced, registry=replace(synced.registry, artifacts_url=edge.url))

    def agent(node: str, files: dict[str, str]) -> None:
        sysroot = write_sysroot(tmp_path / f"{node}-sys", files)
        spawn_node_agent(node, replace(fetching, agent=replace(fetching.agent, sysroot=str(sysroot))))

    host, orin = unique("host"), unique("orin")
    agent(host, HOST)
    await wait_until(lambda: _node(synced, host), 30, "the host's node record")
    await spawn_autoscaler(name, "--launcher", "agent")
    reason = await wait_until(lambda: _decision_reason(synced, name), 30, "a decision")
    await wait_until(lambda: _passed_over(synced, name, host), 30, "the reason the host was passed over")
    assert not await live_workers(synced, name), reason
    agent(orin, ORIN)
    workers = await wait_until(lambda: _ready_by_node(synced, name, {orin}), 90, "the worker on the Orin")
    assert workers[orin]["variant"] == "int8" and len(workers) == 1, workers


async def _passed_over(settings: Settings, model: str, host: str) -> bool:
    return f"{host}: does not meet require: kind is 'host', not 'jetson'" in await _decision_reason(settings, model)


async def test_a_joined_node_serves_edge_jobs_with_auth_on_as_its_own_user_and_revoke_cuts_its_agent_off_the_broker(
        synced, spawn_edge, spawn_node_agent, amqp, http, tmp_path) -> None:
    edge = await spawn_edge(env={"INFERQ_EDGE_AUTH": "true"})
    async with open_etcd(synced.etcd) as etcd:
        key = await create_key(etcd, synced.namespace, unique("acme"), 0, 0, synced.etcd.timeout_s)
        token = await create_token(etcd, synced.namespace, edge.url, 3600, timeout_s=synced.etcd.timeout_s)
    status, body = await _join(http, edge.url, token.encode(), unique("secure"))
    assert status == 200, body
    joined = AgentConfig.from_json(json.dumps(body))
    path = write_config(tmp_path / "agent.toml", joined, {})
    mine = Settings.load(path, env={})
    assert broker_user(mine.broker.url) == joined.broker_user and mine.tenancy.service_user == broker_user(synced.broker.url)
    mine = replace(synced, broker=mine.broker, tenancy=mine.tenancy, edge=replace(synced.edge, auth=True))
    spawn_node_agent(joined.node, mine, synced.model_repository)
    await wait_until(lambda: _node(synced, joined.node), 30, "the agent's node record")
    await send(amqp.connection, amqp.topology.control, agent_key(joined.node), {"command": "spawn", "model": "mlp", "version": "1"})
    await wait_until(lambda: _worker_of(synced, joined.node), 60, "the agent's worker")
    async with http.post(f"{edge.url}/v1/models/mlp/jobs?wait=30", json={"inputs": [v2_input(sample("mlp"))]},
                         headers={"Authorization": f"Bearer {key}"}) as resp:
        assert resp.status == 200 and (await resp.json())["status"] == "succeeded", "the node judged the edge's job its own"

    async with await BrokerAdmin.open(synced.tenancy.management_url, "/", 10) as admin:
        assert len(await wait_until(lambda: admin.connections_of(joined.broker_user), 10, "the node's connections")) >= 2
        revoke = Process(["agent", "revoke", joined.node], synced, tmp_path / "revoke.log")
        assert await revoke.wait(30) == 0, revoke.output()
        await wait_until(lambda: async_not(admin.connections_of(joined.broker_user)), 10, "the node cut off the broker")


async def async_not(awaitable: Any) -> bool:
    return not await awaitable


async def test_a_restarted_agent_starts_again_the_workers_it_ran_before_it_was_killed(
        synced, spawn_node_agent, amqp, tmp_path) -> None:
    node = unique("reboot")
    first = spawn_node_agent(node, synced, synced.model_repository)
    await wait_until(lambda: _node(synced, node), 30, "the agent's node record")
    await send(amqp.connection, amqp.topology.control, agent_key(node), {"command": "spawn", "model": "mlp", "version": "1"})
    before = await wait_until(lambda: _worker_of(synced, node), 60, "the agent's worker")
    first.kill()  # a power cut: the agent and, by their lifeline, its workers die at once
    await first.wait(10)
    await wait_until(lambda: _gone(synced, before), 30, "the killed worker's record to go")
    second = spawn_node_agent(node, synced, synced.model_repository)  # the reboot: no spawn command is sent
    after = await wait_until(lambda: _worker_of(synced, node), 60, "the worker started again by the new agent")
    assert after != before and "as before the agent's restart" in second.output()


async def _worker_of(settings: Settings, node: str) -> str | None:
    ready = [k for k, w in (await live_workers(settings, "mlp")).items() if k.startswith(f"{node}-") and w["state"] == "ready"]
    return ready[0] if ready else None


async def _gone(settings: Settings, worker_id: str) -> bool:
    return worker_id not in await live_workers(settings, "mlp")


# ---- offline: the agent starts while etcd and RabbitMQ are down ----------------------------------------------------


async def test_the_agent_starts_while_etcd_and_rabbitmq_are_down_and_joins_when_they_come_up_without_a_restart(
        settings, own_broker, own_etcd, spawn_node_agent, tmp_path) -> None:
    repository = write_demo_repository(tmp_path / "repo", {"mlp": "mlp"})
    mine = replace(settings, namespace=f"t{uuid.uuid4().hex[:8]}", model_repository=repository,
                   broker=replace(settings.broker, url=own_broker.url),
                   etcd=EtcdSettings(port=own_etcd.spec.client_port, lease_ttl_s=3, timeout_s=2.0))
    await asyncio.to_thread(own_broker.stop)
    await asyncio.to_thread(own_etcd.stop)
    agent = spawn_node_agent("offline1", mine, repository)
    try:
        await wait_until(lambda: "broker unreachable" in agent.output(), 30, "the agent to run without the broker")
        assert agent.alive(), agent.output()
        pid = agent.pid
        own_etcd.launch()
        await asyncio.to_thread(own_etcd.wait_ready, 60)
        await own_broker.astart()
        record = await wait_until(lambda: _reconnected(mine, "offline1"), 60, f"the node record after the outage")
        assert record.pid == pid and 0 < record.disconnected_since < record.reconnected_at, record
        await sync_repository(mine)
        client = await AmqpClient.open(mine)
        try:  # its control listener is live: a spawn starts a worker, still with no restart of the agent
            await send(client.connection, client.topology.control, agent_key("offline1"),
                       {"command": "spawn", "model": "mlp", "version": "1"})
            await wait_until(lambda: _ready_worker(mine, "mlp"), 60, "a worker of the reconnected agent")
        finally:
            await client.aclose()
        assert agent.alive() and agent.pid == pid
    finally:
        await agent.stop(timeout=40)
        await remove_namespace(mine)


async def _reconnected(settings: Settings, node: str) -> NodeRecord | None:
    try:
        record = await _node(settings, node)
    except Exception:  # etcd still starting
        return None
    return record if record and record.reconnected_at > 0 else None


async def test_an_agent_refuses_a_spawn_from_a_leader_older_than_one_it_has_heard(synced, spawn_node_agent, amqp) -> None:
    node = unique("fence")
    agent = spawn_node_agent(node, synced, synced.model_repository)
    await wait_until(lambda: _node(synced, node), 30, "the agent's node record")
    spawn = {"command": "spawn", "model": "mlp", "version": "1"}
    await send(amqp.connection, amqp.topology.control, agent_key(node), {**spawn, "fence": 7})
    first = await wait_until(lambda: _worker_of(synced, node), 60, "the worker the newer leader asked for")
    await send(amqp.connection, amqp.topology.control, agent_key(node), {**spawn, "fence": 3})  # a paused ex-leader
    await wait_until(lambda: "older leader" in agent.output(), 10, "the agent to refuse the stale spawn")
    workers = [k for k in await live_workers(synced, "mlp") if k.startswith(f"{node}-")]
    assert workers == [first]
