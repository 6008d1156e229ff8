"""The minimum-arithmetic stream over a paged K/V cache (apexlib/kernels/arith_stream.cpp), the ceiling
``apex bench cpu-attention`` judges :func:`apexlib.attention.cpu.paged_decode_attention` against: every
K and V element read once in the kernel's work order, widened to fp32 and used in
``num_heads // num_kv_heads`` FMAs. A benchmark probe, not attention; it runs in the kernels' extension
with their ISA and threads. The DRAM read reference is :mod:`apexlib.attention.dram_probe` (the runner
measures the machine with it too).
"""

from __future__ import annotations

import torch

from apexlib.attention.cpu import _check_cpu_tensors, _check_paged_kv, _ext, _fail, _isa_index


def arith_stream_pass(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    num_heads: int,
    num_threads: int | None = None,
) -> float:
    """Minimum-arithmetic stream over a paged K/V cache: a probe for the benchmark, not attention.

    Reads every valid K and V element of each sequence's context once (``context_lens[s]`` tokens,
    blocks from ``block_tables``, all KV heads of each token row), with the kernel's work split,
    threads and ISA and a software prefetch one line per line consumed, 16 KiB ahead
    (``APEX_ARITH_STREAM_PREFETCH_BYTES``), widens it to fp32 and does ``G = num_heads //
    num_kv_heads`` fp32 FMAs with it: the work decode attention cannot avoid, without the softmax.
    Its time is what the benchmark's ``arith_stream_gbps`` reports.

    Returns a checksum: the sum over all valid K and V elements ``x`` of ``x * sum_g q_g[j]``, with
    ``q_g[j] = (8 * g + j + 1) / 64`` for ``g < G`` and ``j`` the element's index in its token row
    mod 8 (accumulated in fp32 per work item and summed over items in a fixed order: deterministic for
    a given thread count, and within ~1e-6 of a float64 reference relative to the sum of
    ``|x| * sum_g q_g[j]``). Raises ValueError naming the argument for bad shapes, dtypes,
    context lengths or block ids.
    """
    _check_cpu_tensors(key_cache=key_cache, value_cache=value_cache, block_tables=block_tables,
                       context_lens=context_lens)
    _check_paged_kv(key_cache, value_cache, block_tables, context_lens)
    _, _, num_kv_heads, head_dim = key_cache.shape
    if head_dim % 16 != 0:
        _fail("key_cache", f"head_dim must be a multiple of 16, got {tuple(key_cache.shape)}")
    if not isinstance(num_heads, int) or num_heads < 1 or num_heads % max(num_kv_heads, 1) != 0:
        _fail("num_heads", f"must be a positive multiple of num_kv_heads {num_kv_heads}, got {num_heads!r}")
    return float(_ext().arith_stream_pass(key_cache, value_cache, block_tables, context_lens, int(num_heads),
                                          _isa_index(), int(num_threads or 0)))
