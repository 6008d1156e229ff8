"""The profiling-informed policies' decisions on constructed states, with hand-made cost models.

A linear-cost fake model makes each expectation derivable by hand (numbers in the docstrings),
then every profiled policy runs end to end with greedy parity under a squeezed KV budget.
"""

from __future__ import annotations

import random

import pytest

from apexlib import LLM, SamplingParams
from apexlib.core.config import ModelConfig
from apexlib.core.plan import OverlapMode, ScheduledSequence, Tier
from apexlib.costs import CostModel
from apexlib.policies.base import IterationCandidate
from apexlib.policies.profiled import ApexPolicy, NeoPolicy

MS = 1e-3


class LinearCosts(CostModel):
    """linear(n) = fixed + per_token*n; attention proportional to KV tokens; no transfers/overheads."""

    num_layers = 32
    pre_attention_fraction = 0.5

    def __init__(self, fixed, per_token, gpu_per_kv, cpu_per_kv):
        self.fixed, self.per_token, self.gpu_per_kv, self.cpu_per_kv = fixed, per_token, gpu_per_kv, cpu_per_kv

    def linear(self, num_tokens, num_sampled=None):
        return self.fixed + self.per_token * num_tokens if num_tokens > 0 else 0.0

    def gpu_prefill_attention(self, prompt_lengths):
        return 0.0

    def gpu_decode_attention(self, num_kv_tokens, batch):
        return self.gpu_per_kv * num_kv_tokens

    def cpu_decode_attention(self, num_kv_tokens, batch):
        return self.cpu_per_kv * num_kv_tokens

    def transfer(self, num_bytes, direction):
        return 0.0

    def launch_overhead(self):
        return 0.0


def decodes(prefix, contexts, tier):
    return tuple(ScheduledSequence(request_id=f"{prefix}{i}", token_ids=(5,), start_position=c - 1,
                                   block_table=(0,), tier=tier, sample=True,
                                   sampling_params=SamplingParams(temperature=0), num_output_tokens=1)
                 for i, c in enumerate(contexts))


def candidate(gpu_contexts, cpu_contexts):
    return IterationCandidate(prefills=(), gpu_decodes=decodes("g", gpu_contexts, Tier.GPU),
                              cpu_decodes=decodes("c", cpu_contexts, Tier.CPU))


# A bandwidth-bound GPU: a 10 ms weight pass whatever the batch, attention 1 us per KV token on the
# GPU, 2 us on the CPU. 8 GPU decodes of 1000 tokens (G = 8 ms); CPU decodes of 100 tokens (0.2 ms each).
BANDWIDTH_BOUND = LinearCosts(fixed=10 * MS, per_token=0.01 * MS, gpu_per_kv=1e-6, cpu_per_kv=2e-6)


def test_apex_overlaps_when_cpu_attention_fits_under_gpu_attention():
    """GPU-only: 8 tok / (10.08 + 8) ms = 442/s. Overlap with all 4 CPU decodes (0.8 ms < 8 ms):
    12 / (10.12 + 8) ms = 662/s. A pipeline pays a second weight pass: 12 / ~28 ms. -> async, all 4."""
    decision = ApexPolicy(BANDWIDTH_BOUND).decide(candidate([1000] * 8, [100] * 4))
    assert decision.mode is OverlapMode.ASYNC_OVERLAP
    assert len(decision.cpu_decodes) == 4
    assert decision.predicted.total == pytest.approx(18.12 * MS, rel=1e-6)


def test_neo_does_not_pipeline_a_bandwidth_bound_gpu():
    """Same state: NEO only knows pipelining, whose second weight pass loses to GPU-only (442/s)."""
    decision = NeoPolicy(BANDWIDTH_BOUND).decide(candidate([1000] * 8, [100] * 4))
    assert decision.mode is OverlapMode.NONE and decision.cpu_decodes == ()


def test_apex_stays_gpu_only_when_the_cpu_is_too_slow():
    """CPU decodes of 20000 tokens cost 40 ms each: overlap with one gives 9 / 50.09 ms = 180/s < 442/s,
    and NEO's slack rule admits none (40 ms exceeds the 18 ms of device work it could hide under)."""
    decision = ApexPolicy(BANDWIDTH_BOUND).decide(candidate([1000] * 8, [20000] * 3))
    assert decision.mode is OverlapMode.NONE and decision.cpu_decodes == ()


