"""KV-cache bookkeeping over the GPU and CPU tiers. Torch-free.

A request lives wholly in one tier at a time; its block table is a list of block ids of that
tier. Predicates and actions come in pairs (``can_allocate`` / ``allocate``, ``can_swap_out`` /
``swap_out``); actions return ``None`` when they cannot be carried out and change nothing then.
"""

from __future__ import annotations

import math

from apexlib.core.plan import Tier
from apexlib.kvcache.block_pool import BlockPool


class KVCacheManager:
    def __init__(self, block_size: int, num_gpu_blocks: int, num_cpu_blocks: int) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.pools = {Tier.GPU: BlockPool(num_gpu_blocks, "gpu"), Tier.CPU: BlockPool(num_cpu_blocks, "cpu")}
        self._block_tables: dict[str, list[int]] = {}
        self._tiers: dict[str, Tier] = {}

    # -- queries -----------------------------------------------------------------------------
    def block_table(self, request_id: str) -> list[int]:
        return self._block_tables.get(request_id, [])

    def tier_of(self, request_id: str) -> Tier | None:
        return self._tiers.get(request_id)

    def num_free_blocks(self, tier: Tier) -> int:
        return self.pools[tier].num_free_blocks

    def usage(self, tier: Tier) -> float:
        return self.pools[tier].usage

    def blocks_needed(self, request_id: str, num_total_tokens: int) -> int:
        """Extra blocks needed so that the request's table covers ``num_total_tokens`` tokens."""
        have = len(self._block_tables.get(request_id, ()))
        return max(0, math.ceil(num_total_tokens / self.block_size) - have)

    def slot(self, request_id: str, position: int) -> int:
        """Flat slot index (block_id * block_size + offset) of a token position."""
        table = self._block_tables[request_id]
        return table[position // self.block_size] * self.block_size + position % self.block_size

    # -- allocation ----------------------------------------------------------------------------
    def can_allocate(self, request_id: str, num_total_tokens: int, tier: Tier) -> bool:
        current = self._tiers.get(request_id)
        if current is not None and current is not tier:
            return False
        return self.pools[tier].can_allocate(self.blocks_needed(request_id, num_total_tokens))

    def allocate(self, request_id: str, num_total_tokens: int, tier: Tier) -> list[int] | None:
        """Grow the request's table in ``tier`` to cover ``num_total_tokens``; the new block ids, or None."""
        current = self._tiers.get(request_id)
        if current is not None and current is not tier:
            return None
        needed = self.blocks_needed(request_id, num_total_tokens)
        if needed == 0 and current is tier:
            return []  # the common decode step: its last block still has room
        pool = self.pools[tier]
        if not pool.can_allocate(needed):
            return None
        new_blocks = pool.allocate(needed)
        self._block_tables.setdefault(request_id, []).extend(new_blocks)
        self._tiers[request_id] = tier
        return new_blocks

    def free(self, request_id: str) -> None:
        table = self._block_tables.pop(request_id, None)
        tier = self._tiers.pop(request_id, None)
        if table and tier is not None:
            self.pools[tier].free(table)

    # -- moving between tiers -------------------------------------------------------------------
    def can_move(self, request_id: str, destination: Tier) -> bool:
        source = self._tiers.get(request_id)
        if source is None or source is destination:
            return False
        return self.pools[destination].can_allocate(len(self._block_tables[request_id]))

    def move(self, request_id: str, destination: Tier) -> list[tuple[int, int]] | None:
        """Re-home all blocks of a request in ``destination``: (source_block, destination_block) pairs.

        The caller copies the block contents (``runner.kv_storage``) before the source blocks are reused;
        the source blocks are freed here, so copies must happen in the same iteration, before writes.
        """
        if not self.can_move(request_id, destination):
            return None
        source = self._tiers[request_id]
        old = self._block_tables[request_id]
        new = self.pools[destination].allocate(len(old))
        self.pools[source].free(old)
        self._block_tables[request_id] = new
        self._tiers[request_id] = destination
        return list(zip(old, new, strict=True))

    def can_swap_out(self, request_id: str) -> bool:
        return self.can_move(request_id, Tier.CPU)

    def swap_out(self, request_id: str) -> list[tuple[int, int]] | None:
        return self.move(request_id, Tier.CPU)

    def can_swap_in(self, request_id: str) -> bool:
        return self.can_move(request_id, Tier.GPU)

    def swap_in(self, request_id: str) -> list[tuple[int, int]] | None:
        return self.move(request_id, Tier.GPU)
