"""Scaling on Kubernetes, tested at the HTTP boundary: the kubernetes launcher and KEDA's scaling endpoint.

There is no Kubernetes here. The launcher talks to a stub API server that the
test runs on 127.0.0.1 over TLS (its own CA, as a pod's service account has):
the stub checks every request the way the API server would for these calls
(path, bearer token, merge-patch content type, the Scale body) and keeps the
replicas. The autoscaler and edge are real processes on the real RabbitMQ
and etcd; only the API server is a stand-in.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from inferq.actors.kube import KubeAccess, KubernetesLauncher, deployment_name
from inferq.errors import ConfigError, NoCapacity
from inferq.runtime.services import free_port
from tests.conftest import sample, set_policy
from tests.support import live_workers, wait_until
from tests.test_tls import certificates  # noqa: F401 (fixture: a CA, server and client certificates)

NAMESPACE = "inferq-test"
TOKEN = "token-one"


@dataclass
class StubApiServer:
    """The part of the Kubernetes API the launcher uses: GET and PATCH of ``deployments/{name}/scale``."""

    token: str
    replicas: dict[str, int] = field(default_factory=lambda: {"inferq-worker-mlp": 1})
    forbidden: set[str] = field(default_factory=lambda: {"inferq-worker-secret"})
    requests: list[tuple[str, str, dict | None]] = field(default_factory=list)  # method, path, body
    port: int = 0

    def app(self) -> web.Application:
        app = web.Application()
        path = "/apis/apps/v1/namespaces/{namespace}/deployments/{name}/scale"
        app.router.add_get(path, self.scale)
        app.router.add_patch(path, self.scale)
        return app

    async def scale(self, request: web.Request) -> web.Response:
        body = await request.json() if request.method == "PATCH" else None
        self.requests.append((request.method, request.path, body))
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return status(401, "Unauthorized")
        namespace, name = request.match_info["namespace"], request.match_info["name"]
        if name in self.forbidden:
            return status(403, f'deployments.apps "{name}" is forbidden: cannot patch resource "deployments/scale"')
        if namespace != NAMESPACE or name not in self.replicas:
            return status(404, f'deployments.apps "{name}" not found')
        if request.method == "PATCH":
            if request.content_type != "application/merge-patch+json":
                return status(415, f"unsupported media type {request.content_type}")
            replicas = body.get("spec", {}).get("replicas")
            if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0 or set(body) != {"spec"}:
                return status(422, f"invalid scale patch {body}")
            self.replicas[name] = replicas
        return web.json_response({"kind": "Scale", "apiVersion": "autoscaling/v1",
                                  "metadata": {"name": name, "namespace": namespace},
                                  "spec": {"replicas": self.replicas[name]}, "status": {"replicas": self.replicas[name]}})

    def patches(self, name: str) -> list[int]:
        return [body["spec"]["replicas"] for method, path, body in self.requests
                if method == "PATCH" and path.endswith(f"/{name}/scale") and body]


def status(code: int, message: str) -> web.Response:
    return web.json_response({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message,
                              "code": code}, status=code)


@pytest.fixture
async def api_server(certificates: Path) -> AsyncIterator[StubApiServer]:  # noqa: F811
    stub = StubApiServer(TOKEN)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificates / "server.pem", certificates / "server.key")
    runner = web.AppRunner(stub.app())
    await runner.setup()
    stub.port = free_port()
    await web.TCPSite(runner, "127.0.0.1", stub.port, ssl_context=context).start()
    try:
        yield stub
    finally:
        await runner.cleanup()


@pytest.fixture
def service_account(tmp_path: Path, certificates: Path) -> Path:  # noqa: F811
    """What Kubernetes mounts into a pod: token, ca.crt, namespace."""
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "token").write_text(TOKEN + "\n")
    (account / "ca.crt").write_bytes((certificates / "ca.pem").read_bytes())
    (account / "namespace").write_text(NAMESPACE)
    return account


def in_cluster(api_server: StubApiServer, account: Path) -> KubeAccess:
    env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(api_server.port)}
    return KubeAccess.in_cluster(env, account)


async def test_the_launcher_patches_the_scale_of_the_models_deployment_as_the_pods_service_account(
        api_server: StubApiServer, service_account: Path) -> None:
    launcher = await KubernetesLauncher.open(in_cluster(api_server, service_account), "inferq-worker-{model}")
    try:
        assert await launcher.scale_to("mlp", "1", 3) is True
        assert api_server.requests[-1] == (
            "PATCH", f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/inferq-worker-mlp/scale", {"spec": {"replicas": 3}})
        assert await launcher.replicas("mlp", "1") == 3
        sent = len(api_server.requests)
        assert await launcher.scale_to("mlp", "1", 3) is False and len(api_server.requests) == sent, "an unchanged count is not sent"

        (service_account / "token").write_text("token-two")  # the kubelet rotated the projected token
        api_server.token = "token-two"
        await launcher.spawn("mlp", "1", [])
        assert api_server.replicas["inferq-worker-mlp"] == 4
        launcher.forget()
        await launcher.scale_to("mlp", "1", 4)
        assert api_server.patches("inferq-worker-mlp") == [3, 4, 4], "after forget() a new term sends its count again"
    finally:
        await launcher.aclose()


async def test_a_forbidden_or_missing_deployment_is_a_config_error_that_says_why(
        api_server: StubApiServer, service_account: Path) -> None:
    launcher = await KubernetesLauncher.open(in_cluster(api_server, service_account), "inferq-worker-{model}")
    try:
        with pytest.raises(ConfigError, match="may not scale.*Role"):
            await launcher.scale_to("secret", "1", 2)
        with pytest.raises(ConfigError, match="no such Deployment.*kube_deployment"):
            await launcher.scale_to("cnn", "1", 2)
    finally:
        await launcher.aclose()


async def test_an_api_server_whose_certificate_the_service_accounts_ca_did_not_sign_is_refused(
        api_server: StubApiServer, service_account: Path, tmp_path: Path) -> None:
    access = in_cluster(api_server, service_account)
    other = await KubernetesLauncher.open(KubeAccess(access.api_url, NAMESPACE, access.token_file, None), "inferq-worker-{model}")
    try:
        with pytest.raises(NoCapacity, match="did not answer"):
            await other.scale_to("mlp", "1", 2)
    finally:
        await other.aclose()
    assert api_server.requests == [], "no request may reach a server that the CA does not vouch for"


def test_the_in_cluster_access_needs_the_pods_environment_and_its_service_account(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="KUBERNETES_SERVICE_HOST"):
        KubeAccess.in_cluster({}, tmp_path)
    with pytest.raises(ConfigError, match="service account"):
        KubeAccess.in_cluster({"KUBERNETES_SERVICE_HOST": "10.0.0.1"}, tmp_path / "missing")
    assert deployment_name("w-{model}-v{version}", "mlp", "2") == "w-mlp-v2"
    with pytest.raises(ConfigError):
        deployment_name("w-{modle}", "mlp", "2")


async def test_the_autoscaler_with_the_kubernetes_launcher_scales_the_deployment_on_backlog_and_starts_nothing_itself(
        synced, spawn_autoscaler, amqp, api_server: StubApiServer, service_account: Path) -> None:
    api_server.replicas = {"inferq-worker-kubescaled": 0}
    await set_policy(synced, "kubescaled", min_workers=0, max_workers=3, target_backlog_per_worker=40)
    for i in range(100):
        await amqp.submit("kubescaled", {"x": sample("mlp", seed=i)})
    env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(api_server.port),
           "INFERQ_AUTOSCALER_KUBE_SERVICE_ACCOUNT": str(service_account)}
    autoscaler = await spawn_autoscaler("kubescaled", "--launcher", "kubernetes", env=env)

    # 100 jobs waiting, 40 per worker: ceil(100 / 40) = 3 replicas.
    await wait_until(lambda: api_server.replicas["inferq-worker-kubescaled"] == 3, 30, "the Deployment scaled to 3",
                     interval=0.2)
    assert autoscaler.alive(), autoscaler.output()
    assert await live_workers(synced, "kubescaled") == {}, "Kubernetes starts the pods, not the autoscaler"
    assert all(method in ("GET", "PATCH") for method, _, _ in api_server.requests)


async def test_the_scaling_endpoint_answers_the_autoscalers_desired_workers_in_kedas_metrics_api_shape(
        synced, spawn_autoscaler, spawn_edge, amqp) -> None:
    edge = await spawn_edge()
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{edge.url}/v1/models/kedascaled/scaling") as resp:
            assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_found", "no decision yet"
        async with http.get(f"{edge.url}/v1/models/no-such-model/scaling") as resp:
            assert resp.status == 404
        await set_policy(synced, "kedascaled", min_workers=0, max_workers=4, target_backlog_per_worker=25)
        for i in range(60):
            await amqp.submit("kedascaled", {"x": sample("mlp", seed=i)})
        await spawn_autoscaler("kedascaled", "--launcher", "none")

        async def answer() -> dict | None:
            async with http.get(f"{edge.url}/v1/models/kedascaled/scaling") as resp:
                doc = await resp.json()
                return doc if resp.status == 200 and doc["desired_workers"] == 3 else None

        doc = await wait_until(answer, 30, "a decision of 3 workers (60 jobs, 25 per worker)", interval=0.2)
    # KEDA reads valueLocation "desired_workers" (deploy/kubernetes/components/keda).
    assert (doc["model"], doc["version"], doc["backlog"], doc["current_workers"]) == ("kedascaled", "1", 60, 0)
    assert doc["age_s"] is not None and doc["age_s"] < 30 and doc["decided_by"]
    await asyncio.sleep(1)
    assert await live_workers(synced, "kedascaled") == {}, "launcher none decides and starts nothing"
    json.dumps(doc)  # plain JSON, as KEDA's scaler parses it