def test_apex_overlap_set_grows_by_increasing_context_and_stops_when_rate_falls():
    """Contexts 100, 100, 3000, 20000: the two short ones hide under G = 8 ms; adding the 3000-token one
    makes the CPU side 6.4 ms (still hidden: 13 tok / 18.13 ms rises); the 20000-token one would cost
    46.4 ms and lower the rate, so it waits."""
    decision = ApexPolicy(BANDWIDTH_BOUND).decide(candidate([1000] * 8, [20000, 100, 3000, 100]))
    assert decision.mode is OverlapMode.ASYNC_OVERLAP
    assert [s.context_len for s in decision.cpu_decodes] == [100, 100, 3000]


def test_apex_respects_an_iteration_time_bound():
    """With a 18.11 ms bound only 3 of the 4 cheap CPU decodes fit (18.12 ms with all 4)."""
    decision = ApexPolicy(BANDWIDTH_BOUND, iteration_time_bound=18.115 * MS).decide(
        candidate([1000] * 8, [100] * 4))
    assert decision.mode is OverlapMode.ASYNC_OVERLAP and len(decision.cpu_decodes) == 3


# A compute-bound (or cheap-to-split) device: linear cost proportional to tokens, so a second pass over
# a sub-batch costs little; CPU attention is large next to GPU attention.
SPLIT_CHEAP = LinearCosts(fixed=1 * MS, per_token=0.5 * MS, gpu_per_kv=1e-6, cpu_per_kv=2e-6)


def test_apex_pipelines_when_linear_work_hides_cpu_attention_and_splitting_is_cheap():
    """30 GPU decodes (G = 9 ms), 20 CPU decodes of 1000 tokens (2 ms each). Overlap peaks at 4 CPU
    decodes: 34 / (18 + 9) ms = 1.26 tok/ms. Pipelining hides ~16 CPU decodes (32 ms) under the two
    sub-batches' linear work (about 34 ms per iteration): ~46 / 35 ms = 1.3 tok/ms: the pipeline wins."""
    state = candidate([300] * 30, [1000] * 20)
    apex = ApexPolicy(SPLIT_CHEAP).decide(state)
    neo = NeoPolicy(SPLIT_CHEAP).decide(state)
    assert apex.mode is OverlapMode.ASYMMETRIC_PIPELINE
    assert neo.mode is OverlapMode.ASYMMETRIC_PIPELINE
    assert len(apex.cpu_decodes) > 4
    rate = (30 + len(apex.cpu_decodes)) / apex.predicted.total
    overlap_only = ApexPolicy(SPLIT_CHEAP, enable_pipeline=False).decide(state)
    assert overlap_only.mode is OverlapMode.ASYNC_OVERLAP and len(overlap_only.cpu_decodes) == 4
    assert rate > (30 + 4) / overlap_only.predicted.total


@pytest.mark.parametrize("policy", ["neo", "neo_published", "apex"])
@pytest.mark.parametrize("cost_model", ["zero", None])
def test_profiled_policies_keep_greedy_parity_with_a_squeezed_budget(policy, cost_model, tiny_path, hf_greedy):
    path = tiny_path("gqa")
    vocab = ModelConfig.from_pretrained(path).vocab_size
    rng = random.Random(4)
    prompts = [[rng.randrange(4, vocab) for _ in range(n)] for n in [40, 60, 33, 70, 9, 50, 45, 66, 20, 58]]
    llm = LLM(str(path), dtype="float32", device="cpu", block_size=8, max_model_len=192, policy=policy,
              num_gpu_blocks=30, num_cpu_blocks=120, cost_model=cost_model)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True), use_tqdm=False)
    llm.llm_engine.close()
    assert [list(o.outputs[0].token_ids) for o in outputs] == hf_greedy(path, prompts, 32)
    stats = llm.llm_engine.stats
    assert stats.swapped_out_blocks > 0
    if cost_model == "zero":  # free CPU attention: every CPU-resident decode runs
        assert stats.cpu_decode_tokens > 0


