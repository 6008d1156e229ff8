"""The attention-backend contract and its plain-torch reference implementation.

A backend stores the new tokens' K/V into a paged cache and computes attention for a batch
whose rows are laid out prefills first, then decodes (one query token each). Caches are one
layer's ``[num_blocks, block_size, num_kv_heads, head_dim]`` tensors.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from apexlib.engine.args import DECODE_GATHER_TOKENS


@dataclass(frozen=True)
class AttentionMetadata:
    """Per-iteration inputs of attention, shared by every layer.

    ``num_prefills`` sequences come first (their query rows are contiguous chunks), then
    ``num_decodes`` sequences with exactly one query row each.
    """

    num_prefills: int
    num_decodes: int
    query_start_loc: tuple[int, ...]  # [num_seqs + 1] row offsets into the flat token batch
    start_positions: tuple[int, ...]  # [num_seqs] cached tokens before this iteration
    context_lens_list: tuple[int, ...]  # [num_seqs] cached tokens after this iteration
    context_lens: torch.Tensor  # int32 [num_seqs]
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks_per_seq], padded with 0
    slot_mapping: torch.Tensor  # int64 [num_tokens] flat cache slot of every new token

    @property
    def num_prefill_tokens(self) -> int:
        return self.query_start_loc[self.num_prefills]


class AttentionBackend(ABC):
    name: ClassVar[str]

    @abstractmethod
    def store_kv(self, key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                 value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Write key/value [T, KVH, D] into the caches at the flat slots [T]."""

    @abstractmethod
    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                value_cache: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        """query [T, H, D], this iteration's key/value [T, KVH, D] -> attention output [T, H, D].

        Causal over each sequence's tokens. A prefill chunk that starts at position 0 attends over its
        fresh key/value (so it needs nothing from the cache: CPU-tier prefills rely on this); a later
        chunk and every decode read the cache, where ``store_kv`` has already put this iteration's rows.
        """


