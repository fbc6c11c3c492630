"""A client-only install (``pip install inferq``, no ``server`` extra) has the SDK and the people's CLI, and no onnxruntime."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import sample
from tests.support import ROOT

pytestmark = pytest.mark.install  # pip-installs into a fresh venv: make test-install (CI runs it after make test)

SOURCES = ("pyproject.toml", "README.md", "inferq", "actors", "broker", "runtime", "edge", "benchmarks")
CHECK = """
import importlib.util, sys
from inferq import AmqpClient, AsyncClient, Client
assert importlib.util.find_spec("onnxruntime") is None, "onnxruntime is installed"
try:
    import onnxruntime
except ImportError:
    print("no onnxruntime")
"""


def client_venv(root: Path) -> Path:
    """A fresh venv with the project installed from a copy of its sources, without extras."""
    source = root / "src"
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "results", "*.egg-info"))
        else:
            source.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / name, source / name)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    installed = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(source)],
                               capture_output=True, text=True, timeout=480)
    assert installed.returncode == 0, installed.stderr[-3000:]
    return venv


async def test_a_client_only_install_imports_the_sdk_and_runs_submit_without_onnxruntime(
        spawn_worker, spawn_edge, reference, tmp_path: Path) -> None:
    venv = await asyncio.to_thread(client_venv, tmp_path)
    checked = await asyncio.to_thread(subprocess.run, [str(venv / "bin" / "python"), "-c", CHECK],
                                      capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert checked.returncode == 0 and checked.stdout.strip() == "no onnxruntime", checked.stderr

    await spawn_worker("mlp")
    edge = await spawn_edge()
    x = sample("mlp", seed=99)
    np.save(tmp_path / "x.npy", x)
    submitted = await asyncio.to_thread(
        subprocess.run, [str(venv / "bin" / "inferq"), "submit", "mlp", "--input", f"x={tmp_path / 'x.npy'}",
                         "--wait", "--output", str(tmp_path / "out"), "--url", edge.url],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert submitted.returncode == 0 and json.loads(submitted.stdout)["status"] == "succeeded", submitted.stderr
    np.testing.assert_allclose(np.load(tmp_path / "out" / "probs.npy"), reference("mlp", x), rtol=1e-5, atol=1e-6)
