"""Facts about this machine for provenance: CPU model and SIMD flags, cores, memory, torch/CUDA, GPUs."""

from __future__ import annotations

import os
import platform
import subprocess
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


def environment() -> dict[str, Any]:
    """Everything a result row needs to say where it was measured."""
    import torch

    import apexlib

    info: dict[str, Any] = {
        "apexlib_version": apexlib.__version__,
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        **cpu_info(),
        "memory_gib": memory_gib(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpus": [],
    }
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            properties = torch.cuda.get_device_properties(index)
            info["gpus"].append({"name": properties.name, "memory_gib": round(properties.total_memory / 1024**3, 2),
                                 "capability": f"{properties.major}.{properties.minor}"})
    return info


def provenance_facts() -> dict[str, Any]:
    """This process's facts for the provenance columns (``apexlib.core.results.ENVIRONMENT_COLUMNS``)."""
    info = environment()
    return {
        "git_commit": info["git_commit"],
        "apexlib_version": info["apexlib_version"],
        "gpu_names": ";".join(gpu["name"] for gpu in info["gpus"]) or None,
        "cpu_model": info["cpu_model"],
        "cpu_count": info["cpu_affinity"],
        "torch_version": info["torch"],
        "cuda_version": info["cuda"],
    }
