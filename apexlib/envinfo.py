"""Facts about this machine for provenance: the host's (``apexlib.core.host``) plus torch, CUDA and the GPUs."""

from __future__ import annotations

import platform
from typing import Any

from apexlib.core.host import cpu_info, git_commit, memory_gib


def environment() -> dict[str, Any]:
    """Everything a result row needs to say where it was measured."""
    import torch

    from apexlib.version import __version__

    info: dict[str, Any] = {
        "apexlib_version": __version__,
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
