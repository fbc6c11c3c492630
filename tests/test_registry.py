"""The model registry on the real stack: push, split, rollback, auto-rollback, shadow, artifacts, removal.

Every test pushes models of its own (built here with fixed seeds, so two versions
give different outputs) through a real edge, with real workers started by a real
autoscaler, and checks each job's outputs against onnxruntime run on the file of
the version the job says it ran on.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import onnxruntime as ort
import pytest

from inferq.broker.messages import JobRequest
from inferq.client.registry import RegistryClient
from inferq.edge.auth import create_key
from inferq.errors import Conflict, InvalidInput
from inferq.runtime.coordination import keys, open_etcd
from inferq.runtime.demo import write_demo_repository
from inferq.runtime.routing import bucket
from tests.conftest import sample, set_policy
from tests.models import write_mlp
from tests.support import Process, declared, ledger_events, live_workers, wait_until

pytestmark = [pytest.mark.features, pytest.mark.timeout(300)]  # a feature suite that starts many processes: make test-features (CI runs it after make test)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def v2_input(x: np.ndarray) -> dict[str, Any]:
    return {"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}


def outputs_of(doc: dict[str, Any]) -> np.ndarray:
    (out,) = doc["outputs"]
    return np.asarray(out["data"], np.float32).reshape(out["shape"])


class Reference:
    """onnxruntime on the very files that were pushed, per version."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.sessions = {v: ort.InferenceSession(str(p)) for v, p in files.items()}

    def __call__(self, version: str, x: np.ndarray) -> np.ndarray:
        return self.sessions[version].run(None, {"x": x})[0]


async def submit(http: aiohttp.ClientSession, url: str, model: str, x: np.ndarray, headers: dict[str, str] | None = None,
                 route: str = "jobs", expect: int = 202) -> dict[str, Any]:
    async with http.post(f"{url}/v1/models/{model}/{route}", json={"inputs": [v2_input(x)]}, headers=headers) as resp:
        body = await resp.json()
        assert resp.status == expect, body
        return body


async def poll(http: aiohttp.ClientSession, url: str, job_id: str, wait: float = 30) -> dict[str, Any]:
    async with http.get(f"{url}/v1/jobs/{job_id}", params={"wait": str(wait)}) as resp:
        assert resp.status == 200, await resp.text()
        doc = await resp.json()
    assert doc["status"] not in ("queued", "running"), doc
    return doc


async def document(http: aiohttp.ClientSession, url: str, model: str) -> dict[str, Any]:
    async with http.get(f"{url}/v1/models/{model}") as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def effective(http: aiohttp.ClientSession, url: str, model: str, alias: str, percent: int) -> bool:
    return (await document(http, url, model))["traffic"]["effective"].get(alias) == percent


async def gather_limited(calls: list[Callable[[], Any]], limit: int = 32) -> list[Any]:
    gate = asyncio.Semaphore(limit)

    async def one(call: Callable[[], Any]) -> Any:
        async with gate:
            return await call()

    return await asyncio.gather(*(one(c) for c in calls))


