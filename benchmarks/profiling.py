"""Optional sampling profiles of the edge and the worker while a loaded phase runs (``--profile DIR``).

Uses ``py-spy record --format raw`` (collapsed stacks; ``pip install py-spy``,
needs ptrace rights: root or ``kernel.yama.ptrace_scope=0``) and condenses each
profile to the top functions by own time and by inclusive time. The raw files
stay in DIR for flame graphs (``flamegraph.pl`` or https://www.speedscope.app).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any


def py_spy() -> str | None:
    """The py-spy executable (next to this Python first), or None."""
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


class Profiler:
    """``py-spy record`` on some pids from :meth:`start` to :meth:`stop`."""

    def __init__(self, out_dir: Path, rate: int = 200) -> None:
        self.out_dir = out_dir
        self.rate = rate
        self.exe = py_spy()
        self._running: list[tuple[str, Path, subprocess.Popen[Any]]] = []

    def start(self, tag: str, pids: dict[str, int]) -> None:
        if self.exe is None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for name, pid in pids.items():
            path = self.out_dir / f"{tag}-{name}.txt"
            proc = subprocess.Popen(
                [self.exe, "record", "--pid", str(pid), "--rate", str(self.rate), "--format", "raw", "--nonblocking",
                 "--threads", "--output", str(path)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            )
            self._running.append((name, path, proc))

    def stop(self) -> dict[str, Any]:
        """Stop every recorder; return each profile's summary."""
        out: dict[str, Any] = {}
        for _, _, proc in self._running:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for name, path, proc in self._running:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            if path.exists():
                out[name] = dict(summarize_collapsed(path.read_text()), file=str(path))
        self._running.clear()
        return out


PROJECT_DIRS = ("edge/", "actors/", "broker/", "runtime/")
ENTRY_FRAMES = ("inferq/cli.py", "runtime/actor.py")


def _frame_name(frame: str) -> str:
    """``func (path/to/file.py:123)`` -> ``func (to/file.py)``; line numbers differ per sample."""
    if " (" in frame and frame.endswith(")"):
        func, loc = frame[:-1].split(" (", 1)
        path = loc.rsplit(":", 1)[0]
        parts = path.split("/")
        short = "/".join(parts[-2:]) if len(parts) > 1 else path
        return f"{func} ({short})"
    return frame


def summarize_collapsed(text: str, top: int = 15) -> dict[str, Any]:
    """Where the samples went, each as % of all samples (py-spy records running threads only).

    * ``own_top``: leaf functions (where the CPU was when sampled);
    * ``inclusive_top``: functions on the stack;
    * ``by_project_frame``: the deepest inferq frame (edge/, actors/, broker/, runtime/) on the
      stack, i.e. which of our code paths the time is spent under ("(loop/library)": none);
    * ``threads``: split by thread (the ORT executor thread vs the event loop).
    """
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    project: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        raw_frames = [f for f in stack.split(";") if f]
        if raw_frames and raw_frames[0].startswith(("thread ", "process ")):
            threads[raw_frames[0].split(":", 1)[-1].strip()] += count
            raw_frames = raw_frames[1:]
        if not raw_frames:
            continue
        frames = [_frame_name(f) for f in raw_frames]
        total += count
        own[frames[-1]] += count
        for f in set(frames):
            inclusive[f] += count
        ours = [f for f in frames if any(d in f for d in PROJECT_DIRS) and not any(e in f for e in ENTRY_FRAMES)]
        project[ours[-1] if ours else "(loop/library)"] += count
    if not total:
        return {"samples": 0}

    def pct(counter: Counter[str], skip: tuple[str, ...] = ()) -> list[list[Any]]:
        items = [(k, v) for k, v in counter.most_common(top * 3) if not any(x in k for x in skip)][:top]
        return [[name, round(100.0 * n / total, 1)] for name, n in items]

    return {
        "samples": total,
        "own_top": pct(own),
        "inclusive_top": pct(inclusive, skip=("runpy", "inferq/cli.py", "uvloop/__init__", "Runner.run", "threading.py")),
        "by_project_frame": pct(project),
        "threads": pct(threads),
    }
