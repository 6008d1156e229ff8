"""vLLM-like baseline: every request's KV on the GPU; out of blocks -> preempt newest and recompute."""

from __future__ import annotations

from apexlib.core.plan import OverlapMode, Tier
from apexlib.core.request import Request
from apexlib.kvcache.manager import KVCacheManager
from apexlib.policies.base import Policy


class GpuOnlyPolicy(Policy):
    name = "gpu_only"
    uses_cpu_tier = False

    def admission_tier(self, request: Request, num_total_tokens: int, kv: KVCacheManager) -> Tier | None:
        return Tier.GPU if kv.can_allocate(request.request_id, num_total_tokens, Tier.GPU) else None

    def may_swap_in(self, request: Request, kv: KVCacheManager) -> bool:
        return False

    def overlap_mode(self, num_cpu_decodes: int) -> OverlapMode:
        if num_cpu_decodes:
            raise ValueError("gpu_only policy cannot run CPU-resident decodes")
        return OverlapMode.NONE