def test_policy_options_are_validated_once_with_the_field_and_the_limit():
    from apexlib.engine.args import EngineArgs
    from apexlib.policies import ApexOptions, HybridOptions, NoOptions, policy_options

    assert policy_options("gpu_only") == NoOptions()
    assert policy_options("hybrid", {"hybrid_mode": "asymmetric_pipeline"}) == HybridOptions("asymmetric_pipeline")
    assert policy_options("apex", ApexOptions(max_stall_iterations=4)).max_stall_iterations == 4
    with pytest.raises(ValueError, match=r"policy 'neo' has no option\(s\) \['hybrid_mode'\]; its options: none"):
        policy_options("neo", {"hybrid_mode": "async_overlap"})
    with pytest.raises(ValueError, match=r"policy 'apex' has no option\(s\) \['bound'\]; its options: "
                                         r"\['iteration_time_bound', 'enable_pipeline', 'max_stall_iterations'\]"):
        policy_options("apex", {"bound": 1.0})
    with pytest.raises(ValueError, match="iteration_time_bound must be a finite number of seconds > 0"):
        policy_options("apex", {"iteration_time_bound": -1})
    with pytest.raises(ValueError, match="cpu_placement must be one of"):
        policy_options("hybrid", {"cpu_placement": "gpu"})
    with pytest.raises(TypeError, match="policy 'hybrid' takes HybridOptions, got ApexOptions"):
        policy_options("hybrid", ApexOptions())
    with pytest.raises(ValueError, match="policy must be one of"):
        policy_options("fastest")
    # EngineArgs validates them where they are written and keeps the options dataclass
    args = EngineArgs(model="demo", policy="apex", policy_options={"max_stall_iterations": 8})
    assert args.policy_options == ApexOptions(max_stall_iterations=8)
    with pytest.raises(ValueError, match="has no option"):
        EngineArgs(model="demo", policy="gpu_only", policy_options={"enable_pipeline": False})


def test_build_policy_passes_the_options_and_needs_a_cost_model_where_it_predicts():
    from apexlib.core.plan import OverlapMode
    from apexlib.policies import build_policy

    hybrid = build_policy("hybrid", {"hybrid_mode": "asymmetric_pipeline", "cpu_placement": "cpu"})
    assert hybrid.mode is OverlapMode.ASYMMETRIC_PIPELINE and hybrid.placement == "cpu"
    apex = build_policy("apex", {"enable_pipeline": False, "max_stall_iterations": 5}, BANDWIDTH_BOUND, 1000, 0.6)
    assert (apex.enable_pipeline, apex.max_stall_iterations, apex.transfer_bytes_per_cpu_token) == (False, 5, 1000)
    with pytest.raises(ValueError, match="policy 'neo' needs a cost model"):
        build_policy("neo")


def test_the_registry_owns_whether_a_policy_keeps_kv_on_the_cpu_tier():
    """The engine's default CPU tier and the configuration's CPU-tier check follow the registry's facts."""
    from apexlib.core.config import ModelConfig
    from apexlib.engine.args import EngineArgs
    from apexlib.plots import policy_label
    from apexlib.policies.registry import POLICIES

    assert not POLICIES["gpu_only"].uses_cpu_tier
    assert POLICIES["vllm_offload"].uses_cpu_tier and not POLICIES["vllm_offload"].cpu_attention
    assert all(POLICIES[name].cpu_attention for name in ("hybrid", "neo", "neo_published", "apex"))
    config = ModelConfig.from_pretrained(tiny_checkpoint_path())
    for name, spec in POLICIES.items():
        engine = EngineArgs(model="demo", policy=name, device="cpu", max_model_len=128,
                            cost_model="zero" if spec.needs_cost_model else None).create_engine_config(
            config, "cpu", "float32", None)
        assert engine.scheduler.uses_cpu_tier == spec.uses_cpu_tier
        assert (engine.cache.num_cpu_blocks > 0) == spec.uses_cpu_tier, name
        assert policy_label(name) == spec.label


def tiny_checkpoint_path():
    from apexlib.model.catalog import resolve_checkpoint

    return resolve_checkpoint("demo")
