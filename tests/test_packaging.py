"""The distribution: one top-level name, a CLI that starts without the server, a Docker build context that builds."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from tests.support import ROOT

pytestmark = pytest.mark.timeout(300)


def build_wheel(source: Path, out: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(source), "-w", str(out)],
                   check=True, capture_output=True, timeout=240)
    (wheel,) = out.glob("inferq-*.whl")
    return wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wheel(ROOT, tmp_path_factory.mktemp("wheel"))


def test_the_wheel_installs_exactly_one_top_level_name_inferq(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        record = next(n for n in archive.namelist() if n.endswith(".dist-info/RECORD"))
        paths = [line.split(",")[0] for line in archive.read(record).decode().splitlines() if line]
    top = {p.split("/")[0] for p in paths if ".dist-info/" not in p}
    assert top == {"inferq"}, top
    for sub in ("actors/shard.py", "broker/codec.py", "runtime/actor.py", "edge/server.py", "benchmarks/cli.py", "cli.py"):
        assert f"inferq/{sub}" in paths


def test_the_installed_cli_answers_help_without_the_server_dependencies(wheel: Path, tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    subprocess.run([env_dir / "bin" / "pip", "install", "-q", "--no-deps", str(wheel)], check=True, timeout=120)
    done = subprocess.run([env_dir / "bin" / "inferq", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "worker" in done.stdout and "up" in done.stdout


def dockerfile_copies(dockerfile: Path) -> list[str]:
    """Sources of the Dockerfile's build-context COPY lines (not ``COPY --from``)."""
    sources = []
    for line in dockerfile.read_text().splitlines():
        match = re.match(r"^\s*COPY\s+(?!--from)(.+)$", line, re.IGNORECASE)
        if match:
            *srcs, _dest = match.group(1).split()
            sources += [s for s in srcs if not s.startswith("--")]
    return sources


def test_a_wheel_builds_from_exactly_what_the_dockerfile_copies(tmp_path: Path) -> None:
    context = tmp_path / "context"
    context.mkdir()
    sources = dockerfile_copies(ROOT / "Dockerfile")
    assert "pyproject.toml" in sources
    for source in sources:
        path = ROOT / source
        if path.is_dir():
            shutil.copytree(path, context / source, ignore=shutil.ignore_patterns("__pycache__", ".*"))
        else:
            shutil.copy2(path, context / source)
    assert build_wheel(context, tmp_path / "out").name.startswith("inferq-")