async def run_cli(synced, tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    proc = Process(list(args), synced, tmp_path / f"cli-{uuid.uuid4().hex[:6]}.log", env)
    code = await proc.wait(60)
    return code, proc.output()


async def history(http: aiohttp.ClientSession, url: str, model: str) -> list[dict[str, Any]]:
    async with http.get(f"{url}/v1/models/{model}/history") as resp:
        return (await resp.json())["history"]


async def pushed(registry: RegistryClient, model: str, *paths: Path) -> list[str]:
    return [(await registry.push(model, [(p, "model.onnx")]))["version"] for p in paths]


def expected_alias(model: str, key: str, weights: dict[str, int]) -> str:
    """The alias the split rule gives ``key`` (aliases in name order over [0, 100))."""
    point, upto = bucket(model, key), 0
    for name in sorted(weights):
        upto += weights[name]
        if point < upto:
            return name
    raise AssertionError("weights do not sum to 100")


# --- traffic split -------------------------------------------------------------------------------------------------


@pytest.fixture
async def split_stack(synced, spawn_edge, spawn_autoscaler, http, tmp_path):
    """A model with v1 (stable) and v2 (canary) ready behind a 50/50 split, two edges and an autoscaler."""
    name = unique("split")
    files = {"1": write_mlp(tmp_path / "v1", seed=101), "2": write_mlp(tmp_path / "v2", seed=102)}
    edge, other = await spawn_edge(), await spawn_edge()
    async with RegistryClient(edge.url) as registry:
        assert await pushed(registry, name, files["1"], files["2"]) == ["1", "2"]
        await registry.set_alias(name, "canary", "2", reason="try v2")
        await set_policy(synced, name, min_workers=1, max_workers=2)
        scaler = await spawn_autoscaler(name)
        await registry.set_traffic(name, {"stable": 50, "canary": 50}, reason="even split")
    for url in (edge.url, other.url):
        await wait_until(lambda: effective(http, url, name, "canary", 50), 90, "the canary's gate to open", interval=0.3)
    await wait_until(lambda: "unpinned jobs now go to the router" in scaler.output(), 30, "the router binding")
    return name, edge, other, Reference(files)


async def test_a_50_50_split_over_400_jobs_runs_each_on_its_version_in_proportion_for_http_and_amqp(split_stack, synced, http, amqp) -> None:
    name, edge, _, reference = split_stack
    inputs = [sample("mlp", seed=i) for i in range(400)]
    accepted = await gather_limited([lambda i=i: submit(http, edge.url, name, inputs[i], {"Idempotency-Key": f"k{i}"})
                                     for i in range(400)])
    docs = await gather_limited([lambda a=a: poll(http, edge.url, a["job_id"]) for a in accepted])
    seen = Counter(doc["version"] for doc in docs)
    assert 160 <= seen["1"] <= 240 and 160 <= seen["2"] <= 240, seen
    for i, doc in enumerate(docs):
        assert doc["status"] == "succeeded", doc
        assert doc["alias"] == {"1": "stable", "2": "canary"}[doc["version"]]
        assert doc["alias"] == expected_alias(name, f"k{i}", {"stable": 50, "canary": 50}), "routed by the idempotency key"
        np.testing.assert_allclose(outputs_of(doc), reference(doc["version"], inputs[i]), rtol=1e-5, atol=1e-6)

    ids = [f"{name}-amqp-{i}" for i in range(100)]
    for i, job_id in enumerate(ids):
        await amqp.submit(name, {"x": inputs[i]}, job_id=job_id)  # routing key <model>: unpinned
    results = await amqp.wait_results(ids, 90)
    assert {r["status"] for r in results.values()} == {"succeeded"}
    amqp_docs = await gather_limited([lambda j=j: poll(http, edge.url, j) for j in ids])
    assert {d["version"] for d in amqp_docs} == {"1", "2"}
    for i, doc in enumerate(amqp_docs):
        assert doc["alias"] == expected_alias(name, ids[i], {"stable": 50, "canary": 50}), "AMQP jobs take the same split"
        np.testing.assert_allclose(amqp.outputs(results[ids[i]])["probs"], reference(doc["version"], inputs[i]), rtol=1e-5, atol=1e-6)

    # The worker's final event names the alias too: an edge that reads it before the router's
    # (or the submitting edge's) queued event, which another process writes, shows the same document.
    expected = {a["job_id"]: expected_alias(name, f"k{i}", {"stable": 50, "canary": 50}) for i, a in enumerate(accepted)}
    expected.update({j: expected_alias(name, j, {"stable": 50, "canary": 50}) for j in ids})
    finals = {e.job_id: e.alias for e in await ledger_events(synced) if e.job_id in expected and e.status == "succeeded"}
    assert finals == expected


async def test_two_edges_route_the_same_key_to_the_same_version(split_stack, http) -> None:
    name, edge, other, _ = split_stack
    x = sample("mlp")
    versions = {}
    for i in range(40):
        headers = {"X-Inferq-Route-Key": f"user-{i}"}
        a, b = await submit(http, edge.url, name, x, headers), await submit(http, other.url, name, x, headers)
        assert a["job_id"] != b["job_id"] and a["version"] == b["version"], (a, b)
        versions[i] = a["version"]
        first = await submit(http, edge.url, name, x, {"Idempotency-Key": f"same-{i}"})
        again = await submit(http, other.url, name, x, {"Idempotency-Key": f"same-{i}"})
        assert (first["job_id"], first["version"]) == (again["job_id"], again["version"])
    assert set(versions.values()) == {"1", "2"}, "a 50/50 split sends 40 keys both ways"


async def test_rollback_moves_all_new_jobs_to_v1_within_one_second(synced, spawn_edge, spawn_autoscaler, http, amqp, tmp_path) -> None:
    name = unique("rollback")
    files = {"1": write_mlp(tmp_path / "v1", seed=201), "2": write_mlp(tmp_path / "v2", seed=202)}
    reference = Reference(files)
    edge, other = await spawn_edge(), await spawn_edge()
    async with RegistryClient(edge.url) as registry:
        await pushed(registry, name, files["1"], files["2"])
        await set_policy(synced, name, min_workers=1, max_workers=1)
        await spawn_autoscaler(name)
        await wait_until(lambda: document(http, edge.url, name), 10, "the model")
        await registry.set_alias(name, "stable", "2", reason="promote v2")

        async def released() -> bool:
            doc = await document(http, edge.url, name)
            return doc["aliases"]["stable"]["held_at"] == "" and doc["health"]["1"]["ready"] and doc["health"]["2"]["ready"]

        await wait_until(released, 90, "v2 warmed up and serving stable, v1 still up", interval=0.3)
        assert (await submit(http, other.url, name, sample("mlp")))["version"] == "2"
        await registry.rollback(name, "stable", reason="v2 looks wrong")
    rolled_back = time.monotonic()
    sent: list[tuple[float, str, str]] = []  # (seconds after the rollback, how, job id)
    x = sample("mlp", seed=5)
    while time.monotonic() - rolled_back < 2.5:
        sent.append((time.monotonic() - rolled_back, "http", (await submit(http, other.url, name, x))["job_id"]))
        job_id = await amqp.submit(name, {"x": x})
        sent.append((time.monotonic() - rolled_back, "amqp", job_id))
        await asyncio.sleep(0.05)
    docs = {job_id: await poll(http, edge.url, job_id) for _, _, job_id in sent}
    late = [(t, how, docs[j]["version"]) for t, how, j in sent if t >= 1.0]
    assert late and all(v == "1" for _, _, v in late), [entry for entry in late if entry[2] != "1"]
    for _, _, job_id in sent:
        np.testing.assert_allclose(outputs_of(docs[job_id]), reference(docs[job_id]["version"], x), rtol=1e-5, atol=1e-6)
    actions = [(h["action"], h["from_value"], h["to_value"]) for h in await history(http, edge.url, name)]
    assert ("alias", "1", "2") in actions and ("rollback", "2", "1") in actions


async def test_a_canary_with_a_broken_version_is_rolled_back_automatically_and_no_stable_job_fails(
        synced, spawn_edge, spawn_autoscaler, http, tmp_path) -> None:
    name = unique("autoroll")
    files = {"1": write_mlp(tmp_path / "v1", seed=301), "2": write_mlp(tmp_path / "v2", seed=302),
             "3": write_mlp(tmp_path / "v3", seed=301, broken=True)}
    reference = Reference({"1": files["1"]})
    edge = await spawn_edge()
    async with RegistryClient(edge.url) as registry:
        assert await pushed(registry, name, files["1"], files["2"], files["3"]) == ["1", "2", "3"]
        await registry.set_alias(name, "canary", "3", auto_rollback="error_rate=0.05,window_s=60,min_jobs=10")
        await set_policy(synced, name, min_workers=1, max_workers=1)
        await spawn_autoscaler(name)
        await registry.set_traffic(name, {"stable": 70, "canary": 30}, reason="canary v3")
    await wait_until(lambda: effective(http, edge.url, name, "canary", 30), 90, "v3 warmed up (zeros run fine)", interval=0.3)
    docs: list[tuple[np.ndarray, dict[str, Any]]] = []

    async def rolled_back() -> bool:
        batch = [sample("mlp", seed=len(docs) + i) for i in range(20)]
        accepted = await gather_limited([lambda x=x: submit(http, edge.url, name, x) for x in batch])
        docs.extend(zip(batch, await gather_limited([lambda a=a: poll(http, edge.url, a["job_id"]) for a in accepted])))
        return (await document(http, edge.url, name))["traffic"]["configured"]["canary"] == 0

    await wait_until(rolled_back, 120, "the auto-rollback", interval=0.2)
    after = [sample("mlp", seed=10_000 + i) for i in range(40)]
    accepted = await gather_limited([lambda x=x: submit(http, edge.url, name, x) for x in after])
    docs.extend(zip(after, await gather_limited([lambda a=a: poll(http, edge.url, a["job_id"]) for a in accepted])))
    assert all(doc["version"] == "1" for _, doc in docs[-40:]), "after the rollback every job goes to stable"
    canary = [doc for _, doc in docs if doc["version"] == "3"]
    assert len(canary) >= 10 and all(doc["error"]["code"] == "inference_error" for doc in canary)
    for x, doc in docs:
        if doc["version"] == "1":
            assert doc["status"] == "succeeded", doc
            np.testing.assert_allclose(outputs_of(doc), reference("1", x), rtol=1e-5, atol=1e-6)
    (decision,) = [h for h in await history(http, edge.url, name) if h["action"] == "auto_rollback"]
    assert decision["target"] == "canary" and decision["to_value"] == "canary=0,stable=100"
    assert decision["inputs"]["canary"]["failure_rate"] > 0.05 and decision["inputs"]["stable"]["failed"] == 0
    model = await document(http, edge.url, name)
    assert model["aliases"]["canary"]["auto_rollbacks"] == 1 and "failure rate" in model["aliases"]["canary"]["last_auto_rollback"]
    async with http.get(f"{edge.url}/metrics") as resp:
        assert f'inferq_auto_rollbacks_total{{alias="canary",model="{name}"}} 1.0' in await resp.text()


# --- shadow --------------------------------------------------------------------------------------------------------


async def test_shadow_results_stay_in_the_ledger_and_their_agreement_is_reported(synced, spawn_edge, spawn_autoscaler, http, amqp,
                                                                               tmp_path) -> None:
    name = unique("shadow")
    same, other = write_mlp(tmp_path / "v1", seed=401), write_mlp(tmp_path / "v3", seed=402)
    edge = await spawn_edge()
    async with RegistryClient(edge.url) as registry:
        assert await pushed(registry, name, same, same, other) == ["1", "2", "3"], "the same bytes may be two versions"
        await set_policy(synced, name, min_workers=1, max_workers=1)
        scaler = await spawn_autoscaler(name)
        await registry.set_shadow(name, "2", 100, reason="compare")
        await wait_until(lambda: "unpinned jobs now go to the router" in scaler.output(), 30, "the router binding")
        primaries = [(await submit(http, edge.url, name, sample("mlp", seed=i)))["job_id"] for i in range(20)]
        amqp_id = await amqp.submit(name, {"x": sample("mlp", seed=99)})
        for job_id in primaries + [amqp_id]:
            doc = await poll(http, edge.url, job_id)
            assert doc["status"] == "succeeded" and doc["version"] == "1" and "shadow_of" not in doc
            shadow = await poll(http, edge.url, f"{job_id}.shadow")
            assert shadow["shadow_of"] == job_id and shadow["version"] == "2" and shadow["status"] == "succeeded"
            assert "alias" not in shadow, "no alias routed a shadow copy"

        async def report(pairs: int) -> dict[str, Any] | None:
            async with http.get(f"{edge.url}/v1/models/{name}/shadow") as resp:
                body = await resp.json()
            return body if body.get("pairs") == pairs else None

        agreed = await wait_until(lambda: report(21), 30, "21 compared pairs")
        assert (agreed["agree"], agreed["disagree"], agreed["agreement"]) == (21, 0, 1.0)
        assert agreed["latency_ms"]["primary"]["p95"] > 0 and agreed["latency_ms"]["shadow"]["p95"] > 0
        await amqp.wait_results([amqp_id], 30)
        await asyncio.sleep(1.0)
        assert amqp.reply_counts[amqp_id] == 1 and f"{amqp_id}.shadow" not in amqp.results, "the caller gets its own result only"

        await registry.set_shadow(name, "3", 100, reason="different weights")
        for i in range(10):
            await poll(http, edge.url, (await submit(http, edge.url, name, sample("mlp", seed=100 + i)))["job_id"])
        differed = await wait_until(lambda: report(10), 60, "10 pairs against version 3")
        assert differed["disagree"] == 10 and differed["agreement"] == 0.0


# --- versions and artifacts ----------------------------------------------------------------------------------------


async def test_a_version_is_immutable_identical_bytes_are_a_no_op_and_other_bytes_are_refused(synced, spawn_edge, tmp_path) -> None:
    name = unique("immutable")
    first, changed = write_mlp(tmp_path / "a", seed=501), write_mlp(tmp_path / "b", seed=502)
    edge = await spawn_edge()
    code, out = await run_cli(synced, tmp_path, "models", "push", str(first), "--model", name, "--url", edge.url)
    assert code == 0 and f"{name}:1 pushed" in out, out
    code, out = await run_cli(synced, tmp_path, "models", "push", str(first.parent), "--model", name, "--version", "1", "--url", edge.url)
    assert code == 0 and "unchanged" in out, out
    code, out = await run_cli(synced, tmp_path, "models", "push", str(changed), "--model", name, "--version", "1", "--url", edge.url)
    assert code == 2 and "already exists with other bytes" in out and "immutable" in out, out
    code, out = await run_cli(synced, tmp_path, "models", "push", str(changed), "--model", name, "--version", "1", "--direct")
    assert code == 2 and "already exists with other bytes" in out, out
    async with RegistryClient(edge.url) as registry:
        with pytest.raises(Conflict, match="immutable"):
            await registry.push(name, [(changed, "model.onnx")], version="1")
        doc = await registry.model(name)
    assert doc["versions"]["1"]["sha256"] == hashlib.sha256(first.read_bytes()).hexdigest()
    assert doc["versions"]["1"]["opset"] == 17 and doc["versions"]["1"]["created_by"].startswith("local")


async def test_artifacts_download_with_their_sha256_verified_and_a_corrupted_download_is_rejected(
        synced, spawn_edge, spawn_worker, http, tmp_path) -> None:
    name = unique("artifact")
    path = write_mlp(tmp_path / "v1", seed=601)
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    edge = await spawn_edge()
    async with RegistryClient(edge.url) as registry:
        await registry.push(name, [(path, "model.onnx")])
    url = f"{edge.url}/v1/models/{name}/versions/1/artifact"
    async with http.get(url) as resp:
        assert resp.status == 200 and resp.headers["ETag"] == f'"{digest}"' and await resp.read() == data
    async with http.get(url, headers={"Range": "bytes=10-19"}) as resp:
        assert resp.status == 206 and resp.headers["Content-Range"] == f"bytes 10-19/{len(data)}" and await resp.read() == data[10:20]
    async with http.get(url, headers={"If-None-Match": f'"{digest}"'}) as resp:
        assert resp.status == 304

    code, out = await run_cli(synced, tmp_path, "models", "pull", f"{name}:stable", str(tmp_path / "pulled"), "--url", edge.url)
    assert code == 0 and "sha256 verified" in out, out
    assert hashlib.sha256((tmp_path / "pulled" / "model.onnx").read_bytes()).hexdigest() == digest

    blob = synced.model_repository / ".blobs" / "sha256" / digest
    os.chmod(blob, 0o644)
    blob.write_bytes(data[:-4] + b"\x00\x00\x00\x00")  # the same size, other bytes: a store gone bad
    try:
        code, out = await run_cli(synced, tmp_path, "models", "pull", f"{name}:1", str(tmp_path / "bad"), "--url", edge.url)
        assert code == 2 and "discarded" in out and digest in out, out
        assert not list((tmp_path / "bad").glob("model.onnx*")), "nothing corrupted is left behind"
    finally:
        blob.write_bytes(data)

    # A worker whose repository lacks the files fetches them from the edge by hash, verified, and serves.
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    await spawn_worker(name, "--version", "1", env={"INFERQ_MODEL_REPOSITORY": str(empty), "INFERQ_REGISTRY_ARTIFACTS_URL": edge.url})
    assert (synced.state_dir / "artifacts" / digest / "model.onnx").read_bytes() == data
    accepted = await submit(http, edge.url, name, sample("mlp"), route="versions/1/jobs")
    assert (await poll(http, edge.url, accepted["job_id"]))["status"] == "succeeded"


VARIANT_CONFIG = '[variants.int8]\nfile = "model-int8.onnx"\nsoc = "tegra234"\n'


async def test_a_device_variant_is_pushed_beside_the_default_served_and_pulled_by_name_and_another_signature_is_refused(
        synced, spawn_edge, http, tmp_path) -> None:
    import onnx

    from inferq.runtime.demo import build_cnn

    name = unique("variants")
    default = write_mlp(tmp_path / "v1", seed=701)
    int8 = shutil.copy(write_mlp(tmp_path / "int8", seed=702), default.parent / "model-int8.onnx")
    (tmp_path / "config.toml").write_text(VARIANT_CONFIG)
    edge = await spawn_edge()
    code, out = await run_cli(synced, tmp_path, "models", "push", str(default.parent), "--model", name,
                              "--config", str(tmp_path / "config.toml"), "--url", edge.url)
    assert code == 0 and f"{name}:1 pushed" in out, out
    digest = hashlib.sha256(Path(int8).read_bytes()).hexdigest()
    (variant,) = (await document(http, edge.url, name))["versions"]["1"]["variants"]
    assert (variant["name"], variant["selector"], variant["sha256"], variant["file"]) == \
        ("int8", {"soc": "tegra234"}, digest, "model-int8.onnx")
    url = f"{edge.url}/v1/models/{name}/versions/1/artifact"
    async with http.get(url, params={"variant": "int8"}) as resp:
        assert resp.status == 200 and resp.headers["ETag"] == f'"{digest}"' and await resp.read() == Path(int8).read_bytes()
    async with http.get(url, params={"variant": "fp16"}) as resp:
        assert resp.status == 404 and "no variant 'fp16'" in (await resp.json())["error"]["message"]
    code, out = await run_cli(synced, tmp_path, "models", "pull", f"{name}:1", str(tmp_path / "pulled"), "--variant", "int8",
                              "--url", edge.url)
    assert code == 0 and "variant int8" in out and "sha256 verified" in out, out
    assert (tmp_path / "pulled" / "model.onnx").read_bytes() == Path(int8).read_bytes()

    other = tmp_path / "cnn.onnx"
    onnx.save(build_cnn(7), str(other))  # another input and output: jobs for the version would not fit it
    async with RegistryClient(edge.url) as registry:
        with pytest.raises(InvalidInput, match="a variant must take and give the same tensors as the default"):
            await registry.push(name, [(write_mlp(tmp_path / "v2", seed=703), "model.onnx"), (other, "model-int8.onnx")])
        assert set((await registry.model(name))["versions"]) == {"1"}, "nothing of the refused push was recorded"


async def test_with_api_keys_only_nodes_and_admins_download_artifacts_and_only_admins_push(synced, spawn_edge, http, tmp_path) -> None:
    name = unique("roles")
    path = write_mlp(tmp_path / "v1", seed=701)
    edge = await spawn_edge(env={"INFERQ_EDGE_AUTH": "true"})
    async with open_etcd(synced.etcd) as client:
        tokens = {role: await create_key(client, synced.namespace, f"t-{role}", 0, 0, 5, role) for role in ("user", "node", "admin")}
    async with RegistryClient(edge.url, tokens["node"]) as node:
        with pytest.raises(Exception, match="admin role"):
            await node.push(name, [(path, "model.onnx")])
    async with RegistryClient(edge.url, tokens["admin"]) as admin:
        assert (await admin.push(name, [(path, "model.onnx")]))["created"]
    url = f"{edge.url}/v1/models/{name}/versions/1/artifact"
    for role, status in (("user", 403), ("node", 200), ("admin", 200)):
        async with http.get(url, headers={"Authorization": f"Bearer {tokens[role]}"}) as resp:
            assert resp.status == status, (role, await resp.text())
    async with http.get(url) as resp:
        assert resp.status == 401


async def test_an_edge_restart_keeps_aliases_traffic_and_history(synced, spawn_edge, http, tmp_path) -> None:
    name = unique("restart")
    edge = await spawn_edge()
    async with RegistryClient(edge.url) as registry:
        await pushed(registry, name, write_mlp(tmp_path / "v1", seed=801), write_mlp(tmp_path / "v2", seed=802))
        await registry.set_alias(name, "canary", "2", reason="canary")
        await registry.set_traffic(name, {"stable": 80, "canary": 20}, reason="some")
        with pytest.raises(InvalidInput, match="sum to 100"):
            await registry.set_traffic(name, {"stable": 80, "canary": 30})
        with pytest.raises(InvalidInput, match="existing version"):
            await registry.set_alias(name, "blue", "7")
    before = await document(http, edge.url, name)
    await edge.process.stop()
    again = await spawn_edge(port=edge.port)
    after = await document(http, again.url, name)
    assert after["aliases"] == before["aliases"] and after["traffic"]["configured"] == {"stable": 80, "canary": 20}
    assert [h["action"] for h in after["history"]] == ["push", "alias", "push", "alias", "traffic"]
    assert after["history"] == before["history"]


# --- removal -------------------------------------------------------------------------------------------------------


async def test_a_removed_version_fails_its_queued_jobs_with_version_removed_and_its_queues_go(
        synced, spawn_edge, spawn_autoscaler, http, amqp, tmp_path) -> None:
    name = unique("removal")
    edge = await spawn_edge()
    await set_policy(synced, name, min_workers=0, max_workers=0)  # no worker: the jobs stay queued
    async with RegistryClient(edge.url) as registry:
        await pushed(registry, name, write_mlp(tmp_path / "v1", seed=901), write_mlp(tmp_path / "v2", seed=902))
        await registry.set_alias(name, "canary", "2")
        await spawn_autoscaler(name)
        http_jobs = [(await submit(http, edge.url, name, sample("mlp", seed=i), route="versions/2/jobs"))["job_id"] for i in range(4)]
        amqp_jobs = [await amqp.submit(f"{name}.2", {"x": sample("mlp", seed=i)}) for i in range(4)]
        # High-priority jobs wait in the version's high lane, a queue of its own: none may be stranded there.
        amqp_jobs += [await amqp.submit(f"{name}.2", {"x": sample("mlp", seed=i)}, priority="high") for i in range(3)]
        assert (await amqp.queue_counts(amqp.topology.high_queue(name, "2")))[0] == 3
        # One waiting out a retry backoff (two minutes): it must not be stranded in the retry queue either.
        waiting = JobRequest(uuid.uuid4().hex, {"x": sample("mlp")}, reply_to=amqp.reply_queue, correlation_id="c-retry")
        message = waiting.to_message()
        message.expiration = 120
        await amqp.connection.publish(message, amqp.topology.retry_queue(name, "2"), mandatory=True)
        amqp_jobs.append(waiting.job_id)
        with pytest.raises(Conflict, match="alias 'canary'"):
            await registry.remove(name, "2")
        await registry.unalias(name, "canary")
        await registry.remove(name, "2", reason="bad weights")
    replies = await amqp.wait_results(amqp_jobs, 60)
    assert {(r["status"], r["error"]["code"]) for r in replies.values()} == {("failed", "version_removed")}
    for job_id in http_jobs + amqp_jobs:
        doc = await poll(http, edge.url, job_id, wait=60)
        assert doc["status"] == "failed" and doc["error"]["code"] == "version_removed" and "bad weights" in doc["error"]["message"]
    for queue in amqp.topology.queues_of(name, "2"):
        await wait_until(lambda q=queue: _gone(amqp, q), 30, f"{queue} deleted")
    route = amqp.topology.route_exchange(name, "2")
    for exchange in (route, f"{route}.normal"):
        await wait_until(lambda e=exchange: _absent(amqp, e), 30, f"{exchange} deleted")
    with pytest.raises(Exception, match="no queue is bound"):
        await amqp.submit(f"{name}.2", {"x": sample("mlp")}, priority="high")
    doc = await document(http, edge.url, name)
    assert sorted(doc["versions"]) == ["1"] and doc["removed"] == ["2"] and doc["removals"] == []
    assert [h["action"] for h in doc["history"]][-2:] == ["remove", "retired"]
    await submit(http, edge.url, name, sample("mlp"), route="versions/2/jobs", expect=404)
    async with RegistryClient(edge.url) as registry:
        with pytest.raises(Conflict, match="never reused"):
            await registry.push(name, [(tmp_path / "v2" / "model.onnx", "model.onnx")], version="2")
    assert not (synced.model_repository / name / "2").exists(), "a later sync must not bring it back"


async def _gone(amqp, queue: str) -> bool:
    return await amqp.queue_counts(queue) is None


async def _absent(amqp, exchange: str) -> bool:
    return not await declared(amqp.connection, "exchange", exchange)


async def test_a_model_without_a_servable_version_is_refused_with_503_and_removing_it_makes_it_unknown(
        synced, spawn_edge, spawn_autoscaler, http, amqp, tmp_path) -> None:
    name = unique("servable")
    edge = await spawn_edge()
    await spawn_autoscaler(name)
    async with RegistryClient(edge.url) as registry:
        await registry.push(name, [(write_mlp(tmp_path / "v1", seed=1001), "model.onnx")])
    code, out = await run_cli(synced, tmp_path, "models", "remove", f"{name}:1", "--url", edge.url)
    assert code == 2 and "in use by alias 'stable'" in out, out
    code, out = await run_cli(synced, tmp_path, "models", "unalias", name, "stable", "--url", edge.url)
    assert code == 0, out
    code, out = await run_cli(synced, tmp_path, "models", "remove", f"{name}:1", "--url", edge.url)
    assert code == 0 and "removed" in out, out
    body = await submit(http, edge.url, name, sample("mlp"), expect=503)
    assert body["error"]["code"] == "model_unavailable" and "no servable version" in body["error"]["message"]
    await wait_until(lambda: _gone(amqp, amqp.topology.model_queue(name, "1")), 30, "the version's queue retired")
    with pytest.raises(Exception, match="no queue is bound"):
        await amqp.submit(name, {"x": sample("mlp")})
    code, out = await run_cli(synced, tmp_path, "models", "remove", name, "--direct")
    assert code == 0, out
    body = await submit(http, edge.url, name, sample("mlp"), expect=404)
    assert body["error"]["code"] == "unknown_model"
    async with open_etcd(synced.etcd) as client:
        await wait_until(lambda: _no_removals(client, synced, name), 30, "the model's router queue retired")
    assert await amqp.queue_counts(amqp.topology.router_queue(name)) is None


async def test_sync_prune_removes_a_model_gone_from_the_repository_and_the_autoscaler_stops_spawning_it(
        synced, spawn_autoscaler, tmp_path) -> None:
    name = unique("prune")
    write_demo_repository(synced.model_repository, {"mlp": name})
    code, out = await run_cli(synced, tmp_path, "models", "sync")
    assert code == 0 and name in out, out
    await set_policy(synced, name, min_workers=1, max_workers=1)
    await spawn_autoscaler(name)
    await wait_until(lambda: _ready_workers(synced, name, 1), 60, "its worker")
    shutil.rmtree(synced.model_repository / name)
    code, out = await run_cli(synced, tmp_path, "models", "sync", "--prune")
    assert code == 0, out
    await wait_until(lambda: _ready_workers(synced, name, 0), 60, "its worker drained")
    async with open_etcd(synced.etcd) as client:
        assert await client.get(keys(synced.namespace).model(name).encode()) is None
        await wait_until(lambda: _no_removals(client, synced, name), 30, "the removal retired")
    logs = synced.state_dir / "logs"
    spawned = len(list(logs.glob(f"worker-{name}-*.log")))
    await asyncio.sleep(3.0)  # several autoscaler rounds
    assert not await live_workers(synced, name) and len(list(logs.glob(f"worker-{name}-*.log"))) == spawned


async def _ready_workers(synced, model: str, count: int) -> bool:
    return sum(1 for w in (await live_workers(synced, model)).values() if w["state"] == "ready") == count


async def _no_removals(client, synced, model: str) -> bool:
    return not list(await client.get_prefix(f"{keys(synced.namespace).removals}{model}/".encode()))
