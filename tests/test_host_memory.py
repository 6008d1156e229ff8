"""Huge-page host tensors (apexlib.runner.host_memory) and their use by the CPU KV tier."""

from __future__ import annotations

import gc

import pytest
import torch

from apexlib.runner import host_memory
from apexlib.runner.host_memory import HUGE_PAGE_BYTES, host_empty, huge_pages_possible
from apexlib.runner.kv_storage import KVStorage

needs_thp = pytest.mark.skipif(not huge_pages_possible(),
                               reason=f"transparent huge pages not available here (mode: {host_memory.thp_mode()})")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_shape_dtype_and_contents(dtype):
    shape = (3, 5, 64, 1024)  # 3.75 MiB in fp32: large enough for the huge-page path
    t = host_empty(shape, dtype)
    assert t.shape == shape and t.dtype == dtype and t.is_contiguous() and t.device.type == "cpu"
    values = torch.arange(t.numel(), dtype=torch.float32).remainder(251).to(dtype).view(shape)
    t.copy_(values)
    assert torch.equal(t, values)


@needs_thp
def test_large_tensor_is_huge_page_aligned():
    t = host_empty((4 * HUGE_PAGE_BYTES // 2,), torch.float16)
    assert t.data_ptr() % HUGE_PAGE_BYTES == 0


def test_view_keeps_the_mapping_alive():
    t = host_empty((2, HUGE_PAGE_BYTES), torch.uint8)
    tail = t[1]
    del t
    gc.collect()
    tail.fill_(7)  # would fault if the mapping had been released with its first tensor
    assert int(tail.sum()) == 7 * HUGE_PAGE_BYTES


def test_small_or_disabled_falls_back_to_torch_empty(monkeypatch):
    small = host_empty((16,), torch.float32)
    assert small.shape == (16,)
    monkeypatch.setenv("APEX_HUGE_PAGES", "0")
    assert not huge_pages_possible()
    plain = host_empty((HUGE_PAGE_BYTES,), torch.float32)
    plain.fill_(1.0)
    assert float(plain.sum()) == HUGE_PAGE_BYTES


def test_negative_size_is_refused():
    with pytest.raises(ValueError, match="sizes must be >= 0"):
        host_empty((4, -1), torch.float32)


@needs_thp
def test_cpu_kv_tier_uses_huge_pages():
    storage = KVStorage(num_layers=2, num_blocks=64, block_size=16, num_kv_heads=8, head_dim=128,
                        dtype=torch.float16, device="cpu")
    assert storage.kv.data_ptr() % HUGE_PAGE_BYTES == 0
    assert storage.key_cache(1).shape == (64, 16, 8, 128)
    storage.value_cache(1).fill_(2.0)
    assert float(storage.kv[1, 1].float().mean()) == 2.0 and storage.kv.is_contiguous()
