"""compose.yaml and the Dockerfile agree with the code: commands, settings, volumes, who owns the workers.

Docker does not run here, so these checks read the files: every command is one the
``inferq`` CLI accepts, every ``INFERQ_*`` variable is a setting with a valid value,
and nothing is drained by the autoscaler only to be restarted by Docker.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from typing import Any

import pytest
import yaml

from inferq.cli import _parser
from inferq.settings import Settings
from tests.support import ROOT

IMAGE = "inferq:latest"
ONE_SHOT = {"no"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def inferq_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in compose["services"].items() if svc.get("image") == IMAGE or "build" in svc}


def commands(service: dict[str, Any]) -> list[list[str]]:
    """The inferq argument lists a service runs: its command (ENTRYPOINT is inferq), or each inferq of an sh -c."""
    entrypoint = service.get("entrypoint")
    if entrypoint is None:
        return [list(service.get("command", []))]
    assert entrypoint[:2] == ["sh", "-c"] and len(entrypoint) == 3, f"unexpected entrypoint {entrypoint}"
    # Every command of the script, whatever joins it (&&, ||, ;, |) and groups it: only inferq and grep may run.
    runs = [shlex.split(part) for part in re.split(r"&&|\|\||;|\|", entrypoint[2].replace("(", " ").replace(")", " "))]
    for argv in runs:
        assert argv[0] in ("inferq", "grep"), f"{argv} in {entrypoint} is not an inferq command"
    return [argv[1:] for argv in runs if argv[0] == "inferq"]


def parse(argv: list[str]) -> Any:
    """The CLI's parse of ``argv``; None for ``--help`` (argparse prints it and exits 0)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            return _parser().parse_args(argv)
        except SystemExit as exc:
            if exc.code == 0 and out.getvalue().startswith("usage: inferq"):
                return None
            pytest.fail(f"`inferq {' '.join(argv)}` is refused by the CLI: {err.getvalue().strip()}")


def substituted(value: str) -> str:
    """A compose value with ``${VAR:?message}`` / ``${VAR}`` replaced by a sample value."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*(:[?-][^}]*)?\}", "secret", str(value))


def dockerfile_env(dockerfile: str) -> dict[str, str]:
    env = {}
    for line in dockerfile.splitlines():
        if line.startswith("ENV "):
            env.update(pair.split("=", 1) for pair in shlex.split(line[4:]))
    return env


def test_every_inferq_service_runs_a_command_the_cli_accepts(compose) -> None:
    services = inferq_services(compose)
    assert {"models", "edge", "autoscaler", "cli"} <= set(services)
    for name, service in services.items():
        for argv in commands(service):
            parsed = parse(argv)
            assert parsed is None or callable(parsed.func), f"service {name}: {argv}"


def test_every_inferq_variable_is_a_setting_and_its_value_loads(compose) -> None:
    known = set(Settings().to_env()) | {"INFERQ_CONFIG"}
    for name, service in inferq_services(compose).items():
        env = {k: substituted(v) for k, v in (service.get("environment") or {}).items()}
        unknown = {k for k in env if k.startswith("INFERQ_")} - known
        assert not unknown, f"service {name} sets {sorted(unknown)}, which no setting reads"
        loaded = Settings.load(env=env)  # a bad value raises ConfigError here, as it would in the container
        if "INFERQ_ETCD_HOST" in env:
            assert loaded.etcd.host == env["INFERQ_ETCD_HOST"]


def test_the_autoscaler_owns_the_workers_so_nothing_is_drained_and_restarted_in_a_loop(compose) -> None:
    services = inferq_services(compose)
    scaled: set[str] | None = set()  # None: every model
    for name, service in services.items():
        for argv in commands(service):
            if argv and argv[0] == "autoscaler":
                models = (service.get("environment") or {}).get("INFERQ_AUTOSCALER_MODELS", "")
                chosen = {m.strip() for m in models.split(",") if m.strip()}
                scaled = None if scaled is None or not chosen else scaled | chosen
    assert scaled != set(), "no autoscaler: nothing would start workers"
    for name, service in services.items():
        for argv in commands(service):
            if argv and argv[0] == "worker":
                model = parse(argv).model
                assert scaled is not None and model not in scaled, (
                    f"service {name} runs a fixed worker for {model!r}, which the autoscaler also scales: it drains "
                    f"the worker when idle and Docker's restart policy brings it back, in a loop")


def test_one_shot_services_do_not_restart_and_dependencies_exist(compose) -> None:
    services = compose["services"]
    for name, service in services.items():
        for dep, condition in (service.get("depends_on") or {}).items():
            assert dep in services, f"service {name} depends on an unknown service {dep}"
            if condition.get("condition") == "service_completed_successfully":
                assert services[dep].get("restart") in ONE_SHOT, f"{dep} must run once for {name} to wait on it"
    assert services["models"]["restart"] in ONE_SHOT and services["cli"]["restart"] in ONE_SHOT


def test_services_share_one_image_built_from_this_dockerfile_and_mount_its_paths(compose, dockerfile) -> None:
    env = dockerfile_env(dockerfile)
    for name, service in inferq_services(compose).items():
        assert service.get("image") == IMAGE and service.get("build") == ".", f"service {name}: {service.get('build')}"
        targets = {v.split(":")[1] for v in service.get("volumes", [])}
        if any(argv and argv[0] in ("models", "worker", "autoscaler", "agent") for argv in commands(service)):
            assert env["INFERQ_MODEL_REPOSITORY"] in targets, f"service {name} needs the model repository volume"
        assert env["INFERQ_STATE_DIR"] in targets, f"service {name} writes logs under the state dir"
    assert (ROOT / "Dockerfile").exists()


def test_the_edge_listens_where_compose_publishes_and_checks_health(compose) -> None:
    edge = compose["services"]["edge"]
    args = parse(commands(edge)[0])
    published = {int(p.rsplit(":", 1)[1]) for p in edge["ports"]}
    assert {args.port, args.grpc_port} == published and args.host == "0.0.0.0"
    assert f"127.0.0.1:{args.port}/v2/health/ready" in " ".join(edge["healthcheck"]["test"])
    assert edge["environment"]["INFERQ_EDGE_AUTH"] == "true", "the only published service keeps API keys on"


def test_the_dockerfile_takes_its_base_image_as_a_build_argument(dockerfile) -> None:
    lines = [line for line in dockerfile.splitlines() if line and not line.startswith("#")]
    arg = next(i for i, line in enumerate(lines) if line.startswith("ARG BASE_IMAGE="))
    start = next(i for i, line in enumerate(lines) if line.startswith("FROM "))
    assert arg < start and lines[start] == "FROM ${BASE_IMAGE}", "Docker Hub may be unreachable: the base must be choosable"
    assert lines[arg] == "ARG BASE_IMAGE=python:3.11-slim"
    assert dockerfile_env(dockerfile)["PATH"].startswith("/opt/inferq/bin:"), "inferq, the ENTRYPOINT, is on the PATH"

