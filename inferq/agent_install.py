"""``inferq agent install``: lay out an edge node, join it and (with systemd) start its agent.

What it creates, under ``--root`` (default ``/``)::

    /opt/inferq/venv                          the cluster's inferq wheel and its dependencies
    /etc/inferq/agent.toml                    the node's settings and credential, 0600, root-owned
    /var/lib/inferq/{artifacts,trt,spool,logs}  model cache, TensorRT engines, spool, worker logs
    /etc/systemd/system/inferq-agent.service  Restart=always, After=network-online.target, KillMode=mixed
    /usr/local/bin/inferq-agent-uninstall     removes exactly the above (and the directories it made)

A rerun upgrades in place: the venv is refreshed and the unit rewritten, while an
``agent.toml`` that already holds a credential is kept (no new join, so an expired
token does not matter). With ``--root``, or without systemd, nothing calls systemctl:
it prints how to start the agent.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import os
import re
import shutil
import subprocess
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from inferq.errors import ConfigError

UNIT_NAME = "inferq-agent.service"


def server_requirements() -> list[str]:
    """The installed inferq's own ``server`` extra, less onnxruntime (a Jetson venv may have NVIDIA's build already).

    Read from the wheel's metadata, so a node gets exactly what the edge and workers need, never a stale copy of
    the list; ``python -m inferq.agent_install`` prints it for install.sh.
    """
    found = []
    for requirement in importlib.metadata.requires("inferq") or []:
        name, _, marker = requirement.partition(";")
        if re.search(r"extra\s*==\s*[\"']server[\"']", marker) and not name.strip().startswith("onnxruntime"):
            found.append(name.strip())
    return found


DRAIN_S = 90  # TimeoutStopSec: the workers' drain (30 s grace each, all at once) with room to spare


def add_install(sub: argparse._SubParsersAction) -> None:
    """``inferq agent install``."""
    install = sub.add_parser("install", help="install this node: venv, agent.toml, systemd unit, uninstall script")
    install.add_argument("--server", required=True, help="the edge URL, e.g. http://edge:8000")
    install.add_argument("--token", default=os.environ.get("INFERQ_TOKEN"), help="join token (default: $INFERQ_TOKEN)")
    install.add_argument("--root", default="/", help="install under this prefix (tests, images); no systemctl then")
    install.add_argument("--no-start", action="store_true", help="do not enable and start the service")
    install.add_argument("--python", default="python3", help="the Python the venv is made from (Jetson: JetPack's 3.10)")
    install.add_argument("--system-site-packages", action="store_true",
                         help="let the venv see the system's packages (the default on a Jetson: NVIDIA's onnxruntime-gpu)")
    install.add_argument("--node", dest="install_node", help="node name (default: the host name, with the token's prefix)")
    install.add_argument("--capacity", dest="install_capacity", type=int, default=2, help="most workers at once")
    install.add_argument("--wheel", help="the inferq wheel, a file or URL (default: the one the edge serves)")
    install.add_argument("--venv-ready", action="store_true", help=argparse.SUPPRESS)  # install.sh made the venv
    install.add_argument("--made-dir", action="append", default=[], help=argparse.SUPPRESS)  # ... and these directories
    install.set_defaults(func=_install)


@dataclass
class Layout:
    """The paths of an install under ``root``, and the directories this install created."""

    root: Path
    made: list[Path] = field(default_factory=list)

    def at(self, path: str) -> Path:
        return self.root / path.lstrip("/")

    @property
    def venv(self) -> Path:
        return self.at("/opt/inferq/venv")

    @property
    def config(self) -> Path:
        return self.at("/etc/inferq/agent.toml")

    @property
    def state(self) -> Path:
        return self.at("/var/lib/inferq")

    @property
    def unit(self) -> Path:
        return self.at(f"/etc/systemd/system/{UNIT_NAME}")

    @property
    def uninstall(self) -> Path:
        return self.at("/usr/local/bin/inferq-agent-uninstall")

    def mkdir(self, path: Path, mode: int = 0o755) -> None:
        """Make ``path`` and its missing parents, remembering which ones were made here."""
        missing = [p for p in [path, *path.parents] if not p.exists()]
        for p in reversed(missing):
            p.mkdir(mode=mode)
            self.made.append(p)


def _install(settings: object, args: argparse.Namespace) -> int:
    layout = Layout(Path(args.root).resolve())
    previous = _previous_dirs(layout) + [Path(p).resolve() for p in args.made_dir]
    jetson = (layout.at("/etc/nv_tegra_release")).exists()
    for directory in (layout.venv.parent, layout.config.parent, layout.unit.parent, layout.uninstall.parent):
        layout.mkdir(directory)
    for sub in ("artifacts", "trt", "spool", "logs", "repository"):
        layout.mkdir(layout.state / sub, 0o750)
    if not args.venv_ready:
        make_venv(layout.venv, args.python, args.system_site_packages or jetson, args.wheel, args.server)
    ensure_config(layout, args)
    write_unit(layout)
    write_uninstall(layout, previous)
    _start_or_explain(layout, args)
    return 0


def make_venv(venv: Path, python: str, system_site: bool, wheel: str | None, server: str) -> None:
    """The venv with the cluster's inferq wheel; onnxruntime from the index only if the venv has none."""
    command = [python, "-m", "venv", *(["--system-site-packages"] if system_site else []), str(venv)]
    _check(command)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    with tempfile.TemporaryDirectory(prefix="inferq-wheel-") as tmp:
        _check([*pip, "--upgrade", _wheel_file(wheel, server, Path(tmp))])
    has_ort = subprocess.run([str(venv / "bin" / "python"), "-c", "import onnxruntime"], capture_output=True).returncode == 0
    extra = subprocess.run([str(venv / "bin" / "python"), "-m", "inferq.agent_install"], capture_output=True, text=True,
                           check=True)
    _check([*pip, *extra.stdout.split(), *([] if has_ort else ["onnxruntime>=1.17"])])


