"""The Kubernetes launcher: the autoscaler sets the replicas of a model's worker Deployment.

Unlike the local and agent launchers, which start one worker and drain a
chosen one, this launcher is declarative: the acting autoscaler PATCHes the
``scale`` subresource of the model version's Deployment to the number it
decided, and Kubernetes starts pods or stops them (a stopped worker gets
SIGTERM, drains and hands its prefetched jobs back within the pod's grace
period). Kubernetes picks which pods go; the autoscaler sends no drain.

It talks to the API server with aiohttp, as the pod's service account: the
token and CA that Kubernetes mounts at ``/var/run/secrets/kubernetes.io/
serviceaccount`` and the ``KUBERNETES_SERVICE_HOST``/``_PORT`` variables. The
Role in deploy/kubernetes/base/autoscaler.yaml grants ``deployments/scale``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from inferq.actors.launcher import Exit
from inferq.errors import ConfigError, NoCapacity

log = logging.getLogger("inferq.kube")

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
MERGE_PATCH = "application/merge-patch+json"


@dataclass(frozen=True)
class KubeAccess:
    """Where the API server is and how to authenticate to it."""

    api_url: str
    namespace: str
    token_file: Path
    ca_file: Path | None = None  # None: the system's trust store

    @classmethod
    def in_cluster(cls, env: Mapping[str, str] | None = None, account: Path = SERVICE_ACCOUNT) -> KubeAccess:
        """The pod's own service account, as Kubernetes mounts it."""
        env = os.environ if env is None else env
        host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise ConfigError("the kubernetes launcher runs inside a pod: KUBERNETES_SERVICE_HOST is not set")
        try:
            namespace = (account / "namespace").read_text().strip()
        except OSError as exc:
            raise ConfigError(f"no service account is mounted at {account}: {exc}") from exc
        host = f"[{host}]" if ":" in host else host
        return cls(f"https://{host}:{port}", namespace, account / "token", account / "ca.crt")

    def token(self) -> str:
        """The bearer token, read afresh: the kubelet rotates projected tokens in place."""
        try:
            return self.token_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read the service account token {self.token_file}: {exc}") from exc


def deployment_name(template: str, model: str, version: str) -> str:
    """The Deployment of a model version: ``template`` with ``{model}`` and ``{version}`` filled in."""
    try:
        return template.format(model=model, version=version)
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(f"autoscaler.kube_deployment {template!r} may use only {{model}} and {{version}}") from exc


class KubernetesLauncher:
    """Scales worker Deployments; build it with :meth:`open`, close it with :meth:`aclose`."""

    def __init__(self, access: KubeAccess, template: str, timeout_s: float, session: aiohttp.ClientSession) -> None:
        self.access = access
        self.template = template
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session = session
        self._set: dict[tuple[str, str], int] = {}  # what this launcher last set, so an unchanged count is not sent again

    @classmethod
    async def open(cls, access: KubeAccess, template: str, timeout_s: float = 10.0) -> KubernetesLauncher:
        """A launcher with its own HTTP session, trusting ``access.ca_file``."""
        try:
            context = ssl.create_default_context(cafile=str(access.ca_file) if access.ca_file else None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the Kubernetes CA {access.ca_file}: {exc}") from exc
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context))
        return cls(access, template, timeout_s, session)

    def _scale_url(self, model: str, version: str) -> str:
        name = deployment_name(self.template, model, version)
        return f"{self.access.api_url}/apis/apps/v1/namespaces/{self.access.namespace}/deployments/{name}/scale"

    async def replicas(self, model: str, version: str) -> int:
        """The Deployment's wanted replicas now (``spec.replicas`` of its scale)."""
        scale = await self._call("GET", self._scale_url(model, version))
        return int(scale.get("spec", {}).get("replicas", 0))

    async def scale_to(self, model: str, version: str, replicas: int) -> bool:
        """Set the Deployment's replicas; False when this launcher had set that number already."""
        key = (model, version)
        if self._set.get(key) == replicas:
            return False
        body = json.dumps({"spec": {"replicas": replicas}})
        scale = await self._call("PATCH", self._scale_url(model, version), body, MERGE_PATCH)
        self._set[key] = int(scale.get("spec", {}).get("replicas", replicas))
        log.info("scaled %s to %d replicas", deployment_name(self.template, model, version), replicas)
        return True

    async def spawn(self, model: str, version: str, requires: list[str], require: Any = None) -> str:
        """One more replica (the Launcher protocol's way); the autoscaler itself uses :meth:`scale_to`."""
        count = await self.replicas(model, version) + 1
        self._set.pop((model, version), None)
        await self.scale_to(model, version, count)
        return f"deployment:{deployment_name(self.template, model, version)}"

    def reap(self) -> list[Exit]:
        """Kubernetes restarts and reports its pods; nothing exits here."""
        return []

    def forget(self) -> None:
        """Drop what was set (a new leader, or after a pause, sends its numbers again)."""
        self._set.clear()

    async def aclose(self) -> None:
        """Close the HTTP session; the Deployments keep their replicas."""
        await self._session.close()

    async def _call(self, method: str, url: str, body: str | None = None, content_type: str | None = None) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.access.token()}", "Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        try:
            async with self._session.request(method, url, data=body, headers=headers, timeout=self._timeout) as resp:
                text = await resp.text()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, ssl.SSLError) as exc:
            raise NoCapacity(f"the Kubernetes API at {self.access.api_url} did not answer {method}: {exc!r}") from exc
        if status >= 400:
            raise _api_error(status, method, url, text)
        try:
            return json.loads(text)
        except ValueError as exc:
            raise NoCapacity(f"the Kubernetes API answered {method} {url} with no JSON: {text[:200]!r}") from exc


def _api_error(status: int, method: str, url: str, text: str) -> Exception:
    try:
        message = json.loads(text).get("message", text)
    except (ValueError, AttributeError):
        message = text
    what = f"{method} {url.split('/apis/', 1)[-1]}: {status} {str(message)[:300]}"
    if status in (401, 403):
        return ConfigError(f"the autoscaler's service account may not scale the Deployment ({what}); see its Role")
    if status == 404:
        return ConfigError(f"no such Deployment ({what}); autoscaler.kube_deployment names each model's Deployment")
    return NoCapacity(f"the Kubernetes API refused to scale ({what})")


async def open_in_cluster(template: str, account: Path = SERVICE_ACCOUNT, timeout_s: float = 10.0) -> KubernetesLauncher:
    """The launcher of an autoscaler running in a pod (its service account mounted at ``account``)."""
    access = await asyncio.to_thread(KubeAccess.in_cluster, None, account)
    return await KubernetesLauncher.open(access, template, timeout_s)
