"""Paged decode attention on the CPU (the CPU half of APEX's hybrid decode), and the K/V append.

Layout (one layer, vLLM's paged layout with the head axis inside the token row):

* ``query``        ``[num_seqs, num_heads, head_dim]``: the one new token of each sequence;
* ``key_cache``    ``[num_blocks, block_size, num_kv_heads, head_dim]``, ``value_cache`` likewise;
* ``block_tables`` int32 ``[num_seqs, max_blocks_per_seq]``: block ``j`` of sequence ``s`` holds its
  tokens ``j*block_size ... j*block_size + block_size - 1``; entries past the sequence's last block
  are ignored (any value);
* ``context_lens`` int32 ``[num_seqs]``: tokens to attend to (>= 0; 0 gives a zero output).

The result ``[num_seqs, num_heads, head_dim]`` has the query's dtype; everything accumulates in fp32.
Query head ``i`` reads KV head ``i // (num_heads // num_kv_heads)`` (GQA / MQA / MHA).

:func:`paged_decode_attention` runs the compiled kernel (apexlib/kernels/paged_decode_attention.cpp:
flash-decoding splits of whole blocks over the kernel's OpenMP team, K/V streamed in memory order
with the query heads of a GQA group sharing each converted K/V element, online softmax per step,
splits merged by log-sum-exp; its header records the design and what was measured and tried);
:func:`paged_decode_attention_reference` is the plain-torch reference it is tested against.
:func:`store_kv` appends new K/V rows (apexlib/kernels/store_kv.cpp; torch indexing as reference).

SIMD paths: AVX-512 (F/BW/VL/DQ), AVX2+FMA+F16C, and portable scalar code, all in one build and
picked at run time from CPUID; ``APEX_CPU_ISA=scalar|avx2|avx512`` forces one (RuntimeError if the
CPU lacks it); :func:`selected_isa` tells which runs. ``APEX_CPU_ATTENTION=torch`` swaps the kernels
for the plain-torch references (same signatures) for debugging. Threads: :func:`set_num_threads`
(default: every CPU this process may run on), optionally pinned to ``cpu_ids``. The kernels release
the GIL while they run. The probes of the same extension live apart: the DRAM read in
:mod:`apexlib.attention.dram_probe`, the benchmark's minimum-arithmetic stream in
:mod:`apexlib.bench.cpu_probes`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence

import torch

log = logging.getLogger(__name__)

ISAS = ("scalar", "avx2", "avx512")
_KV_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_HEAD_DIM = 256


def _ext():
    from apexlib.kernels import build

    return build.load()


# --------------------------------------------------------------------------- configuration
def available_isas() -> list[str]:
    """The SIMD paths this CPU can run, slowest first."""
    ext = _ext()
    return [name for i, name in enumerate(ISAS) if ext.cpu_supports(i)]


_isa_cache: tuple[str | None, int] | None = None


def _isa_index() -> int:
    global _isa_cache
    env = os.environ.get("APEX_CPU_ISA") or None
    if _isa_cache is not None and _isa_cache[0] == env:
        return _isa_cache[1]
    ext = _ext()
    if env is None:
        idx = int(ext.best_isa())
    else:
        name = env.strip().lower()
        if name not in ISAS:
            raise ValueError(f"APEX_CPU_ISA={env!r}: expected one of {', '.join(ISAS)}")
        idx = ISAS.index(name)
        if not ext.cpu_supports(idx):
            raise RuntimeError(f"APEX_CPU_ISA={name} but this CPU lacks it (supported: {available_isas()})")
    _isa_cache = (env, idx)
    log.debug("CPU attention ISA: %s", ISAS[idx])
    return idx


def selected_isa() -> str:
    """The SIMD path the kernels use now (``scalar``, ``avx2``, ``avx512``), or ``torch``."""
    if _use_torch_reference():
        return "torch"
    return ISAS[_isa_index()]


def _use_torch_reference() -> bool:
    v = os.environ.get("APEX_CPU_ATTENTION", "").strip().lower()
    if v in ("", "kernel", "cpp"):
        return False
    if v == "torch":
        return True
    raise ValueError(f"APEX_CPU_ATTENTION={v!r}: expected 'torch' or unset")


def set_num_threads(n: int, cpu_ids: Sequence[int] | None = None) -> None:
    """Threads of the kernels' OpenMP team; with ``cpu_ids``, thread ``i`` is pinned to
    ``cpu_ids[i % len(cpu_ids)]`` (thread 0 is the calling thread, which gets pinned too)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"num_threads must be a positive int, got {n!r}")
    ids = [int(c) for c in cpu_ids] if cpu_ids is not None else []
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    if allowed is not None and ids and not set(ids) <= allowed:
        raise ValueError(f"cpu_ids {sorted(set(ids) - allowed)} are not in this process's CPU set {sorted(allowed)}")
    _ext().set_num_threads(n, ids)


def get_num_threads() -> int:
    return int(_ext().get_num_threads())


# --------------------------------------------------------------------------- checks
def _fail(name: str, msg: str) -> None:
    raise ValueError(f"{name}: {msg}")


