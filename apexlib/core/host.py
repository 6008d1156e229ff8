"""Facts about this host that need no torch: the CPU model and its SIMD flags, cores, memory, the git
commit of this checkout, and a file-name-friendly CPU label. The torch and GPU facts live in
``apexlib.envinfo``; the version in ``apexlib.version``."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

SIMD_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_fp16",
              "amx_tile", "amx_bf16")


def cpu_info() -> dict[str, Any]:
    model, flags = platform.processor() or "unknown", set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("unknown", "", platform.machine()):
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    return {
        "cpu_model": model,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "simd": [flag for flag in SIMD_FLAGS if flag in flags],
    }


def load_average_1min() -> float | None:
    """The 1-minute load average (None where the platform has none): what else ran beside a measurement."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def memory_gib() -> float | None:
    meminfo = Path("/proc/meminfo")
    if not meminfo.is_file():
        return None
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) / 1024**2, 2)
    return None


def git_commit(repository: str | Path | None = None) -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repository or Path(__file__).resolve().parent,
                                capture_output=True, text=True, timeout=10, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=repository or Path(__file__).resolve().parent, capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return result.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_short_name(cpu_model: str, simd: Iterable[str] = ()) -> str:
    """A file-name-friendly CPU label: 'xeon-spr' for a Sapphire Rapids Xeon (AMX), else slugged."""
    lowered = cpu_model.lower()
    if "xeon" in lowered and "amx_tile" in set(simd):
        return "xeon-spr"
    slug = re.sub(r"\(r\)|\(tm\)|cpu|processor|@.*", " ", lowered)
    slug = re.sub(r"[^a-z0-9]+", "-", slug).strip("-")
    return slug or "cpu"
