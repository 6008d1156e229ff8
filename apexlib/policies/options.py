"""Each policy's own frozen options dataclass, validated in ``__post_init__`` (field, limit, value).

The field names are the options' one name everywhere: ``EngineArgs(policy_options=...)``,
``simulate(policy_options=...)``, the CLI's ``--policy-option NAME=VALUE`` and the policies' own
constructors. Torch-free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from apexlib.core.plan import OverlapMode

#: ``apex``: iterations a CPU-resident decode may be left out before it is forced in (``ApexPolicy``).
DEFAULT_MAX_STALL_ITERATIONS = 32
#: ``hybrid``: where new requests go (``overflow``: the GPU tier while it has room; ``cpu``: all to the CPU tier).
PLACEMENTS = ("overflow", "cpu")
OVERLAP_MODES = tuple(mode.value for mode in OverlapMode)


@dataclass(frozen=True)
class NoOptions:
    """A policy without options (``gpu_only``, ``vllm_offload``, ``neo``, ``neo_published``)."""


@dataclass(frozen=True)
class HybridOptions:
    """``hybrid``: the one execution mode of iterations with CPU-resident decodes, and where new
    requests go (``overflow``: the GPU tier while it has room; ``cpu``: all to the CPU tier)."""

    hybrid_mode: str = OverlapMode.ASYNC_OVERLAP.value
    cpu_placement: str = "overflow"

    def __post_init__(self) -> None:
        if self.hybrid_mode not in OVERLAP_MODES:
            raise ValueError(f"hybrid_mode must be one of {OVERLAP_MODES}, got {self.hybrid_mode!r}")
        if self.cpu_placement not in PLACEMENTS:
            raise ValueError(f"cpu_placement must be one of {PLACEMENTS}, got {self.cpu_placement!r}")


@dataclass(frozen=True)
class ApexOptions:
    """``apex``: an optional bound on each iteration's predicted time (seconds; a TPOT bound), whether
    NEO's pipelined plan is the reference (False: GPU-only is), and how many iterations a CPU-resident
    decode may be left out before it is forced in (``ApexPolicy``'s docstring)."""

    iteration_time_bound: float | None = None
    enable_pipeline: bool = True
    max_stall_iterations: int = DEFAULT_MAX_STALL_ITERATIONS

    def __post_init__(self) -> None:
        bound = self.iteration_time_bound
        if bound is not None and (isinstance(bound, bool) or not isinstance(bound, (int, float))
                                  or not math.isfinite(bound) or bound <= 0):
            raise ValueError(f"iteration_time_bound must be a finite number of seconds > 0, got {bound!r}")
        if not isinstance(self.enable_pipeline, bool):
            raise ValueError(f"enable_pipeline must be a bool, got {self.enable_pipeline!r}")
        stall = self.max_stall_iterations
        if isinstance(stall, bool) or not isinstance(stall, int) or stall < 0:
            raise ValueError(f"max_stall_iterations must be an int >= 0, got {stall!r}")


PolicyOptions = NoOptions | HybridOptions | ApexOptions
