"""What the board is and what state it is in, read from /proc and /sys where readable.

`fingerprint()` is the static identity of the environment (CPU, board, kernel, Python, runtime
versions, governors, frequency limits): equal fingerprints mean comparable numbers.
`conditions()` is the moment's state (temperatures, current frequencies, throttling, load):
taken before and after a run so a hot or throttled run can be seen. Unreadable items are None.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path


def _read(path: str | Path) -> str | None:
    try:
        return Path(path).read_text(errors="replace").strip().strip("\x00")
    except OSError:
        return None


def _cpu_model() -> str | None:
    text = _read("/proc/cpuinfo") or ""
    for key in ("model name", "Model", "Hardware", "cpu model", "Processor"):
        for line in text.splitlines():
            if line.split(":")[0].strip() == key and ":" in line:
                return line.split(":", 1)[1].strip()
    return platform.processor() or None


def _cpus() -> list[Path]:
    return sorted(Path("/sys/devices/system/cpu").glob("cpu[0-9]*"), key=lambda p: int(p.name[3:]))


def _per_cpu(name: str) -> dict[str, str | None]:
    return {p.name: _read(p / "cpufreq" / name) for p in _cpus()}


def runtime_versions() -> dict[str, str | None]:
    """Versions of the runtimes importable here (None when absent); imports nothing heavy."""
    from importlib import metadata

    out = {}
    for dist in ("onnxruntime", "ai-edge-litert", "tflite-runtime", "numpy", "psutil", "edgeq"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def fingerprint() -> dict:
    """The static environment: board, CPU, kernel, Python, runtimes, governors, frequency limits."""
    mem_total = None
    for line in (_read("/proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            mem_total = int(line.split()[1]) // 1024
    return {
        "board": _read("/proc/device-tree/model") or _read("/sys/class/dmi/id/product_name"),
        "jetson_release": _read("/etc/nv_tegra_release"),
        "cpu_model": _cpu_model(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "mem_total_mb": mem_total,
        "kernel": platform.release(),
        "os": _read("/etc/os-release").split("\n")[0] if _read("/etc/os-release") else None,
        "python": sys.version.split()[0],
        "runtimes": runtime_versions(),
        "governor": _per_cpu("scaling_governor"),
        "freq_min_khz": _per_cpu("cpuinfo_min_freq"),
        "freq_max_khz": _per_cpu("cpuinfo_max_freq"),
    }


def _throttled() -> str | None:
    exe = shutil.which("vcgencmd")
    if not exe:
        return None
    try:
        return subprocess.run([exe, "get_throttled"], capture_output=True, text=True,
                              timeout=2).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def conditions() -> dict:
    """The moment's state: temperatures (C), current frequencies, throttling, load average."""
    temps = {}
    for zone in sorted(Path("/sys/class/thermal").glob("thermal_zone*")):
        raw = _read(zone / "temp")
        if raw and raw.lstrip("-").isdigit():
            temps[_read(zone / "type") or zone.name] = int(raw) / 1000.0
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    return {
        "temperatures_c": temps or None,
        "freq_cur_khz": _per_cpu("scaling_cur_freq"),
        "throttled": _throttled(),
        "loadavg": load,
    }
