"""Block pool and two-tier KV manager, with no torch."""

from __future__ import annotations

import pytest

from apexlib.core.plan import Tier
from apexlib.kvcache.block_pool import BlockPool
from apexlib.kvcache.manager import KVCacheManager


def test_block_pool_allocate_free_reuse_order():
    pool = BlockPool(4, "gpu")
    assert pool.num_free_blocks == 4 and pool.usage == 0.0
    first = pool.allocate(3)
    assert first == [0, 1, 2] and pool.num_free_blocks == 1 and pool.usage == 0.75
    assert not pool.can_allocate(2)
    with pytest.raises(RuntimeError, match="asked for 2 blocks, 1 free"):
        pool.allocate(2)
    pool.free([1])
    # freed blocks go to the back: block 3 is handed out before the just-freed block 1
    assert pool.allocate(2) == [3, 1]
    with pytest.raises(RuntimeError, match="freed twice"):
        pool.free([0, 0])


def test_manager_allocate_grows_table_only_when_needed():
    kv = KVCacheManager(block_size=4, num_gpu_blocks=5, num_cpu_blocks=0)
    assert kv.allocate("a", 3, Tier.GPU) == [0]
    assert kv.allocate("a", 4, Tier.GPU) == []  # still fits in block 0
    assert kv.allocate("a", 5, Tier.GPU) == [1]
    assert kv.block_table("a") == [0, 1]
    assert kv.slot("a", 5) == 1 * 4 + 1
    assert kv.allocate("b", 13, Tier.GPU) is None  # needs 4 blocks, 3 free: nothing changes
    assert kv.block_table("b") == [] and kv.num_free_blocks(Tier.GPU) == 3
    kv.free("a")
    assert kv.num_free_blocks(Tier.GPU) == 5 and kv.tier_of("a") is None


def test_manager_request_lives_in_one_tier_and_moves_whole():
    kv = KVCacheManager(block_size=2, num_gpu_blocks=4, num_cpu_blocks=3)
    kv.allocate("a", 5, Tier.GPU)  # 3 blocks
    assert not kv.can_allocate("a", 6, Tier.CPU)  # cannot grow into another tier
    pairs = kv.swap_out("a")
    assert [src for src, _ in pairs] == [0, 1, 2] and len({dst for _, dst in pairs}) == 3
    assert kv.tier_of("a") is Tier.CPU and kv.num_free_blocks(Tier.GPU) == 4
    kv.allocate("b", 4, Tier.GPU)  # 2 blocks
    kv.allocate("c", 2, Tier.GPU)  # 1 block; 1 GPU block left
    assert not kv.can_swap_in("a") and kv.swap_in("a") is None
    kv.free("b")
    back = kv.swap_in("a")
    assert len(back) == 3 and kv.tier_of("a") is Tier.GPU and kv.num_free_blocks(Tier.CPU) == 3


def test_manager_rejects_bad_block_size():
    with pytest.raises(ValueError, match="block_size"):
        KVCacheManager(block_size=0, num_gpu_blocks=1, num_cpu_blocks=0)
