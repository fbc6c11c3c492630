"""Local RabbitMQ and etcd for development and tests: start them when installed and not running.

Installing them is the Makefile's job (Debian packages); this module only
starts what is installed, with etcd's data under the project's state dir.

What it starts it records as ``<state_dir>/rabbitmq.pid`` and ``<state_dir>/etcd.pid``:
the pid and the process's start time (``/proc/<pid>/stat``), which together name
one process for good (a reused pid has another start time). ``inferq services --stop``
signals exactly those, never a RabbitMQ or etcd that was running already (the
machine's service, or another checkout's).
"""

from __future__ import annotations

import logging
import os
import pwd
import re
import resource
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from inferq.errors import ServiceError
from inferq.runtime.daemon import Daemon, exists, tagged_pids

log = logging.getLogger("inferq.services")


def reachable(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections at host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now (the kernel's pick)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _wait(host: str, port: int, what: str, timeout: float) -> None:
    # Synchronous on purpose: the CLI calls this before any event loop exists.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if reachable(host, port):
            return
        time.sleep(0.2)
    raise ServiceError(f"{what} did not come up on {host}:{port} within {timeout:.0f}s")


def ensure_rabbitmq(state_dir: Path, host: str = "127.0.0.1", port: int = 5672, timeout: float = 90.0,
                    min_open_files: int = 0) -> str:
    """Make sure RabbitMQ listens; start ``rabbitmq-server -detached`` if it is installed and down.

    With ``min_open_files``, a local node that runs with fewer descriptors than
    that is restarted with the most the hard limit allows (see :func:`_too_few_files`).
    """
    if reachable(host, port):
        limited = _too_few_files(host, min_open_files)
        if limited is None:
            return "running"
        _restart_for_files(limited, host, port, timeout)
    if shutil.which("rabbitmq-server") is None:
        raise ServiceError("RabbitMQ is not reachable and not installed (Debian: apt-get install rabbitmq-server)")
    return _start_rabbitmq(state_dir, host, port, timeout)


def _start_rabbitmq(state_dir: Path, host: str, port: int, timeout: float) -> str:
    log.info("starting RabbitMQ")
    state_dir.mkdir(parents=True, exist_ok=True)
    tag = _tag("rabbitmq", state_dir)
    _raise_open_files_limit()  # inherited by the node: at 1024 descriptors a busy test run exhausts it
    # -detached forks the Erlang VM and returns; the VM inherits the tag (Debian's wrapper su's without resetting it).
    Daemon.spawn(tag, rabbitmq_start_command(), os.environ, state_dir / "rabbitmq-start.log",
                 cwd=state_dir, watch_parent=False).wait(60)
    _wait(host, port, "RabbitMQ", timeout)
    _await_startup(timeout)
    pid = _rabbitmq_pid(tag)
    if pid:
        _record(state_dir, "rabbitmq", pid)
    else:
        log.warning("started RabbitMQ but cannot find its process: `inferq services --stop` will not stop it")
    return "started"


DEBIAN_RABBITMQ = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")


def rabbitmq_start_command(files: int | None = None) -> list[str]:
    """The command that starts a detached node with as many descriptors as we may give it.

    As root, Debian's ``rabbitmq-server`` wrapper runs ``su rabbitmq``, and
    pam_limits resets the open-files limit to init's (1024 outside systemd), so
    a limit raised here would never reach the node. Root therefore does the
    wrapper's ``su`` itself and raises the limit inside it.
    """
    if os.geteuid() != 0 or not DEBIAN_RABBITMQ.exists() or not _user_exists("rabbitmq"):
        return ["rabbitmq-server", "-detached"]
    files = files or _files_we_can_give()
    script = f"ulimit -n {files} 2>/dev/null; cd /var/lib/rabbitmq && exec {DEBIAN_RABBITMQ} -detached"
    return ["su", "rabbitmq", "-s", "/bin/sh", "-c", script]


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _await_startup(timeout: float) -> None:
    """Wait for the node's boot to finish; its port answers before every plugin has started.

    Best effort: ``rabbitmqctl`` can hang (a node name or Erlang cookie it cannot
    reach), and the port already answers, so a hang is a warning, not a failed start.
    """
    if shutil.which("rabbitmqctl") is None:
        return
    try:
        subprocess.run(["rabbitmqctl", "await_startup"], check=False, timeout=timeout, capture_output=True)
    except subprocess.TimeoutExpired:
        log.warning("rabbitmqctl await_startup gave no answer within %.0f s; RabbitMQ's port answers, going on", timeout)


def _raise_open_files_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard == resource.RLIM_INFINITY else _files_we_can_give()
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def _too_few_files(host: str, wanted: int) -> tuple[int, int] | None:
    """(pid, soft limit) of the local RabbitMQ when it may open fewer than ``wanted`` files, else None.

    Each quorum queue holds about three descriptors, so a node started with
    Debian's default of 1024 (a machine's service started outside systemd, whose
    unit would give 65536) runs out during one test session: it then stops
    accepting connections, and every later test times out. Only a node on this
    host that we may restart (root) is looked at.
    """
    if not wanted or host not in ("127.0.0.1", "localhost") or os.geteuid() != 0 or shutil.which("rabbitmqctl") is None:
        return None
    try:
        done = subprocess.run(["rabbitmqctl", "eval", "os:getpid()."], capture_output=True, text=True, timeout=30, check=False)
    except subprocess.TimeoutExpired:  # a node out of descriptors may not answer at all: find it by name instead
        done = None
    found = re.search(r'"(\d+)"', done.stdout) if done is not None else None
    pids = [int(found.group(1))] if found else [p for p in _pids_named("beam.smp") if _is_system_rabbitmq(p)]
    for pid in pids:
        soft = open_files_limit(pid)
        if needs_more_files(soft, wanted):
            return pid, soft
    return None


def needs_more_files(soft: int | None, wanted: int) -> bool:
    """Whether a node whose limit is ``soft`` is worth restarting: below ``wanted``, and a restart would raise it
    (never a restart on every run for a limit the hard limit does not allow)."""
    return soft is not None and soft < min(wanted, _files_we_can_give())


def _files_we_can_give() -> int:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)


def open_files_limit(pid: int) -> int | None:
    """The soft open-files limit of process ``pid`` (None if unreadable; 'unlimited' reads as a large number)."""
    try:
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                soft = line.split()[3]
                return 1 << 30 if soft == "unlimited" else int(soft)
    except (OSError, ValueError, IndexError):
        return None
    return None


def _restart_for_files(limited: tuple[int, int], host: str, port: int, timeout: float) -> None:
    """Stop the node (``rabbitmqctl stop``; a wedged node gets SIGTERM, then SIGKILL); the caller starts it again."""
    pid, soft = limited
    log.warning("RabbitMQ (pid %d) may open only %d files; restarting it with a higher limit", pid, soft)
    try:
        subprocess.run(["rabbitmqctl", "stop"], capture_output=True, timeout=60, check=False)
    except subprocess.TimeoutExpired:
        pass
    for sig, wait_s in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
        deadline = time.monotonic() + wait_s
        while exists(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not exists(pid):
            break
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            break
    deadline = time.monotonic() + 30
    while reachable(host, port) and time.monotonic() < deadline:
        time.sleep(0.2)


def _pids_named(name: str) -> list[int]:
    return [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit() and _command(int(e.name)) == name]


def _is_system_rabbitmq(pid: int) -> bool:
    """Debian's node: its Erlang VM runs with ``-home /var/lib/rabbitmq`` (a test's own nodes live elsewhere)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(a == b"-home" and b == b"/var/lib/rabbitmq" for a, b in zip(argv, argv[1:]))


def _rabbitmq_pid(tag: str) -> int | None:
    """The Erlang VM that ``rabbitmq-server -detached`` forked: found by our tag, else by asking the node."""
    beams = [pid for pid in tagged_pids(tag) if _command(pid) == "beam.smp"]
    if beams:
        return beams[0]
    # Another user's environment is unreadable without CAP_SYS_PTRACE (root in a container): ask the node we started.
    done = subprocess.run(["rabbitmqctl", "eval", "os:getpid()."], capture_output=True, text=True, timeout=60, check=False)
    found = re.search(r'"(\d+)"', done.stdout)
    return int(found.group(1)) if found and _command(int(found.group(1))) == "beam.smp" else None


def ensure_management(host: str = "127.0.0.1", port: int = 15672, timeout: float = 60.0) -> str:
    """Make sure RabbitMQ's management API listens (``inferq tenant`` needs it): enable its plugin when it is off.

    ``rabbitmq-plugins`` enables it on the running node without a restart; like
    Debian's ``rabbitmqctl``, it works for root or the ``rabbitmq`` user.
    """
    if reachable(host, port):
        return "running"
    plugins = shutil.which("rabbitmq-plugins")
    if plugins is None:
        raise ServiceError(f"the RabbitMQ management API is not reachable on {host}:{port} and rabbitmq-plugins is not installed")
    log.info("enabling the rabbitmq_management plugin")
    result = subprocess.run([plugins, "enable", "rabbitmq_management"], check=False, timeout=120, capture_output=True, text=True)
    if result.returncode != 0:
        raise ServiceError(f"rabbitmq-plugins enable rabbitmq_management failed: {(result.stderr or result.stdout).strip()[-300:]}")
    _wait(host, port, "the RabbitMQ management API", timeout)
    return "enabled"


def ensure_etcd(state_dir: Path, host: str = "127.0.0.1", port: int = 2379, timeout: float = 30.0) -> str:
    """Make sure etcd listens; start a local single-node etcd with data in ``state_dir/etcd``."""
    if reachable(host, port):
        return "running"
    binary = shutil.which("etcd")
    if binary is None:
        raise ServiceError("etcd is not reachable and not installed (Debian: apt-get install etcd-server)")
    state_dir = state_dir.resolve()  # an absolute --data-dir: `make clean` and `--stop` can tell whose data it is
    state_dir.mkdir(parents=True, exist_ok=True)
    client, peer = f"http://{host}:{port}", f"http://{host}:{port + 1}"
    args = [
        binary, "--name", "inferq", "--data-dir", str(state_dir / "etcd"),
        "--listen-client-urls", client, "--advertise-client-urls", client,
        "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
        "--initial-cluster", f"inferq={peer}",
    ]
    log.info("starting etcd (data in %s)", state_dir / "etcd")
    daemon = Daemon.spawn(_tag("etcd", state_dir), args, os.environ, state_dir / "etcd.log", cwd=state_dir, watch_parent=False)
    _record(state_dir, "etcd", daemon.pid)
    _wait(host, port, "etcd", timeout)
    return "started"


SERVICES = ("rabbitmq", "etcd")
STOP_TIMEOUT_S = {"rabbitmq": 60.0, "etcd": 15.0}


def stop_services(state_dir: Path, which: tuple[str, ...] = SERVICES) -> dict[str, str]:
    """Stop what ``ensure_rabbitmq``/``ensure_etcd`` started from ``state_dir``: what happened to each, in words.

    Only a process named in the pid file that still carries our tag is signalled
    (SIGTERM: both shut down cleanly on it). Anything else is left alone.
    """
    state_dir = state_dir.resolve()
    return {name: _stop(state_dir, name) for name in which}


def _stop(state_dir: Path, name: str) -> str:
    path = _pid_file(state_dir, name)
    try:
        pid, started = (int(v) for v in path.read_text().split())
    except (OSError, ValueError):
        return "not started by `inferq services` here (left alone)"
    if _start_time(pid) != started:
        path.unlink(missing_ok=True)
        return f"not running (pid {pid} is gone)"
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:  # it ended between the check and the signal
        pass
    deadline = time.monotonic() + STOP_TIMEOUT_S[name]
    while _start_time(pid) == started:
        if time.monotonic() > deadline:
            raise ServiceError(f"{name} (pid {pid}) did not stop within {STOP_TIMEOUT_S[name]:.0f}s of SIGTERM")
        time.sleep(0.1)
    path.unlink(missing_ok=True)
    return f"stopped (pid {pid})"


def etcd_using(data_dir: Path) -> list[int]:
    """Pids of running etcd processes whose ``--data-dir`` is ``data_dir`` (relative ones resolved against their cwd)."""
    target, found = data_dir.resolve(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or _command(int(entry.name)) != "etcd":
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            cwd = Path(os.readlink(entry / "cwd"))
        except OSError:
            continue
        dirs = [v for f, v in zip(argv, argv[1:]) if f in ("--data-dir", "-data-dir")]
        dirs += [a.split("=", 1)[1] for a in argv if a.startswith(("--data-dir=", "-data-dir="))]
        if any((cwd / d).resolve() == target for d in dirs) and exists(int(entry.name)):
            found.append(int(entry.name))
    return found


def _record(state_dir: Path, name: str, pid: int) -> None:
    _pid_file(state_dir, name).write_text(f"{pid} {_start_time(pid)}\n")


def _start_time(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot); None once it has ended (a zombie has ended)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else int(fields[19])


def _tag(name: str, state_dir: Path) -> str:
    return f"services:{name}:{state_dir.resolve()}"


def _pid_file(state_dir: Path, name: str) -> Path:
    return state_dir / f"{name}.pid"


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""
