"""Shared fixtures: tiny checkpoints (built once per session into a temporary cache) and HF references."""

from __future__ import annotations

import os
import sys

import pytest


@pytest.fixture(scope="session", autouse=True)
def _tiny_cache(tmp_path_factory):
    """Hermetic tiny-checkpoint cache for the whole session (workers never share half-built dirs)."""
    if "APEX_TINY_CACHE" not in os.environ:
        os.environ["APEX_TINY_CACHE"] = str(tmp_path_factory.mktemp("tiny-cache"))
    yield


@pytest.fixture(scope="session")
def tiny_path():
    from apexlib.model.tiny import tiny_checkpoint

    def build(preset: str = "gqa", seed: int = 0, shards: int = 1):
        return tiny_checkpoint(preset, seed, shards=shards)

    return build


@pytest.fixture(scope="session")
def hf_greedy():
    """Greedy continuation from transformers' generate, one prompt at a time (no padding effects)."""
    import torch
    from transformers import LlamaForCausalLM

    cache: dict = {}

    def run(path, prompts: list[list[int]], max_new_tokens: int, dtype=torch.float32) -> list[list[int]]:
        key = (str(path), dtype)
        if key not in cache:
            cache[key] = LlamaForCausalLM.from_pretrained(str(path), dtype=dtype).eval()
        model = cache[key]
        results = []
        with torch.inference_mode():
            for prompt in prompts:
                out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                                     eos_token_id=None, pad_token_id=0, min_new_tokens=max_new_tokens)
                results.append(out[0, len(prompt):].tolist())
        return results

    return run


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


requires_cuda = pytest.mark.skipif(not cuda_available(), reason="no CUDA GPU on this machine (torch sees none)")

# Make `tests` helpers importable as a package-less directory.
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(params=["scalar", "avx2", "avx512"])
def isa(request, monkeypatch):
    """Each CPU kernel ISA path in turn (skipped where this CPU lacks it), forced with APEX_CPU_ISA."""
    from apexlib.attention import cpu

    name = request.param
    supported = cpu.available_isas()
    if name not in supported:
        pytest.skip(f"this CPU lacks the {name} path (supported: {supported})")
    monkeypatch.setenv("APEX_CPU_ISA", name)
    monkeypatch.delenv("APEX_CPU_ATTENTION", raising=False)
    assert cpu.selected_isa() == name
    return name


def make_inputs(context_lens, num_heads, num_kv_heads, head_dim, block_size, kv_dtype,
                q_dtype=None, extra_blocks=3, seed=0):
    """Paged attention inputs (query, K cache, V cache, block tables, context lengths) for the CPU kernel
    tests: scattered block tables (random order, unused blocks in between) with junk trailing entries;
    the query is float32 unless q_dtype is given."""
    import torch

    q_dtype = torch.float32 if q_dtype is None else q_dtype
    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = [(c + block_size - 1) // block_size for c in context_lens]
    num_blocks = sum(blocks_per_seq) + extra_blocks
    key_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(kv_dtype)
    value_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(kv_dtype)
    max_blocks = max(blocks_per_seq) + 2
    perm = torch.randperm(num_blocks, generator=g)
    block_tables = torch.randint(-5, 10**6, (len(context_lens), max_blocks), generator=g, dtype=torch.int32)
    i = 0
    for s, n in enumerate(blocks_per_seq):
        block_tables[s, :n] = perm[i:i + n].to(torch.int32)
        i += n
    query = torch.randn(len(context_lens), num_heads, head_dim, generator=g).to(q_dtype)
    return query, key_cache, value_cache, block_tables, torch.tensor(context_lens, dtype=torch.int32)
