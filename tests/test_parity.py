"""Greedy tokens equal transformers' generate on tiny checkpoints of every supported shape."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import requires_cuda
from transformers import LlamaForCausalLM

from apexlib import LLM, SamplingParams
from apexlib.core.config import ModelConfig
from apexlib.core.plan import Tier
from apexlib.model.llama import rope_inverse_frequencies
from apexlib.model.weights import load_model

MAX_NEW = 24


def prompts_of_lengths(lengths, vocab_size, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(4, vocab_size) for _ in range(n)] for n in lengths]


def generate_ids(llm, prompts, max_tokens=MAX_NEW):
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


@pytest.mark.parametrize("preset", ["mha", "gqa", "llama3", "tied"])
def test_greedy_parity_mixed_lengths(preset, tiny_path, hf_greedy):
    path = tiny_path(preset)
    config = ModelConfig.from_pretrained(path)
    prompts = prompts_of_lengths([1, 5, 17, 64, 150, 3], config.vocab_size)
    llm = LLM(str(path), dtype="float32", device="cpu")
    assert generate_ids(llm, prompts) == hf_greedy(path, prompts, MAX_NEW)


def test_greedy_parity_with_preemption_and_chunked_prefill(tiny_path, hf_greedy):
    """A KV budget of 24 blocks x 8 tokens cannot hold 10 requests of ~60-100 tokens: preemption."""
    path = tiny_path("gqa")
    config = ModelConfig.from_pretrained(path)
    prompts = prompts_of_lengths([40, 60, 33, 70, 9, 50, 45, 66, 20, 58], config.vocab_size, seed=1)
    llm = LLM(str(path), dtype="float32", device="cpu", block_size=8, num_gpu_blocks=24, max_model_len=192,
              max_num_batched_tokens=64)
    got = generate_ids(llm, prompts, max_tokens=32)
    stats = llm.llm_engine.stats
    assert stats.preemptions > 0, stats
    assert got == hf_greedy(path, prompts, 32)
    # every block came back
    assert llm.llm_engine.scheduler.kv.num_free_blocks(Tier.GPU) == 24


def test_sharded_checkpoint_loads_identically(tiny_path):
    single = load_model(ModelConfig.from_pretrained(tiny_path("gqa")), "float32", "cpu")
    sharded = load_model(ModelConfig.from_pretrained(tiny_path("gqa", shards=3)), "float32", "cpu")
    for (name, a), (_, b) in zip(single.state_dict().items(), sharded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_logits_match_hf_forward(tiny_path):
    """Prefill logits of every position equal HF's within fp32 tolerance (not just the argmax)."""
    path = tiny_path("llama3")
    config = ModelConfig.from_pretrained(path)
    hf = LlamaForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    ours = load_model(config, "float32", "cpu")
    tokens = torch.tensor(prompts_of_lengths([200], config.vocab_size, seed=3)[0])
    with torch.inference_mode():
        expected = hf(tokens.unsqueeze(0)).logits[0]
        hidden = ours.embed(tokens)
        positions = torch.arange(len(tokens))
        for layer in ours.layers:
            q, k, v = layer.pre_attention(hidden, positions, ours.rotary)
            attention = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, enable_gqa=True)
            hidden = layer.post_attention(attention.transpose(0, 1).reshape(len(tokens), -1), hidden)
        logits = ours.compute_logits(hidden)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_llama3_rope_matches_transformers(tiny_path):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    path = tiny_path("llama3")
    config = ModelConfig.from_pretrained(path)
    assert config.rope_type == "llama3"
    hf_config = LlamaConfig.from_pretrained(str(path))
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    ours = rope_inverse_frequencies(config)
    torch.testing.assert_close(ours, expected.float())
    # the scaling really changes some frequencies at this size
    plain = 1.0 / (config.rope_theta ** (torch.arange(0, config.head_dim, 2).float() / config.head_dim))
    assert not torch.allclose(ours, plain)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_runs_and_mostly_agrees(dtype, tiny_path, hf_greedy):
    """Half precision: same first tokens as HF in that dtype (rounding may diverge later)."""
    path = tiny_path("gqa")
    config = ModelConfig.from_pretrained(path)
    prompts = prompts_of_lengths([12, 30], config.vocab_size, seed=5)
    llm = LLM(str(path), dtype=dtype, device="cpu")
    got = generate_ids(llm, prompts, max_tokens=8)
    expected = hf_greedy(path, prompts, 8, dtype=getattr(torch, dtype))
    assert [g[:4] for g in got] == [e[:4] for e in expected]


@requires_cuda
@pytest.mark.cuda
def test_greedy_parity_on_cuda(tiny_path, hf_greedy):
    path = tiny_path("gqa")
    config = ModelConfig.from_pretrained(path)
    prompts = prompts_of_lengths([3, 40, 90], config.vocab_size, seed=2)
    llm = LLM(str(path), dtype="float32", device="cuda", num_gpu_blocks=16, block_size=16, max_model_len=256)
    assert generate_ids(llm, prompts) == hf_greedy(path, prompts, MAX_NEW)


def test_decode_reference_ignores_garbage_in_unused_cache_rows():
    """Padded positions of the gathered decode batch may hold NaN (torch.empty caches): no effect."""
    from apexlib.attention.base import decode_attention_reference

    torch.manual_seed(0)
    key_cache = torch.randn(6, 4, 2, 16)
    value_cache = torch.randn(6, 4, 2, 16)
    tables = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    lens = torch.tensor([5, 8], dtype=torch.int32)
    query = torch.randn(2, 4, 16)
    clean = decode_attention_reference(query, key_cache, value_cache, tables, lens, (5, 8))
    key_cache[1, 1:] = float("nan")  # rows 5..7 of sequence 0: beyond its context
    value_cache[1, 1:] = float("nan")
    dirty = decode_attention_reference(query, key_cache, value_cache, tables, lens, (5, 8))
    assert torch.isfinite(dirty).all()
    torch.testing.assert_close(dirty, clean)
