"""What a node is, read from its system: a Jetson's L4T release, module, SoC and CUDA arch, or a host's CPU.

Everything is read below a ``sysroot`` (default ``/``), so tests point it at a fixture
tree of an Orin or a Xavier. Sources (as NVIDIA and jetson_stats read them):
``/etc/nv_tegra_release`` (``# R36 (release), REVISION: 4.7, ...``), ``/proc/device-tree/model``,
``/proc/device-tree/compatible`` (NUL-separated, ``nvidia,tegra234`` among them),
``/proc/meminfo`` (on a Jetson the GPU shares it), ``/proc/cpuinfo`` and ``nvpmodel -q``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("inferq.device")

# SoC -> CUDA compute capability of its integrated GPU.
CUDA_ARCH = {"tegra264": "11.0", "tegra234": "8.7", "tegra194": "7.2", "tegra186": "6.2", "tegra210": "5.3"}
RELEASE = re.compile(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)")
NVPMODEL = ("usr/sbin/nvpmodel", "usr/bin/nvpmodel")


@dataclass(frozen=True)
class DeviceFacts:
    """A node's hardware as read from its system; ``kind`` is ``jetson`` or ``host``."""

    kind: str = "host"
    model: str = ""  # Jetson: /proc/device-tree/model; host: the CPU model name
    soc: str = ""  # tegra234, ...
    cuda_arch: str = ""  # from the SoC: 8.7 for tegra234
    l4t: str = ""  # 36.4.7
    power_mode: str = ""  # nvpmodel -q
    cpu_cores: int = 0
    memory_bytes: int = 0  # shared with the GPU on a Jetson
    ort_version: str = ""
    ort_build: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, doc: Any) -> DeviceFacts:
        if not isinstance(doc, dict):
            raise TypeError("device facts must be an object")
        from inferq.runtime.records import build

        return build(cls, doc, "device facts")


def engine_cache_dir(state_dir: Path, model_file: Path | None, sysroot: Path | str = "/") -> Path:
    """Where TensorRT engines of one model on this device are cached (blocking: may hash the model file).

    ``<state_dir>/trt/<device>-<model sha256[:16]>-ort<version>``: an engine is valid only for the
    GPU it was built on (the SoC, else the machine), the model's bytes and the onnxruntime that built it.
    """
    import platform

    from inferq.runtime.artifacts import hash_file

    facts = read_facts(sysroot)
    device = facts.soc or platform.machine() or "host"
    digest = "nofile"
    if model_file is not None:
        parent = model_file.parent.name  # the node's model cache names its directories by the sha256
        digest = parent if len(parent) == 64 and model_file.parent.parent.name == "artifacts" else \
            hash_file(model_file).sha256
    return Path(state_dir) / "trt" / f"{device}-{digest[:16]}-ort{facts.ort_version or 'none'}"


def read_facts(sysroot: Path | str = "/") -> DeviceFacts:
    """The facts of the system under ``sysroot`` (blocking: reads files, may run ``nvpmodel -q``)."""
    root = Path(sysroot)
    memory, cores, cpu = _memory(root), _cores(root), _cpu_model(root)
    ort_version, ort_build = _onnxruntime()
    release = _read(root / "etc/nv_tegra_release")
    if not release:
        return DeviceFacts("host", cpu, cpu_cores=cores, memory_bytes=memory, ort_version=ort_version, ort_build=ort_build)
    soc = _soc(root)
    return DeviceFacts("jetson", _read(root / "proc/device-tree/model").strip("\0 \n"), soc, CUDA_ARCH.get(soc, ""),
                       _l4t(release), _power_mode(root), cores, memory, ort_version, ort_build)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _l4t(release: str) -> str:
    match = RELEASE.search(release)
    return f"{match.group(1)}.{match.group(2)}" if match else release.splitlines()[0].strip() if release else ""


def _soc(root: Path) -> str:
    for entry in _read(root / "proc/device-tree/compatible").split("\0"):
        name = entry.strip().split(",")[-1]
        if name.startswith("tegra"):
            return name
    return ""


def _memory(root: Path) -> int:
    for line in _read(root / "proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


def _cores(root: Path) -> int:
    count = sum(1 for line in _read(root / "proc/cpuinfo").splitlines() if line.startswith("processor"))
    return count or (os.cpu_count() or 0 if str(root) == "/" else 0)


def _cpu_model(root: Path) -> str:
    for line in _read(root / "proc/cpuinfo").splitlines():
        if line.split(":")[0].strip() in ("model name", "Model", "Hardware"):
            return line.split(":", 1)[1].strip()
    return ""


def _power_mode(root: Path) -> str:
    tool = next((root / p for p in NVPMODEL if (root / p).is_file()), None)
    if tool is None:
        return ""
    try:
        done = subprocess.run([str(tool), "-q"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("nvpmodel -q failed: %r", exc)
        return ""
    for line in done.stdout.splitlines():
        if "Power Mode" in line:
            return line.split(":", 1)[-1].strip()
    return done.stdout.strip().splitlines()[0] if done.stdout.strip() else ""


def _onnxruntime() -> tuple[str, str]:
    try:
        import onnxruntime as ort
        from onnxruntime.capi import _pybind_state
    except ImportError:
        return "", ""
    info = getattr(_pybind_state, "get_build_info", lambda: "")()
    return ort.__version__, str(info)[:300]
