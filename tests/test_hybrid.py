"""Hybrid data plane: CPU-resident requests, swaps, the worker thread, and every execution mode.

Every configuration must give the same greedy tokens as transformers' generate: where a request
ran (GPU tier, CPU tier, pipelined, swapped, preempted and recomputed) must not change its output.
"""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch
from conftest import requires_cuda

from apexlib import LLM, SamplingParams
from apexlib.attention import cpu as cpu_attention
from apexlib.core.config import ModelConfig
from apexlib.runner.overlap import CpuAttentionWorker

MAX_NEW = 32


def prompts_for(path, lengths, seed=0):
    vocab = ModelConfig.from_pretrained(path).vocab_size
    rng = random.Random(seed)
    return [[rng.randrange(4, vocab) for _ in range(n)] for n in lengths]


def run(path, prompts, max_tokens=MAX_NEW, output_lengths=None, **engine_kwargs):
    llm = LLM(str(path), dtype="float32", device="cpu", block_size=8, max_model_len=192, policy="hybrid",
              **engine_kwargs)
    lengths = output_lengths or [max_tokens] * len(prompts)
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in lengths]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    llm.llm_engine.close()
    return [list(o.outputs[0].token_ids) for o in outputs], llm.llm_engine.stats


LENGTHS = [40, 60, 33, 70, 9, 50, 45, 66, 20, 58]


@pytest.mark.parametrize("preset", ["mha", "gqa"])
@pytest.mark.parametrize("mode", ["async_overlap", "asymmetric_pipeline"])
def test_all_cpu_placement_with_preemption(preset, mode, tiny_path, hf_greedy):
    """Every request in the CPU tier, which is too small for all: CPU decodes plus recompute."""
    path = tiny_path(preset)
    prompts = prompts_for(path, LENGTHS)
    got, stats = run(path, prompts, num_gpu_blocks=24, num_cpu_blocks=64,
                       policy_options={"hybrid_mode": mode, "cpu_placement": "cpu"})
    assert got == hf_greedy(path, prompts, MAX_NEW)
    assert stats.cpu_decode_tokens > 0 and stats.gpu_decode_tokens == 0
    assert stats.mode_counts.get(mode, 0) > 0 and stats.preemptions > 0


@pytest.mark.parametrize("preset", ["mha", "gqa"])
@pytest.mark.parametrize("mode", ["async_overlap", "asymmetric_pipeline"])
def test_mixed_placement_with_swaps_both_ways(preset, mode, tiny_path, hf_greedy):
    """A small GPU tier: overflow to the CPU tier, swap out under pressure, swap back in when
    short requests finish; GPU and CPU decodes in the same iterations."""
    path = tiny_path(preset)
    prompts = prompts_for(path, LENGTHS, seed=1)
    outputs = [8, 48, 8, 48, 8, 48, 8, 48, 8, 48]
    got, stats = run(path, prompts, output_lengths=outputs, num_gpu_blocks=30, num_cpu_blocks=120,
                     policy_options={"hybrid_mode": mode, "cpu_placement": "overflow"})
    expected = [full[:n] for full, n in zip(hf_greedy(path, prompts, 48), outputs, strict=True)]
    assert got == expected
    assert stats.cpu_decode_tokens > 0 and stats.gpu_decode_tokens > 0
    assert stats.swapped_out_blocks > 0 and stats.swapped_in_blocks > 0, stats
    assert stats.mode_counts.get(mode, 0) > 0


def test_mode_none_cpu_requests_wait_for_swap_in(tiny_path, hf_greedy):
    path = tiny_path("gqa")
    prompts = prompts_for(path, LENGTHS, seed=2)
    got, stats = run(path, prompts, num_gpu_blocks=24, num_cpu_blocks=64, policy_options={"hybrid_mode": "none"})
    assert got == hf_greedy(path, prompts, MAX_NEW)
    assert stats.cpu_decode_tokens == 0 and stats.swapped_in_blocks > 0
    assert set(stats.mode_counts) == {"none"}


