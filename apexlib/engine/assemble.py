"""The one assembly of the control plane: the policy, the scheduler, the stats and the per-token copy
volume of a CPU-resident decode, from a resolved ``EngineConfig`` and a cost model.

The real engine (``LLMEngine``), the simulator (``simulate``) and the profiler's calibration runs all
build their control plane here, so the policies decide on the same inputs in every executor. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass

from apexlib.core.config import EngineConfig, ModelConfig
from apexlib.core.stats import EngineStats
from apexlib.costs import CostModel, ModelShape
from apexlib.engine.scheduler import Scheduler
from apexlib.policies.base import Policy
from apexlib.policies.registry import build_policy


@dataclass(frozen=True)
class CpuTransfer:
    """What one CPU-resident decode token copies per iteration, all layers: q/k/v to the host and the
    attention output back (``bytes_per_token``; 0 when the device is the CPU: the rows are already in
    host memory), and the share of it that goes device -> host (``to_cpu_fraction``)."""

    bytes_per_token: int
    to_cpu_fraction: float


def cpu_transfer(model: ModelConfig, dtype: str, device: str) -> CpuTransfer:
    to_cpu, back = ModelShape.from_config(model).cpu_token_transfer_bytes(dtype)
    return CpuTransfer(bytes_per_token=0 if device == "cpu" else to_cpu + back,
                       to_cpu_fraction=to_cpu / (to_cpu + back))


@dataclass(frozen=True)
class ControlPlane:
    """The scheduler with its policy, the stats it counts into, the cost model its policy predicts with
    (None for the policies that predict nothing) and the copy volume of a CPU-resident decode."""

    scheduler: Scheduler
    policy: Policy
    stats: EngineStats
    cost_model: CostModel | None
    transfer: CpuTransfer


def build_control_plane(config: EngineConfig, cost_model: CostModel | None) -> ControlPlane:
    """The control plane of ``config`` (its policy and the policy's validated options) with ``cost_model``."""
    transfer = cpu_transfer(config.model, config.dtype, config.device)
    policy = build_policy(config.scheduler.policy, config.policy_options, cost_model, transfer.bytes_per_token,
                          transfer.to_cpu_fraction)
    stats = EngineStats()
    scheduler = Scheduler(config.scheduler, config.cache, policy, stats)
    return ControlPlane(scheduler=scheduler, policy=policy, stats=stats, cost_model=cost_model, transfer=transfer)
