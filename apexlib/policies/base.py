"""The policy contract: where new work is placed, when requests move between tiers, and how an
iteration's GPU-resident and CPU-resident work run together. Torch-free."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from apexlib.core.plan import CpuRuntime, OverlapMode, PredictedTimes, ScheduledSequence, Tier
from apexlib.core.request import Request
from apexlib.kvcache.manager import KVCacheManager


@dataclass(frozen=True)
class IterationCandidate:
    """What the scheduler could run this iteration, before the policy picks the mode."""

    prefills: tuple[ScheduledSequence, ...]
    gpu_decodes: tuple[ScheduledSequence, ...]
    cpu_decodes: tuple[ScheduledSequence, ...]  # every CPU-resident decode that could advance
    # Per entry of ``cpu_decodes``: how many consecutive iterations it was offered and left out (0 when
    # it advanced in the previous iteration it was offered). Policies that bound waiting read it.
    cpu_stalls: tuple[int, ...] = ()

    def stalls_of(self, index: int) -> int:
        return self.cpu_stalls[index] if index < len(self.cpu_stalls) else 0


@dataclass(frozen=True)
class IterationDecision:
    """The policy's choice: the mode, the CPU decodes that run (in order) and, for the pipeline, how
    many of them join the first sub-batch. CPU decodes left out wait for a later iteration."""

    mode: OverlapMode
    cpu_decodes: tuple[ScheduledSequence, ...]
    pipeline_split: int = 0
    predicted: PredictedTimes | None = None
    cpu_runtime: CpuRuntime = CpuRuntime.WORKER


# Swap requests back into the GPU tier only while its usage stays at or below this fraction
# (NEO's hysteresis), so a request swapped out under pressure is not swapped straight back.
SWAP_IN_USAGE_LIMIT = 0.95


class Policy(ABC):
    """Answers the scheduler's placement questions. Torch-free and stateless between engines."""

    name: ClassVar[str]
    uses_cpu_tier: ClassVar[bool]

    @abstractmethod
    def admission_tier(self, request: Request, num_total_tokens: int, kv: KVCacheManager) -> Tier | None:
        """Tier to admit ``request`` into with ``num_total_tokens`` cached after this step, or None to wait."""

    def runs_cpu_decodes(self) -> bool:
        """Whether CPU-resident requests decode at all (False: they wait until swapped in)."""
        return self.uses_cpu_tier

    def swap_out_instead_of_preempt(self) -> bool:
        """When the GPU tier is full: move the newest GPU-resident decode to the CPU tier (True) or
        preempt it and recompute later (False)."""
        return self.uses_cpu_tier

    def may_swap_in(self, request: Request, kv: KVCacheManager) -> bool:
        """Whether a CPU-resident running request should move to the GPU tier now."""
        gpu = kv.pools[Tier.GPU]
        needed = len(kv.block_table(request.request_id)) + 1  # its blocks and room to grow
        return gpu.num_blocks > 0 and (gpu.num_used_blocks + needed) <= SWAP_IN_USAGE_LIMIT * gpu.num_blocks

    @abstractmethod
    def overlap_mode(self, num_cpu_decodes: int) -> OverlapMode:
        """Execution mode of an iteration given how many CPU-resident decodes it runs."""

    def pipeline_split(self, num_cpu_decodes: int) -> int:
        """For ASYMMETRIC_PIPELINE: how many CPU decodes join the first sub-batch (the rest form the second)."""
        return num_cpu_decodes // 2

    def decide(self, candidate: IterationCandidate) -> IterationDecision:
        """Pick the iteration's mode and CPU decodes. Default: every CPU decode, the fixed mode."""
        cpu = candidate.cpu_decodes
        mode = self.overlap_mode(len(cpu))
        split = self.pipeline_split(len(cpu)) if mode is OverlapMode.ASYMMETRIC_PIPELINE else 0
        return IterationDecision(mode=mode, cpu_decodes=cpu if mode is not OverlapMode.NONE else (),
                                 pipeline_split=split)