def test_hybrid_needs_a_cpu_tier(tiny_path):
    with pytest.raises(ValueError, match="needs a CPU KV tier that holds one maximum-length request"):
        LLM(str(tiny_path("gqa")), device="cpu", policy="hybrid", num_cpu_blocks=2, max_model_len=192)
    with pytest.raises(ValueError, match="hybrid_mode must be one of"):
        LLM(str(tiny_path("gqa")), device="cpu", policy="hybrid", policy_options={"hybrid_mode": "sideways"})


def test_cpu_attention_runs_on_the_worker_thread(tiny_path, monkeypatch):
    seen = set()
    original = cpu_attention.paged_decode_attention

    def recording(*args, **kwargs):
        seen.add(threading.current_thread().name)
        return original(*args, **kwargs)

    monkeypatch.setattr(cpu_attention, "paged_decode_attention", recording)
    path = tiny_path("gqa")
    run(path, prompts_for(path, [10, 20]), max_tokens=4, num_gpu_blocks=24, num_cpu_blocks=64,
        policy_options={"cpu_placement": "cpu"})
    assert seen == {"apex-cpu-attention"}


def test_subtask_times_are_reported_when_profiling(tiny_path):
    path = tiny_path("gqa")
    llm = LLM(str(path), dtype="float32", device="cpu", block_size=8, max_model_len=192, policy="hybrid",
              num_gpu_blocks=24, num_cpu_blocks=64, policy_options={"cpu_placement": "cpu"},
              profile_subtasks=True)
    engine = llm.llm_engine
    engine.add_request("a", {"prompt_token_ids": [5, 6, 7, 8]}, SamplingParams(max_tokens=3, temperature=0))
    engine.step()  # prefill
    engine.step()  # a CPU decode
    seconds = engine.last_subtask_seconds
    assert {"linear", "gpu_attention", "cpu_attention", "cpu_wait", "iteration"} <= set(seconds)
    assert all(value >= 0 for value in seconds.values())
    engine.close()


def test_worker_overlaps_a_slow_device_step_with_real_cpu_attention():
    """A real CPU attention job on the worker overlaps a deliberately slow fake device step
    (a sleep, like a GPU kernel the host only waits for): wall time < the sum of the two."""
    torch.manual_seed(0)
    num_seqs, heads, kv_heads, head_dim, block_size, context = 8, 32, 8, 128, 16, 2048
    blocks_per_seq = context // block_size
    key_cache = torch.randn(num_seqs * blocks_per_seq, block_size, kv_heads, head_dim)
    value_cache = torch.randn_like(key_cache)
    tables = torch.randperm(num_seqs * blocks_per_seq, dtype=torch.int32).view(num_seqs, blocks_per_seq)
    lens = torch.full((num_seqs,), context, dtype=torch.int32)
    query = torch.randn(num_seqs, heads, head_dim)
    worker = CpuAttentionWorker()
    try:
        def attention():
            for _ in range(5):
                cpu_attention.paged_decode_attention(query, key_cache, value_cache, tables, lens)

        worker.submit(attention).wait()  # warm-up (and the kernel build, if not cached)
        started = time.perf_counter()
        cpu_seconds = worker.submit(attention).wait() or (time.perf_counter() - started)
        device_seconds = max(cpu_seconds, 0.05)
        started = time.perf_counter()
        job = worker.submit(attention)
        time.sleep(device_seconds)  # the main thread "waits for the GPU"
        job.wait()
        overlapped = time.perf_counter() - started
    finally:
        worker.close()
    assert overlapped < 0.8 * (cpu_seconds + device_seconds), (overlapped, cpu_seconds, device_seconds)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["async_overlap", "asymmetric_pipeline"])
def test_copy_stream_path_on_cuda(mode, tiny_path, hf_greedy):
    path = tiny_path("gqa")
    prompts = prompts_for(path, LENGTHS, seed=3)
    llm = LLM(str(path), dtype="float32", device="cuda", block_size=8, max_model_len=192, policy="hybrid",
              num_gpu_blocks=30, num_cpu_blocks=120, policy_options={"hybrid_mode": mode})
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True), use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outputs] == hf_greedy(path, prompts, MAX_NEW)
    assert llm.llm_engine.stats.cpu_decode_tokens > 0