def _check_cpu_tensors(**tensors) -> None:
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            _fail(name, f"expected a torch.Tensor, got {type(t).__name__}")
        if t.device.type != "cpu":
            _fail(name, f"must be on the CPU, got {t.device}")


def _check_paged_kv(key_cache, value_cache, block_tables, context_lens, num_seqs: int | None = None) -> None:
    """Checks of a paged K/V cache and its tables shared by the kernel and the stream probe
    (CPU tensors, checked before); ``num_seqs`` None: as many as ``context_lens`` has."""
    if key_cache.dim() != 4:
        _fail("key_cache", f"expected [num_blocks, block_size, num_kv_heads, head_dim], got shape {tuple(key_cache.shape)}")
    if key_cache.dtype not in _KV_DTYPES:
        _fail("key_cache", f"dtype must be float32, float16 or bfloat16, got {key_cache.dtype}")
    if value_cache.shape != key_cache.shape:
        _fail("value_cache", f"shape {tuple(value_cache.shape)} differs from key_cache {tuple(key_cache.shape)}")
    if value_cache.dtype != key_cache.dtype:
        _fail("value_cache", f"dtype {value_cache.dtype} differs from key_cache {key_cache.dtype}")
    if key_cache.shape[1] < 1:
        _fail("key_cache", "block_size must be >= 1")
    for name, t in (("key_cache", key_cache), ("value_cache", value_cache)):
        if not t.is_contiguous():
            _fail(name, "must be contiguous")
    if num_seqs is None:
        if context_lens.dim() != 1:
            _fail("context_lens", f"expected [num_seqs], got shape {tuple(context_lens.shape)}")
        num_seqs = context_lens.shape[0]
    if block_tables.dtype != torch.int32:
        _fail("block_tables", f"dtype must be torch.int32, got {block_tables.dtype}")
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs:
        _fail("block_tables", f"expected [num_seqs={num_seqs}, max_blocks_per_seq], got shape {tuple(block_tables.shape)}")
    if not block_tables.is_contiguous():
        _fail("block_tables", "must be contiguous")
    if context_lens.dtype != torch.int32:
        _fail("context_lens", f"dtype must be torch.int32, got {context_lens.dtype}")
    if context_lens.dim() != 1 or context_lens.shape[0] != num_seqs:
        _fail("context_lens", f"expected [num_seqs={num_seqs}], got shape {tuple(context_lens.shape)}")
    if not context_lens.is_contiguous():
        _fail("context_lens", "must be contiguous")


def _check_attention_inputs(query, key_cache, value_cache, block_tables, context_lens, out) -> None:
    _check_cpu_tensors(query=query, key_cache=key_cache, value_cache=value_cache, block_tables=block_tables,
                       context_lens=context_lens)
    if query.dim() != 3:
        _fail("query", f"expected [num_seqs, num_heads, head_dim], got shape {tuple(query.shape)}")
    if query.dtype not in _KV_DTYPES:
        _fail("query", f"dtype must be float32, float16 or bfloat16, got {query.dtype}")
    num_seqs, num_heads, head_dim = query.shape
    if head_dim % 16 != 0 or not 16 <= head_dim <= _MAX_HEAD_DIM:
        _fail("query", f"head_dim must be a multiple of 16 in [16, {_MAX_HEAD_DIM}], got {head_dim}")
    _check_paged_kv(key_cache, value_cache, block_tables, context_lens, num_seqs)
    _, _, num_kv_heads, kv_head_dim = key_cache.shape
    if kv_head_dim != head_dim:
        _fail("key_cache", f"head_dim {kv_head_dim} differs from the query's {head_dim}")
    if num_kv_heads < 1 or num_heads % num_kv_heads != 0:
        _fail("key_cache", f"num_kv_heads {num_kv_heads} must divide num_heads {num_heads}")
    if out is not None:
        if not isinstance(out, torch.Tensor) or out.device.type != "cpu":
            _fail("out", "must be a CPU tensor")
        if out.shape != query.shape or out.dtype != query.dtype:
            _fail("out", f"must have the query's shape {tuple(query.shape)} and dtype {query.dtype}, "
                  f"got {tuple(out.shape)} {out.dtype}")


