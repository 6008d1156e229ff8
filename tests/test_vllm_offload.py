"""vllm_offload: the GPU-only baseline whose preempted requests keep their KV in the CPU tier."""

from __future__ import annotations

import random

from test_scheduler import FakeRunner, request, run_to_completion

from apexlib import LLM, SamplingParams
from apexlib.core.config import CacheConfig, ModelConfig, SchedulerConfig
from apexlib.core.plan import Tier
from apexlib.costs import datasheet_roofline
from apexlib.engine.scheduler import Scheduler
from apexlib.policies import build_policy
from apexlib.policies.registry import policy_spec
from apexlib.sim.simulator import simulate
from apexlib.workloads import input_output_grid


def _scheduler(num_cpu_blocks: int = 8) -> Scheduler:
    return Scheduler(SchedulerConfig(max_model_len=16, max_num_seqs=8, max_num_batched_tokens=64),
                     CacheConfig(block_size=4, num_gpu_blocks=4, num_cpu_blocks=num_cpu_blocks, kv_dtype="float32"),
                     build_policy("vllm_offload"))


def test_registry_label_and_no_cost_model():
    spec = policy_spec("vllm_offload")
    assert spec.label == "vLLM + CPU KV offload" and not spec.needs_cost_model


def test_a_preempted_request_moves_to_the_cpu_tier_waits_and_comes_back_without_recompute():
    # The scenario of test_scheduler's recompute test: 4 GPU blocks of 4 tokens, three 4-token prompts;
    # the decodes need a second block each, so the newest (c) must leave. Here its KV goes to the CPU
    # tier (one block), it does not decode there, and it comes back over PCIe: no prefill is re-run.
    scheduler = _scheduler()
    for name in "abc":
        scheduler.add_request(request(name, 4, max_tokens=6))
    plan = scheduler.schedule(0.0)
    scheduler.update_from_output(plan, FakeRunner().execute(plan), 0.0)
    plan = scheduler.schedule(0.0)
    assert [s.request_id for s in plan.gpu_decodes] == ["a", "b"] and not plan.cpu_decodes
    assert len(plan.swap_out) == 1 and scheduler.stats.preemptions == 0
    assert scheduler.kv.tier_of("c") is Tier.CPU and scheduler.requests["c"].num_computed_tokens == 4
    scheduler.update_from_output(plan, FakeRunner().execute(plan), 0.0)
    scheduler.add_request(request("d", 4, max_tokens=2))  # not admitted before c is back
    plans = run_to_completion(scheduler, FakeRunner())
    assert all(not p.cpu_decodes for p in plans)
    assert not any(s.request_id == "c" for p in plans for s in p.prefills)  # c was never recomputed
    back = next(i for i, p in enumerate(plans) if p.swap_in)
    first_d = next(i for i, p in enumerate(plans) if any(s.request_id == "d" for s in p.sequences))
    assert back <= first_d
    assert scheduler.stats.preemptions == 0 and scheduler.stats.prefill_tokens == 4 * 4  # prompts only
    assert scheduler.kv.num_free_blocks(Tier.GPU) == 4 and scheduler.kv.num_free_blocks(Tier.CPU) == 8


def test_simulated_offload_replaces_recompute_by_copies():
    workload = input_output_grid([128], [512], num_requests=24, seed=0)[0]
    cost = datasheet_roofline("t4", "llama-2-7b")
    engine = dict(model="llama-2-7b", cpu_kv_gib=8.0, dtype="float16", max_model_len=workload.max_total_len)
    gpu_only = simulate(workload, cost_model=cost, policy="gpu_only", **engine)
    offload = simulate(workload, cost_model=cost, policy="vllm_offload", **engine)
    assert gpu_only.extra["stats"]["preemptions"] > 0
    assert offload.extra["stats"]["preemptions"] == 0 and offload.extra["stats"]["cpu_decode_tokens"] == 0
    iterations = offload.iterations.to_dataframe()
    assert iterations["num_swap_out_blocks"].sum() > 0 and iterations["num_swap_in_blocks"].sum() > 0
    assert set(iterations["mode"]) == {"none"}
    assert offload.summary.output_throughput > gpu_only.summary.output_throughput


def test_real_engine_keeps_greedy_parity(tiny_path, hf_greedy):
    path = tiny_path("gqa")
    vocab = ModelConfig.from_pretrained(path).vocab_size
    rng = random.Random(4)
    prompts = [[rng.randrange(4, vocab) for _ in range(n)] for n in [40, 60, 33, 70, 9, 50, 45, 66, 20, 58]]
    llm = LLM(str(path), dtype="float32", device="cpu", block_size=8, max_model_len=192, policy="vllm_offload",
              num_gpu_blocks=30, num_cpu_blocks=120)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True), use_tqdm=False)
    llm.llm_engine.close()
    assert [list(o.outputs[0].token_ids) for o in outputs] == hf_greedy(path, prompts, 32)
    stats = llm.llm_engine.stats
    assert stats.swapped_out_blocks > 0 and stats.swapped_in_blocks > 0
    assert stats.cpu_decode_tokens == 0 and stats.preemptions == 0