def store_kv_reference(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                       value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    num_blocks, block_size, num_kv_heads, head_dim = key_cache.shape
    flat_keys = key_cache.view(num_blocks * block_size, num_kv_heads, head_dim)
    flat_values = value_cache.view(num_blocks * block_size, num_kv_heads, head_dim)
    flat_keys.index_copy_(0, slot_mapping, key.to(key_cache.dtype))
    flat_values.index_copy_(0, slot_mapping, value.to(value_cache.dtype))


def gather_sequence_kv(cache: torch.Tensor, block_table: torch.Tensor, context_len: int) -> torch.Tensor:
    """One sequence's cached rows [context_len, KVH, D] from a paged cache."""
    block_size = cache.shape[1]
    num_blocks = -(-context_len // block_size)
    return cache[block_table[:num_blocks].long()].flatten(0, 1)[:context_len]


def native_gqa(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether SDPA takes K/V with fewer heads than the query (``enable_gqa``) on a fused kernel here.

    On CUDA only the flash kernel has grouped-query support (the memory-efficient one has none, and
    ``enable_gqa`` there falls to the math path, which keeps the fp32 score matrix): flash needs compute
    capability 8.0 or more, float16/bfloat16 and a head size that is a multiple of 8 up to 256. On a
    CPU, SDPA's own kernels take grouped K/V."""
    if device.type != "cuda":
        return True
    return (dtype in (torch.float16, torch.bfloat16) and head_dim % 8 == 0 and head_dim <= 256
            and tuple(torch.cuda.get_device_capability(device)) >= (8, 0))


def _grouped(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """K/V [1, KVH, n, D] for a query [1, H, n, D]: as they are with ``enable_gqa`` where that runs fused
    (:func:`native_gqa`), else repeated to H heads (head h reads KV head h // (H / KVH), as GQA does)."""
    heads, kv_heads = query.shape[1], key.shape[1]
    if heads == kv_heads:
        return key, value, False
    if native_gqa(query.device, query.dtype, query.shape[-1]):
        return key, value, True
    group = heads // kv_heads
    return key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1), False


def prefill_attention_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                key_cache: torch.Tensor, value_cache: torch.Tensor, metadata: AttentionMetadata,
                                out: torch.Tensor) -> None:
    """Prefill rows, one sequence at a time: query row i of a chunk starting at s sees keys <= s + i.

    4-D inputs ``[1, heads, rows, D]`` (the fused SDPA kernels take no other): a chunk from position 0
    is causal over its own K/V (``is_causal``); a later chunk attends over its gathered context with a
    lower-right causal bias (:func:`torch.nn.attention.bias.causal_lower_right`, no dense mask), which
    the flash and memory-efficient kernels apply themselves."""
    for index in range(metadata.num_prefills):
        first, last = metadata.query_start_loc[index], metadata.query_start_loc[index + 1]
        start, context = metadata.start_positions[index], metadata.context_lens_list[index]
        q = query[first:last].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
        if start == 0:
            keys, values, bias = key[first:last], value[first:last], None
        else:
            keys = gather_sequence_kv(key_cache, metadata.block_tables[index], context).to(query.dtype)
            values = gather_sequence_kv(value_cache, metadata.block_tables[index], context).to(query.dtype)
            bias = causal_lower_right(last - first, context)
        keys, values, gqa = _grouped(q, keys.transpose(0, 1).unsqueeze(0), values.transpose(0, 1).unsqueeze(0))
        result = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, is_causal=bias is None,
                                                enable_gqa=gqa)
        out[first:last] = result[0].transpose(0, 1)


def decode_groups(context_lens: Sequence[int], max_tokens: int = DECODE_GATHER_TOKENS) -> list[tuple[int, int]]:
    """Consecutive row ranges [first, last) whose padded gather (rows x their longest context) stays
    within ``max_tokens`` (a row longer than that alone is a group of its own)."""
    groups, first, longest = [], 0, 0
    for row, length in enumerate(context_lens):
        if row > first and (row + 1 - first) * max(longest, length) > max_tokens:
            groups.append((first, row))
            first, longest = row, 0
        longest = max(longest, length)
    if len(context_lens) > first:
        groups.append((first, len(context_lens)))
    return groups


def decode_attention_reference(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                               block_tables: torch.Tensor, context_lens: torch.Tensor,
                               context_lens_list: Sequence[int]) -> torch.Tensor:
    """Batched decode: query [B, H, D] against each sequence's paged context -> [B, H, D].

    ``context_lens_list`` holds the lengths of the device tensor ``context_lens`` on the host: the
    padding is sized from it, so no layer reads a device value back (the host keeps running ahead of
    the GPU). Rows run in groups of bounded padded size (:func:`decode_groups`); each group gathers its
    K and V once into ``[b, KVH, longest, D]`` and masks the padding. The query heads that share a KV
    head become rows of one query ``[b, KVH, H / KVH, D]``, so grouped-query attention needs neither
    ``enable_gqa`` nor repeated K/V."""
    batch, heads, head_dim = query.shape
    num_blocks, block_size, kv_heads, _ = key_cache.shape
    group = heads // kv_heads
    flat_keys = key_cache.flatten(0, 1)
    flat_values = value_cache.flatten(0, 1)
    out = torch.empty_like(query)
    for first, last in decode_groups(context_lens_list[:batch]):
        rows = last - first
        longest = max(context_lens_list[first:last])
        positions = torch.arange(longest, device=query.device)
        slots = block_tables[first:last].long()[:, positions // block_size] * block_size + positions % block_size
        valid = positions.unsqueeze(0) < context_lens[first:last].unsqueeze(1).long()  # [b, longest]
        # A padded position reads the row's first slot (written: every context holds >= 1 token) instead of
        # a never-written, possibly NaN row, which would poison the output even masked (0 * NaN = NaN).
        slots = torch.where(valid, slots, slots[:, :1])
        keys = flat_keys[slots].to(query.dtype).permute(0, 2, 1, 3)  # [b, KVH, longest, D]
        values = flat_values[slots].to(query.dtype).permute(0, 2, 1, 3)
        q = query[first:last].reshape(rows, kv_heads, group, head_dim)
        mask = valid.view(rows, 1, 1, longest)
        result = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # [b, KVH, group, D]
        out[first:last] = result.reshape(rows, heads, head_dim)
    return out


class TorchReferenceBackend(AttentionBackend):
    """Plain torch on any device: per-sequence masked SDPA for prefills, gathered SDPA for decodes."""

    name = "torch"

    def store_kv(self, key, value, key_cache, value_cache, slot_mapping) -> None:
        store_kv_reference(key, value, key_cache, value_cache, slot_mapping)

    def forward(self, query, key, value, key_cache, value_cache, metadata) -> torch.Tensor:
        out = torch.empty_like(query)
        prefill_attention_reference(query, key, value, key_cache, value_cache, metadata, out)
        if metadata.num_decodes:
            first = metadata.num_prefill_tokens
            seqs = slice(metadata.num_prefills, metadata.num_prefills + metadata.num_decodes)
            out[first:] = decode_attention_reference(query[first:], key_cache, value_cache,
                                                     metadata.block_tables[seqs], metadata.context_lens[seqs],
                                                     metadata.context_lens_list[seqs])
        return out
