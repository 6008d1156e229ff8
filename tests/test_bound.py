"""The throughput bound (apexlib.sim.bound): hand-derived values, and no simulated run above it."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from apexlib.core.config import CacheConfig, EngineConfig, SchedulerConfig
from apexlib.core.models import resolve_model_config
from apexlib.costs import CostModel, datasheet_roofline
from apexlib.costs.assumptions import scenario_cost_model
from apexlib.policies.registry import POLICY_NAMES
from apexlib.sim.bound import bound_inputs, simulated_bound, throughput_bound
from apexlib.sim.simulator import simulate
from apexlib.workloads import Workload, WorkloadRequest


class _RoundNumbers(CostModel):
    """One second per weight pass whatever the tokens, free device attention and LM head, CPU attention
    1/330 s per KV token, free copies and launches: every term of the bound is easy to derive by hand."""

    hardware = "hand"
    source = "test"
    num_layers = 1
    inline_launch_seconds = 0.0

    def linear(self, num_tokens: int, num_sampled: int | None = None) -> float:
        return 1.0 if num_tokens > 0 else 0.0

    def gpu_prefill_attention(self, prompt_lengths: Sequence[int]) -> float:
        return 0.0

    def gpu_decode_attention(self, num_kv_tokens: int, batch: int) -> float:
        return 0.0

    def cpu_decode_attention(self, num_kv_tokens: int, batch: int) -> float:
        return num_kv_tokens / 330.0 if batch > 0 else 0.0

    def transfer(self, num_bytes: int, direction: str) -> float:
        return 0.0

    def launch_overhead(self) -> float:
        return 0.0


def _workload(count: int, prompt: int, output: int) -> Workload:
    return Workload(name="hand", seed=None, requests=tuple(
        WorkloadRequest(request_id=str(i), prompt_len=prompt, output_len=output, arrival_time=0.0)
        for i in range(count)))


def _config(gpu_tokens: int, cpu_tokens: int) -> EngineConfig:
    model = resolve_model_config("tiny-demo")
    return EngineConfig(model=model, cache=CacheConfig(block_size=1, num_gpu_blocks=gpu_tokens,
                                                       num_cpu_blocks=cpu_tokens, kv_dtype="float32"),
                        scheduler=SchedulerConfig(max_model_len=64, max_num_seqs=256, max_num_batched_tokens=2048,
                                                  enable_chunked_prefill=True,
                                                  policy="apex" if cpu_tokens else "gpu_only"),
                        dtype="float32", device="cuda")


def test_bound_gpu_only_hand_derived():
    # 20 requests, prompt 10, output 11: 200 decode steps reading sum_j (10 + j), j = 1..10, = 155 KV
    # tokens each request (3,100 in all), 200 prompt tokens, 220 output tokens. Without a CPU tier every
    # iteration costs 1 s and holds at most 165 tokens of KV (decode contexts and prefill chunks), so
    # at least (3,100 + 200) / 165 = 20 iterations: 220 tokens / 20 s = 11 tok/s.
    inputs = bound_inputs(_workload(20, 10, 11), _config(165, 0))
    assert (inputs.decode_steps, inputs.decode_kv_tokens, inputs.prompt_tokens, inputs.output_tokens) == \
        (200, 3100, 200, 220)
    result = throughput_bound(inputs, _RoundNumbers())
    assert result.output_throughput == pytest.approx(11.0, rel=1e-6)
    assert set(result.schedule) <= {"none", "prefill_only"}


def test_bound_with_cpu_tier_hand_derived():
    # 100 such requests (15,500 KV tokens to read) and a large CPU tier. Per second of iteration time:
    # GPU-only reads 165 KV tokens; async overlap (1 + Kc/330 s) reads (165 + Kc) / (1 + Kc/330) < 330;
    # the pipeline takes max(2 weight passes, all CPU work, each sub-batch's chain 1 + Kc_X/330) = 2 s
    # with Kc_A = Kc_B = 330 and reads 165 + 660 tokens: 412.5 per second, the best. Every decode count
    # and token limit is slack, so the least time is 15,500 / 825 * 2 s and the bound 1,100 tok / that.
    # Schedules that recompute are left out here: with free FLOPs (this model's weight pass costs 1 s
    # whatever the tokens) recomputing every context costs nothing, and the bound over them is higher.
    inputs = bound_inputs(_workload(100, 10, 11), _config(165, 100_000))
    result = throughput_bound(inputs, _RoundNumbers(), allow_recompute=False)
    assert result.output_throughput == pytest.approx(1100 / (15_500 / 825 * 2), rel=1e-6)
    assert set(result.schedule) == {"asymmetric_pipeline"}
    assert result.schedule["asymmetric_pipeline"]["cpu_kv_tokens"] == pytest.approx(660, rel=1e-6)
    assert result.recomputed_decodes == 0
    assert throughput_bound(inputs, _RoundNumbers()).output_throughput > result.output_throughput


def test_bound_no_cpu_tier_no_cpu_iterations():
    result = throughput_bound(bound_inputs(_workload(4, 10, 11), _config(165, 0)), _RoundNumbers())
    assert "async_overlap" not in result.schedule and "asymmetric_pipeline" not in result.schedule


def _mixed_workload() -> Workload:
    shapes = [(96, 160), (128, 96), (64, 200), (112, 128), (80, 180), (128, 64)] * 3
    return Workload(name="bound-check", seed=None, requests=tuple(
        WorkloadRequest(request_id=str(i), prompt_len=p, output_len=o, arrival_time=0.0)
        for i, (p, o) in enumerate(shapes)))


@pytest.mark.parametrize("hardware", ["t4", "a10g-16vcpu"])
@pytest.mark.parametrize("scenario", ["central", "offload-adverse", "offload-friendly"])
def test_no_simulated_policy_exceeds_the_bound(hardware, scenario):
    """A policy above the bound would mean the bound is wrong. A GPU tier of 0.15 GiB (about 300 tokens of
    Llama-2-7B) forces preemptions, swaps and CPU decodes in every policy that has them."""
    workload = _mixed_workload()
    cost = scenario_cost_model(datasheet_roofline(hardware, "llama-2-7b"), scenario)
    engine = dict(model="llama-2-7b", gpu_kv_gib=0.15, cpu_kv_gib=2.0, dtype="float16",
                  max_model_len=workload.max_total_len)
    bound = simulated_bound(workload, cost_model=cost, policy="apex", **engine).output_throughput
    variants = [(name, {}) for name in POLICY_NAMES] + [
        ("hybrid", {"hybrid_mode": "asymmetric_pipeline"}), ("apex", {"enable_pipeline": False})]
    for policy, options in variants:
        result = simulate(workload, cost_model=cost, policy=policy, policy_options=options or None,
                          record_iterations=False, **engine)
        assert result.summary.output_throughput <= bound * (1 + 1e-9), (policy, options)
