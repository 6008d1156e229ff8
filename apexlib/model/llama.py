"""LLaMA-family decoder split into the stages the runner calls one at a time.

Per layer: ``pre_attention`` (RMSNorm, fused QKV projection, RoPE) -> attention (an attention
backend, outside this module, so it can run on the GPU or the CPU) -> ``post_attention`` (O
projection, residual, RMSNorm, fused gate/up MLP, residual). Numerics follow Hugging Face's
``modeling_llama`` (RMSNorm in fp32, RoPE tables in fp32, rotate-half convention) so greedy
tokens match ``transformers``' ``generate``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from apexlib.core.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden.dtype
        hidden32 = hidden.to(torch.float32)
        variance = hidden32.pow(2).mean(-1, keepdim=True)
        hidden32 = hidden32 * torch.rsqrt(variance + self.eps)
        return self.weight * hidden32.to(input_dtype)


def rope_inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] in fp32, with ``linear`` or ``llama3`` scaling applied."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim))
    scaling = config.rope_scaling_dict or {}
    rope_type = config.rope_type
    if rope_type == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif rope_type == "llama3":
        factor = float(scaling["factor"])
        low_freq_factor = float(scaling["low_freq_factor"])
        high_freq_factor = float(scaling["high_freq_factor"])
        original_context = float(scaling["original_max_position_embeddings"])
        low_freq_wavelen = original_context / low_freq_factor
        high_freq_wavelen = original_context / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (original_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position up to ``max_position_embeddings``, computed once in fp32."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        inv_freq = rope_inverse_frequencies(config)
        positions = torch.arange(config.max_position_embeddings, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos_table", emb.cos(), persistent=False)  # [max_positions, head_dim]
        self.register_buffer("sin_table", emb.sin(), persistent=False)

    def forward(self, query: torch.Tensor, key: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """query [T, H, D], key [T, KVH, D], positions int64 [T] -> rotated query, key."""
        cos = self.cos_table[positions].to(query.dtype).unsqueeze(1)  # [T, 1, D]
        sin = self.sin_table[positions].to(query.dtype).unsqueeze(1)
        return query * cos + _rotate_half(query) * sin, key * cos + _rotate_half(key) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=config.attention_bias)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.intermediate_size = config.intermediate_size

    def pre_attention(self, hidden: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden [T, hidden] -> query [T, H, D], key [T, KVH, D], value [T, KVH, D] (RoPE applied)."""
        qkv = self.qkv_proj(self.input_layernorm(hidden))
        query, key, value = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        query = query.view(-1, self.num_heads, self.head_dim)
        key = key.view(-1, self.num_kv_heads, self.head_dim)
        value = value.view(-1, self.num_kv_heads, self.head_dim)
        query, key = rotary(query, key, positions)
        return query, key, value.contiguous()

    def post_attention(self, attention_output: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """attention_output [T, H*D], residual [T, hidden] (the layer's input) -> the layer's output [T, hidden]."""
        hidden = residual + self.o_proj(attention_output)
        gate, up = self.gate_up_proj(self.post_attention_layernorm(hidden)).split(self.intermediate_size, dim=-1)
        return hidden + self.down_proj(F.silu(gate) * up)


class LlamaModel(nn.Module):
    """Embeddings, decoder layers, final norm and LM head. The runner drives the layer loop."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([LlamaDecoderLayer(config) for _ in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(token_ids)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] (rows to sample) -> logits [N, vocab] in fp32."""
        return self.lm_head(self.norm(hidden)).float()
