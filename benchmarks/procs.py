"""Child processes the harness owns, and CPU accounting from ``/proc``.

Every child is started in its own session (process group), registered in a
:class:`Children` set, and killed with its group on the way out, whatever
happened (error, Ctrl-C, SIGTERM).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")
ROOT = Path(__file__).resolve().parent.parent


class Children:
    """The processes the harness started; :meth:`stop_all` ends each of them (and its group)."""

    def __init__(self) -> None:
        self._procs: list[tuple[str, subprocess.Popen[Any]]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None, log_path: Path | None = None, **kwargs: Any) -> subprocess.Popen[Any]:
        out = open(log_path, "ab") if log_path else subprocess.DEVNULL
        try:
            proc = subprocess.Popen(
                argv, cwd=kwargs.pop("cwd", ROOT), env={**os.environ, **(env or {})}, stdin=kwargs.pop("stdin", subprocess.DEVNULL),
                stdout=kwargs.pop("stdout", out), stderr=kwargs.pop("stderr", subprocess.STDOUT if log_path else None),
                start_new_session=True, **kwargs,
            )
        finally:
            if log_path:
                out.close()
        self._procs.append((name, proc))
        return proc

    def stop(self, proc: subprocess.Popen[Any], grace_s: float = 15.0) -> int:
        """SIGTERM (graceful), then SIGKILL to the process and its group after ``grace_s``."""
        if proc.poll() is None:
            _signal(proc, signal.SIGTERM, group=False)
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        # Whatever is left of its group (e.g. Celery's prefork children) goes too.
        _signal(proc, signal.SIGKILL, group=True)
        if proc.poll() is None:
            proc.wait(5)
        self._procs = [(n, p) for n, p in self._procs if p is not proc]
        return proc.returncode

    def stop_all(self, grace_s: float = 10.0) -> None:
        for _, proc in reversed(list(self._procs)):
            try:
                self.stop(proc, grace_s)
            except (OSError, subprocess.TimeoutExpired):
                pass


def _signal(proc: subprocess.Popen[Any], sig: int, group: bool) -> None:
    try:
        if group:
            os.killpg(proc.pid, sig)  # the child's own session: only what it started
        elif proc.poll() is None:
            proc.send_signal(sig)
    except (ProcessLookupError, PermissionError):
        pass


def python_argv(*args: str) -> list[str]:
    return [sys.executable, *args]


def cpu_ticks(pid: int) -> int | None:
    """utime + stime of ``pid`` (all its threads) in clock ticks; None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid``."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            out += [int(p) for p in task.read_text().split()]
        except OSError:
            continue
    return out


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Ray's workers are the raylet's children, grandchildren of its driver)."""
    out: list[int] = []
    todo = child_pids(pid)
    while todo:
        p = todo.pop()
        out.append(p)
        todo += child_pids(p)
    return out


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine from /proc/stat."""
    parts = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    return sum(parts) - idle, sum(parts)


def broker_pid() -> int | None:
    """The RabbitMQ ``beam.smp`` process (pgrep -f beam.smp), preferring one running ``rabbit``."""
    try:
        out = subprocess.run(["pgrep", "-f", "beam.smp"], capture_output=True, text=True, timeout=5).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        return None
    pids = [int(p) for p in out]
    for pid in pids:
        try:
            if b"rabbit" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        except OSError:
            continue
    return pids[0] if pids else None


@dataclass
class CpuWatch:
    """CPU used by named processes (each with all its descendants, e.g. a prefork pool) between start and stop."""

    pids: dict[str, int]
    include_children: bool = True

    def _snapshot(self) -> dict[str, dict[int, int]]:
        snap: dict[str, dict[int, int]] = {}
        for name, pid in self.pids.items():
            group = [pid, *(descendants(pid) if self.include_children else [])]
            snap[name] = {p: t for p in group if (t := cpu_ticks(p)) is not None}
        return snap

    def start(self) -> CpuWatch:
        self._before = self._snapshot()
        self._machine_before = machine_ticks()
        self._t0 = time.perf_counter()
        return self

    def stop(self) -> dict[str, Any]:
        after = self._snapshot()
        busy1, total1 = machine_ticks()
        busy0, total0 = self._machine_before
        elapsed = time.perf_counter() - self._t0
        cpu_s = {}
        for name in self.pids:
            before, now = self._before.get(name, {}), after.get(name, {})
            # a process that appeared meanwhile counts from zero; one that vanished is lost (rare)
            cpu_s[name] = sum(now[p] - before.get(p, 0) for p in now) / CLK_TCK
        total = max(1, total1 - total0)
        ours = sum(cpu_s.values()) * CLK_TCK
        return {
            "wall_s": elapsed,
            "cpu_s": cpu_s,
            "machine_busy_pct": round(100.0 * (busy1 - busy0) / total, 1),
            # CPU used by everything else on the machine meanwhile (other users, the harness itself)
            "foreign_busy_pct": round(max(0.0, 100.0 * (busy1 - busy0 - ours) / total), 1),
        }


def per_job_ms(cpu: dict[str, Any], jobs: int) -> dict[str, float]:
    """CPU-ms per job for every watched process, plus their total."""
    if jobs <= 0:
        return {}
    out = {name: round(1000.0 * s / jobs, 3) for name, s in cpu["cpu_s"].items()}
    out["total"] = round(sum(out.values()), 3)
    return out


def alive(procs: Iterable[subprocess.Popen[Any]]) -> bool:
    return all(p.poll() is None for p in procs)


def wait_quiet(threshold_pct: float = 25.0, max_wait_s: float = 10.0, window_s: float = 0.5) -> dict[str, float]:
    """Wait (bounded) for the machine to be mostly idle before a timed phase; say how busy it was."""
    start = time.monotonic()
    busy = 100.0
    while True:
        b0, t0 = machine_ticks()
        time.sleep(window_s)
        b1, t1 = machine_ticks()
        busy = 100.0 * (b1 - b0) / max(1, t1 - t0)
        waited = time.monotonic() - start
        if busy <= threshold_pct or waited >= max_wait_s:
            return {"busy_pct_before": round(busy, 1), "waited_s": round(waited, 1)}
