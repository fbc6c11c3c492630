"""Fixture system trees for device facts: what an AGX Orin, a Xavier NX and a plain host have on disk.

The file contents follow what those systems hold (``/etc/nv_tegra_release``,
``/proc/device-tree/{model,compatible}`` with their NUL separators, ``/proc/meminfo``,
``/proc/cpuinfo``); ``nvpmodel`` is a tiny script that answers ``-q`` as the real one does.
"""

from __future__ import annotations

from pathlib import Path

ORIN = {
    "etc/nv_tegra_release": "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, "
                            "DATE: Wed Jan  8 01:49:37 UTC 2025\n# KERNEL_VARIANT: oot\nTARGET_USERSPACE_LIB_DIR=nvidia\n",
    "proc/device-tree/model": "NVIDIA Jetson AGX Orin Developer Kit\0",
    "proc/device-tree/compatible": "nvidia,p3737-0000+p3701-0005\0nvidia,p3701-0005\0nvidia,tegra234\0",
    "proc/meminfo": "MemTotal:       64335836 kB\nMemFree:        60000000 kB\n",
    "proc/cpuinfo": "".join(f"processor\t: {i}\nmodel name\t: ARMv8 Processor rev 1 (v8l)\n\n" for i in range(12)),
    "usr/sbin/nvpmodel": "#!/bin/sh\necho 'NV Power Mode: MAXN'\necho 0\n",
}

XAVIER = {
    "etc/nv_tegra_release": "# R35 (release), REVISION: 5.0, GCID: 35550185, BOARD: t186ref, EABI: aarch64, "
                            "DATE: Tue Feb 20 04:46:31 UTC 2024\n",
    "proc/device-tree/model": "NVIDIA Jetson Xavier NX Developer Kit\0",
    "proc/device-tree/compatible": "nvidia,p3509-0000+p3668-0001\0nvidia,jetson-xavier-nx\0nvidia,tegra194\0",
    "proc/meminfo": "MemTotal:        7765596 kB\n",
    "proc/cpuinfo": "".join(f"processor\t: {i}\nmodel name\t: ARMv8 Processor rev 0 (v8l)\n\n" for i in range(6)),
}

HOST = {
    "proc/meminfo": "MemTotal:       16303428 kB\n",
    "proc/cpuinfo": "".join(f"processor\t: {i}\nmodel name\t: AMD EPYC 7B13\n\n" for i in range(4)),
}


def write_sysroot(root: Path, files: dict[str, str]) -> Path:
    """Write ``files`` under ``root``; scripts under ``usr/sbin`` are made executable."""
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        if name.startswith("usr/sbin/"):
            path.chmod(0o755)
    return root