def _check_tables(block_tables: torch.Tensor, context_lens: torch.Tensor, num_blocks: int, block_size: int) -> None:
    """Plain-torch version of the C++ checks (used on the torch reference path)."""
    max_blocks = block_tables.shape[1]
    lens = context_lens.to(torch.int64)
    bad = ((lens < 0) | (lens > max_blocks * block_size)).nonzero()
    if bad.numel():
        s = int(bad[0, 0])
        _fail("context_lens", f"context_lens[{s}] = {int(lens[s])} is outside [0, max_blocks_per_seq * block_size = "
              f"{max_blocks * block_size}]")
    used = torch.arange(max_blocks)[None, :] < ((lens + block_size - 1) // block_size)[:, None]
    bad = (used & ((block_tables < 0) | (block_tables >= num_blocks))).nonzero()
    if bad.numel():
        s, b = int(bad[0, 0]), int(bad[0, 1])
        _fail("block_tables", f"block_tables[{s}, {b}] = {int(block_tables[s, b])} is not a block id in "
              f"[0, num_blocks = {num_blocks})")


# --------------------------------------------------------------------------- ops
def paged_decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    num_threads: int | None = None,
) -> torch.Tensor:
    """softmax(q K^T * scale) V over each sequence's paged context; see the module docstring.

    ``scale`` defaults to ``1/sqrt(head_dim)``; ``out`` (query's shape and dtype) receives the result;
    ``num_threads`` overrides :func:`set_num_threads` for this call. Raises ValueError naming the
    argument for bad shapes, dtypes, layouts, context lengths or block ids.
    """
    _check_attention_inputs(query, key_cache, value_cache, block_tables, context_lens, out)
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    if _use_torch_reference():
        _check_tables(block_tables, context_lens, key_cache.shape[0], key_cache.shape[1])
        return paged_decode_attention_reference(query, key_cache, value_cache, block_tables, context_lens, scale,
                                                out)
    return _ext().paged_decode_attention(
        query, key_cache, value_cache, block_tables, context_lens, float(scale), out, _isa_index(),
        int(num_threads or 0),
    )


def paged_decode_attention_reference(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-torch paged decode attention, one sequence at a time, in fp32 (slow, readable)."""
    num_seqs, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    group = num_heads // num_kv_heads
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    result = torch.zeros(query.shape, dtype=torch.float32)
    for s in range(num_seqs):
        ctx = int(context_lens[s])
        if ctx == 0:
            continue  # nothing to attend to: zero output
        n_blocks = (ctx + block_size - 1) // block_size
        blocks = block_tables[s, :n_blocks].long()
        k = key_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:ctx].float()  # [ctx, kv_heads, D]
        v = value_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:ctx].float()
        k = k.repeat_interleave(group, dim=1)  # [ctx, heads, D]
        v = v.repeat_interleave(group, dim=1)
        q = query[s].float()  # [heads, D]
        scores = torch.einsum("hd,thd->ht", q, k) * scale
        probs = torch.softmax(scores, dim=-1)
        result[s] = torch.einsum("ht,thd->hd", probs, v)
    result = result.to(query.dtype)
    if out is not None:
        out.copy_(result)
        return out
    return result


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write new tokens' K/V rows into the paged cache in place, converting to the cache's dtype.

    ``key``/``value`` ``[num_tokens, num_kv_heads, head_dim]``; ``slot_mapping`` int64 ``[num_tokens]``
    with ``slot = block_id * block_size + offset`` (a negative slot skips the token).
    """
    for name, t in (("key", key), ("value", value), ("key_cache", key_cache), ("value_cache", value_cache),
                    ("slot_mapping", slot_mapping)):
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
            _fail(name, "must be a CPU tensor")
    if key_cache.dim() != 4:
        _fail("key_cache", f"expected [num_blocks, block_size, num_kv_heads, head_dim], got {tuple(key_cache.shape)}")
    if value_cache.shape != key_cache.shape or value_cache.dtype != key_cache.dtype:
        _fail("value_cache", "must match key_cache in shape and dtype")
    for name, t in (("key_cache", key_cache), ("value_cache", value_cache)):
        if t.dtype not in _KV_DTYPES:
            _fail(name, f"dtype must be float32, float16 or bfloat16, got {t.dtype}")
        if not t.is_contiguous():
            _fail(name, "must be contiguous")
    _, _, num_kv_heads, head_dim = key_cache.shape
    num_tokens = slot_mapping.shape[0] if slot_mapping.dim() == 1 else -1
    if slot_mapping.dtype != torch.int64 or slot_mapping.dim() != 1:
        _fail("slot_mapping", f"expected int64 [num_tokens], got {slot_mapping.dtype} {tuple(slot_mapping.shape)}")
    for name, t in (("key", key), ("value", value)):
        if tuple(t.shape) != (num_tokens, num_kv_heads, head_dim):
            _fail(name, f"expected shape {(num_tokens, num_kv_heads, head_dim)}, got {tuple(t.shape)}")
        if t.dtype not in _KV_DTYPES:
            _fail(name, f"dtype must be float32, float16 or bfloat16, got {t.dtype}")
    if value.dtype != key.dtype:
        _fail("value", f"dtype {value.dtype} differs from key's {key.dtype}")
    if _use_torch_reference():
        n_slots = key_cache.shape[0] * key_cache.shape[1]
        if num_tokens and int(slot_mapping.max()) >= n_slots:
            _fail("slot_mapping", f"slot {int(slot_mapping.max())} is not in [0, num_blocks * block_size = {n_slots})")
        keep = slot_mapping >= 0
        key_cache.view(-1, num_kv_heads, head_dim)[slot_mapping[keep]] = key[keep].to(key_cache.dtype)
        value_cache.view(-1, num_kv_heads, head_dim)[slot_mapping[keep]] = value[keep].to(value_cache.dtype)
        return
    _ext().store_kv(key.contiguous(), value.contiguous(), key_cache, value_cache, slot_mapping.contiguous())

