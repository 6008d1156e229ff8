"""A pool of fixed-size KV blocks for one memory tier. Torch-free.

Block ids are indices into that tier's cache tensors (``runner.kv_storage``). Freed blocks go to
the back of the free queue, so a block that was just released is the last to be reused.
"""

from __future__ import annotations

from collections import deque


class BlockPool:
    """Free queue and reference counts of ``num_blocks`` blocks."""

    def __init__(self, num_blocks: int, tier_name: str) -> None:
        if num_blocks < 0:
            raise ValueError(f"{tier_name} pool: num_blocks must be >= 0, got {num_blocks}")
        self.tier_name = tier_name
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._ref_counts = [0] * num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use (0 for an empty pool)."""
        return self.num_used_blocks / self.num_blocks if self.num_blocks else 0.0

    def can_allocate(self, count: int) -> bool:
        return count <= len(self._free)

    def allocate(self, count: int) -> list[int]:
        """Take ``count`` blocks; raise if there are fewer free (check ``can_allocate`` first)."""
        if count < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({count})")
        if count > len(self._free):
            raise RuntimeError(f"{self.tier_name} pool: asked for {count} blocks, {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(count)]
        for block in blocks:
            self._ref_counts[block] = 1
        return blocks

    def free(self, blocks: list[int]) -> None:
        for block in blocks:
            if self._ref_counts[block] <= 0:
                raise RuntimeError(f"{self.tier_name} pool: block {block} freed twice")
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                self._free.append(block)

    def ref_count(self, block: int) -> int:
        return self._ref_counts[block]
