"""A fixed-mode hybrid policy: the mechanism without the cost model.

New requests go to the GPU tier while it has room and overflow to the CPU tier (``cpu_placement =
"overflow"``), or all go to the CPU tier (``"cpu"``, a test and measurement hook); when the GPU tier
runs out, the newest GPU-resident decode is swapped out to the CPU tier; CPU-resident requests are
swapped back under the 95% hysteresis. Every iteration with CPU-resident decodes runs in the one
configured ``hybrid_mode``. The profiling-informed policies (``neo``, ``apex``) choose the mode per
iteration instead.
"""

from __future__ import annotations

from apexlib.core.plan import OverlapMode, Tier
from apexlib.core.request import Request
from apexlib.kvcache.manager import KVCacheManager
from apexlib.policies.base import Policy
from apexlib.policies.options import HybridOptions


class HybridPolicy(Policy):
    name = "hybrid"
    uses_cpu_tier = True

    def __init__(self, hybrid_mode: OverlapMode | str = OverlapMode.ASYNC_OVERLAP,
                 cpu_placement: str = "overflow") -> None:
        options = HybridOptions(OverlapMode(hybrid_mode).value, cpu_placement)  # validates both
        self.mode = OverlapMode(options.hybrid_mode)
        self.placement = options.cpu_placement

    def admission_tier(self, request: Request, num_total_tokens: int, kv: KVCacheManager) -> Tier | None:
        if self.placement == "overflow" and kv.can_allocate(request.request_id, num_total_tokens, Tier.GPU):
            return Tier.GPU
        if kv.can_allocate(request.request_id, num_total_tokens, Tier.CPU):
            return Tier.CPU
        return None

    def runs_cpu_decodes(self) -> bool:
        return self.mode is not OverlapMode.NONE

    def may_swap_in(self, request: Request, kv: KVCacheManager) -> bool:
        return self.placement == "overflow" and super().may_swap_in(request, kv)

    def overlap_mode(self, num_cpu_decodes: int) -> OverlapMode:
        return self.mode if num_cpu_decodes else OverlapMode.NONE
