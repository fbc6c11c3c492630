"""The CLI for people (inferq submit, jobs, models list) run as real processes against a real edge and workers."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.conftest import free_port, sample
from tests.support import ROOT


async def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """``python -m inferq.cli ARGS`` in a child process, without blocking the loop."""
    base = {k: v for k, v in os.environ.items() if k not in ("INFERQ_URL", "INFERQ_API_KEY")}
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "inferq.cli", *args], capture_output=True, text=True,
        timeout=timeout, cwd=ROOT, env={**base, **(env or {})},
    )


async def test_submit_inputs_dir_shows_a_progress_bar_and_writes_outputs_beside_the_inputs(
        spawn_worker, spawn_edge, reference, tmp_path: Path) -> None:
    await spawn_worker("mlp")
    edge = await spawn_edge()
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    arrays = {f"sample-{i:03d}": sample("mlp", seed=2000 + i) for i in range(200)}
    for i, (name, x) in enumerate(arrays.items()):
        if i % 20 == 0:
            np.savez(inputs / f"{name}.npz", x=x)  # named inputs
        else:
            np.save(inputs / f"{name}.npy", x)
    np.save(inputs / "broken.npy", np.zeros((1, 255), np.float32))
    done = await cli("submit", "mlp", "--inputs-dir", str(inputs), "--url", edge.url, "--concurrency", "16")
    assert done.returncode == 1, "one input did not fit the model"
    # tqdm's last frame: "mlp: 100%|####| 201/201 [00:04<00:00, 47.5jobs/s, failed=1]"
    assert re.search(r"mlp: 100%\|.*\| 201/201 \[[0-9:<]+, +[0-9.]+jobs/s, failed=1\]", done.stderr), done.stderr
    assert "201 jobs: 200 succeeded, 1 failed" in done.stderr and "broken.npy" in done.stderr
    assert "Traceback" not in done.stderr
    for name, x in arrays.items():
        with np.load(inputs / f"{name}.out.npz") as out:
            np.testing.assert_allclose(out["probs"], reference("mlp", x), rtol=1e-5, atol=1e-6)
    assert not (inputs / "broken.out.npz").exists()
    again = await cli("submit", "mlp", "--inputs-dir", str(inputs), "--url", edge.url)
    assert "201/201" in again.stderr, "earlier outputs are not taken for inputs"


async def test_submit_one_job_then_wait_for_it_and_write_its_outputs(spawn_worker, spawn_edge, reference, tmp_path: Path) -> None:
    await spawn_worker("mlp")
    edge = await spawn_edge()
    x = sample("mlp", n=2, seed=7)
    np.save(tmp_path / "x.npy", x)
    waited = await cli("submit", "mlp", "--input", f"x={tmp_path / 'x.npy'}", "--version", "1", "--wait",
                       "--output", str(tmp_path / "out"), "--url", edge.url)
    assert waited.returncode == 0, waited.stderr
    document = json.loads(waited.stdout)
    assert document["status"] == "succeeded" and document["outputs"]["probs"] == {"dtype": "float32", "shape": [2, 10]}
    np.testing.assert_allclose(np.load(tmp_path / "out" / "probs.npy"), reference("mlp", x), rtol=1e-5, atol=1e-6)

    np.savez(tmp_path / "named.npz", x=x)
    submitted = await cli("submit", "mlp", "--input", str(tmp_path / "named.npz"), env={"INFERQ_URL": edge.url})
    job_id = submitted.stdout.strip()
    assert submitted.returncode == 0 and len(job_id) == 32, submitted.stderr
    finished = await cli("jobs", "wait", job_id, "--output", str(tmp_path / "again"), "--url", edge.url)
    assert finished.returncode == 0 and json.loads(finished.stdout)["job_id"] == job_id
    np.testing.assert_allclose(np.load(tmp_path / "again" / "probs.npy"), reference("mlp", x), rtol=1e-5, atol=1e-6)


async def test_jobs_get_cancel_and_wait_on_a_queued_job(spawn_edge, tmp_path: Path) -> None:
    edge = await spawn_edge()  # no cnn worker: the job stays queued
    np.save(tmp_path / "x.npy", sample("cnn"))
    job_id = (await cli("submit", "cnn", "--input", f"x={tmp_path / 'x.npy'}", "--ttl", "60", "--url", edge.url)).stdout.strip()
    got = await cli("jobs", "get", job_id, "--url", edge.url)
    assert got.returncode == 0 and json.loads(got.stdout)["status"] == "queued"
    cancelled = await cli("jobs", "cancel", job_id, "--url", edge.url)
    assert cancelled.returncode == 0 and json.loads(cancelled.stdout)["status"] == "cancelled"
    waited = await cli("jobs", "wait", job_id, "--url", edge.url)
    assert waited.returncode == 1 and json.loads(waited.stdout)["status"] == "cancelled", "only a success exits 0"
    missing = await cli("jobs", "get", "0123456789abcdef0123456789abcdef", "--url", edge.url)
    assert missing.returncode == 2 and "not known" in missing.stderr and "Traceback" not in missing.stderr


async def test_models_list_shows_each_model_with_its_inputs_and_workers(spawn_worker, spawn_edge) -> None:
    await spawn_worker("cnn")
    edge = await spawn_edge()
    listed = await cli("models", "list", "--url", edge.url)
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line.split() for line in listed.stdout.splitlines()}
    assert rows["MODEL"] == ["MODEL", "DEFAULT", "VERSIONS", "INPUTS", "WORKERS", "QUEUED"]
    assert rows["cnn"][1:5] == ["1", "1", "x:float32[?,3,64,64]", "1"]
    assert rows["mlp"][3] == "x:float32[?,256]"


async def test_client_commands_fail_with_a_message_and_exit_code_2_not_a_traceback(spawn_edge, tmp_path: Path) -> None:
    edge = await spawn_edge()
    np.save(tmp_path / "x.npy", sample("mlp"))
    for args in (["models", "list", "--url", f"http://127.0.0.1:{free_port()}"],
                 ["submit", "nope", "--input", f"x={tmp_path / 'x.npy'}", "--url", edge.url],
                 ["submit", "mlp", "--input", f"x={tmp_path / 'missing.npy'}", "--url", edge.url]):
        failed = await cli(*args)
        assert failed.returncode == 2 and "ERROR inferq.cli" in failed.stderr and "Traceback" not in failed.stderr, failed.stderr


async def test_a_service_that_cannot_start_is_an_error_with_exit_code_2(tmp_path: Path) -> None:
    # Nothing listens on the broker port and rabbitmq-server is not on PATH: nothing is started.
    env = {"INFERQ_BROKER_URL": f"amqp://guest:guest@127.0.0.1:{free_port()}/", "PATH": str(Path(sys.executable).parent),
           "INFERQ_STATE_DIR": str(tmp_path)}
    failed = await cli("services", env=env, timeout=60)
    assert failed.returncode == 2 and "RabbitMQ is not reachable" in failed.stderr and "Traceback" not in failed.stderr, failed.stderr