def _wheel_file(wheel: str | None, server: str, tmp: Path) -> str:
    if wheel and not wheel.startswith(("http://", "https://")):
        return str(Path(wheel).resolve())
    url = wheel or f"{server.rstrip('/')}/v1/agent/inferq.whl"
    try:
        with urllib.request.urlopen(url, timeout=60) as resp:  # noqa: S310 (the admin's own edge)
            name = resp.headers.get("X-Inferq-Wheel") or url.rsplit("/", 1)[-1]
            target = tmp / name
            with open(target, "wb") as out:
                shutil.copyfileobj(resp, out)
    except OSError as exc:
        raise ConfigError(f"cannot download the inferq wheel from {url}: {exc}; pass --wheel FILE") from exc
    return str(target)


def ensure_config(layout: Layout, args: argparse.Namespace) -> None:
    """Join and write agent.toml, unless one with a credential is there already (a rerun upgrades in place)."""
    from inferq.agent_join import join, write_config
    from inferq.settings import Settings

    if layout.config.exists() and Settings.load(layout.config).registry.api_key:
        print(f"keeping {layout.config} (this node joined before)")
        return
    if not args.token:
        raise ConfigError("a join token is needed: --token or $INFERQ_TOKEN (inferq agent token create prints one)")
    import socket

    config = asyncio.run(join(args.token, args.install_node or socket.gethostname(), args.server))
    local = {"state_dir": str(layout.state), "model_repository": str(layout.state / "repository"),
             "agent": {"capacity": args.install_capacity}}
    write_config(layout.config, config, local)
    if os.geteuid() == 0:
        os.chown(layout.config, 0, 0)
    print(f"joined as node {config.node}; settings in {layout.config}")


def unit_text(layout: Layout) -> str:
    """The systemd unit of the agent."""
    return f"""[Unit]
Description=inferq edge-node agent
Documentation=https://github.com/inferq/inferq#edge-nodes
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
ExecStart={layout.venv}/bin/inferq --config {layout.config} agent
Restart=always
RestartSec=5
# SIGTERM to the agent only: it drains its workers (no job lost), then they get SIGKILL if still there.
KillMode=mixed
TimeoutStopSec={DRAIN_S}
WorkingDirectory={layout.state}

[Install]
WantedBy=multi-user.target
"""


def write_unit(layout: Layout) -> None:
    layout.unit.write_text(unit_text(layout))
    layout.unit.chmod(0o644)


def write_uninstall(layout: Layout, previous: list[Path]) -> None:
    """The uninstall script: stop, disable, then remove what this install (or an earlier one) made."""
    made = sorted({*previous, *layout.made}, key=lambda p: len(p.parts), reverse=True)
    systemd = layout.root == Path("/")
    lines = ["#!/bin/sh", "# inferq-agent-uninstall: written by `inferq agent install`; removes what it created.", "set -u"]
    if systemd:
        lines += ["if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then",
                  f"  systemctl disable --now {UNIT_NAME} || true", "fi"]
    lines += [f"rm -f '{layout.unit}' '{layout.config}' '{layout.config.with_name('.agent.toml.new')}'",
              f"rm -rf '{layout.venv}' '{layout.state}'"]
    if systemd:
        lines += ["command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ] && systemctl daemon-reload || true"]
    lines += [f"rm -f '{layout.uninstall}'"]
    lines += [f"rmdir '{p}' 2>/dev/null || true" for p in made]
    lines += ["# directories made by the install:", *(f"# made: {p}" for p in made), "echo 'inferq agent uninstalled'"]
    layout.uninstall.write_text("\n".join(lines) + "\n")
    layout.uninstall.chmod(0o755)


def _previous_dirs(layout: Layout) -> list[Path]:
    """The directories an earlier install made (its uninstall script names them): a rerun keeps removing them."""
    try:
        text = layout.uninstall.read_text()
    except OSError:
        return []
    return [Path(line[len("# made: "):]) for line in text.splitlines() if line.startswith("# made: ")]


def _start_or_explain(layout: Layout, args: argparse.Namespace) -> None:
    systemd = shutil.which("systemctl") is not None and Path("/run/systemd/system").is_dir()
    if layout.root == Path("/") and systemd and not args.no_start:
        _check(["systemctl", "daemon-reload"])
        _check(["systemctl", "enable", "--now", UNIT_NAME])
        print(f"{UNIT_NAME} enabled and started; uninstall with {layout.uninstall}")
        return
    print(f"installed under {layout.root}; start the agent with:\n  {layout.venv}/bin/inferq --config {layout.config} agent\n"
          f"uninstall with {layout.uninstall}")


def _check(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise ConfigError(f"{' '.join(command[:4])} ... failed ({done.returncode}): {(done.stderr or done.stdout)[-800:]}")


if __name__ == "__main__":  # install.sh: the server requirements to pip-install beside the wheel
    print("\n".join(server_requirements()))
