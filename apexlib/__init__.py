"""apexlib: hybrid CPU-GPU LLM inference (APEX, arXiv 2506.03296) and its reproduction artifact.

Public API: ``LLM``, ``SamplingParams``, ``EngineConfig``. ``LLM`` is imported lazily so that the
torch-free control plane (``apexlib.engine.scheduler``, ``apexlib.kvcache``, ``apexlib.policies``)
can be imported without torch.
"""

from __future__ import annotations

from typing import Any

from apexlib.core.config import EngineConfig
from apexlib.core.request import RequestOutput, SamplingParams
from apexlib.version import __version__

__all__ = ["LLM", "EngineConfig", "RequestOutput", "SamplingParams", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from apexlib.llm import LLM

        return LLM
    raise AttributeError(f"module 'apexlib' has no attribute {name!r}")
