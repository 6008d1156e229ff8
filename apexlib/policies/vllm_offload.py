"""vLLM with CPU KV offloading: the GPU-only baseline whose preempted requests keep their KV cache in host
memory and load it back over PCIe instead of recomputing it. No CPU attention.

This is what ``vllm serve --kv-offloading-backend native --kv-offloading-size <GiB>`` runs (vLLM >= 0.11,
the ``OffloadingConnector``). How vLLM does it, and how this policy maps it onto apexlib's scheduler:

- **Storing.** vLLM writes every full KV block to the CPU tier as soon as it is computed, on a separate
  CUDA stream (``vllm/distributed/kv_transfer/kv_connector/v1/offloading/scheduler.py``,
  ``OffloadingConnectorScheduler._get_reqs_to_store``, called from ``build_connector_meta`` every step);
  when a request is preempted, its pending stores are flushed (``offloading_connector.py``,
  ``OffloadingConnector.handle_preemptions``) and its GPU blocks freed. Here the preempted request's
  blocks are moved to the CPU tier at preemption (``swap_out_instead_of_preempt``), the same bytes once.
- **Loading.** When the preempted request is scheduled again, ``get_num_new_matched_tokens`` finds its
  blocks in the CPU store (``vllm/v1/kv_offload/`` ``cpu/manager.py`` and its LRU policy,
  ``cpu/policies/lru.py``) and ``update_state_after_alloc`` queues a load of those blocks into newly
  allocated GPU blocks; the request resumes after the load instead of re-running its prefill. Here it
  is swapped back in (``may_swap_in``) as soon as the GPU tier has free blocks for it and its next token,
  as vLLM's scheduler allocates them (no hysteresis: on a simulated T4 grid point, p128-o1024, the
  hybrid policies' 95% rule gave this baseline the same throughput within 1% with fewer moves, so
  vLLM's own rule stays).
- **No CPU attention.** A request whose KV is in the CPU tier does not decode (``runs_cpu_decodes``
  is False): it waits for its blocks to come back, as in vLLM, where offloaded blocks are only a cache.
- **Admission** is GPU-only, as vLLM's scheduler admits into GPU blocks.

Differences from vLLM, each in vLLM's favour or neutral: the CPU tier is sized by ``cpu_kv_gib`` and a
request moved out keeps its blocks there until it returns (vLLM's LRU may evict them under pressure and
then recomputes); a request's tail (the last, partial block, which vLLM does not offload and recomputes)
moves with it. Against vLLM: apexlib's runner copies the moved blocks before the iteration's forward
(``predict_iteration`` charges the swap ``W`` in series), where vLLM's stores and loads run on their own
stream beside the forward; the simulator's iteration trace (``num_swap_in_blocks``,
``num_swap_out_blocks``) says how much time that charge is.
"""

from __future__ import annotations

from apexlib.core.plan import OverlapMode, Tier
from apexlib.core.request import Request
from apexlib.kvcache.manager import KVCacheManager
from apexlib.policies.base import Policy


class VllmOffloadPolicy(Policy):
    name = "vllm_offload"
    uses_cpu_tier = True

    def admission_tier(self, request: Request, num_total_tokens: int, kv: KVCacheManager) -> Tier | None:
        # vLLM puts a preempted request back at the head of its waiting queue: nothing new is admitted
        # while a moved-out request waits for its blocks to come back.
        if kv.pools[Tier.CPU].num_used_blocks:
            return None
        return Tier.GPU if kv.can_allocate(request.request_id, num_total_tokens, Tier.GPU) else None

    def may_swap_in(self, request: Request, kv: KVCacheManager) -> bool:
        gpu = kv.pools[Tier.GPU]
        return gpu.num_free_blocks >= len(kv.block_table(request.request_id)) + 1

    def runs_cpu_decodes(self) -> bool:
        return False

    def overlap_mode(self, num_cpu_decodes: int) -> OverlapMode:
        if num_cpu_decodes:
            raise ValueError("vllm_offload runs no CPU-resident decodes (they wait for their KV to come back)")
        return OverlapMode.NONE
