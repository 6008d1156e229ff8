"""APEX's decision rule against NEO's plans, NEO's published runtime, and the progress bound.

Hand-derived numbers use the linear-cost fake model of test_policies (every expectation in a docstring).
"""

from __future__ import annotations

import pytest
from test_policies import MS, SPLIT_CHEAP, LinearCosts, candidate

from apexlib.core.models import model_config_for_shape
from apexlib.core.plan import CpuRuntime, OverlapMode
from apexlib.costs import (
    IterationShape,
    ModelShape,
    datasheet_profile_path,
    inline_pipeline_forward_seconds,
    load_cost_model,
    predict_iteration,
)
from apexlib.policies.base import IterationCandidate
from apexlib.policies.profiled import ApexPolicy, NeoPolicy, NeoPublishedPolicy
from apexlib.sim.simulator import simulate
from apexlib.workloads import get_preset


def test_inline_pipeline_is_gpu_bound_when_the_cpu_work_fits():
    """One layer; A's linear 10, B's linear 10, B's CPU job 5 after a launch of 1: the thread finishes at
    6 while the device runs stage 0 to 10 and stage 1 to 20: the forward takes Lin(A) + Lin(B) = 20."""
    assert inline_pipeline_forward_seconds(1, 10.0, 10.0, 0.0, 0.0, 5.0, 1.0) == pytest.approx(20.0)


def test_inline_pipeline_serialises_launch_and_cpu_work_when_cpu_bound():
    """Two layers, linear 1 per sub-batch, CPU jobs 5 each, launch 1: each of the 4 stages is launch +
    CPU job on the one thread (the device idles): 4 x 6 = 24. The two-thread runtime's schedule hides
    the launches: it is faster on the same numbers."""
    inline = inline_pipeline_forward_seconds(2, 1.0, 1.0, 0.0, 5.0, 5.0, 1.0)
    assert inline == pytest.approx(24.0)


def test_inline_runtime_costs_more_than_the_worker_runtime_for_the_same_plan():
    """Same CPU-bound pipeline shape; INLINE pays NEO's 0.8 ms launch per stage and layer (32 layers,
    2 stages: >= 51.2 ms more than the per-stage CPU work alone)."""
    shape = IterationShape(mode=OverlapMode.ASYMMETRIC_PIPELINE, gpu_decode_kv_tokens=8000, num_gpu_decodes=8,
                           cpu_decode_kv_tokens=40000, num_cpu_decodes=20, pipeline_split=(20000, 10))
    worker = predict_iteration(SPLIT_CHEAP, shape)
    inline = predict_iteration(SPLIT_CHEAP, IterationShape(**{**shape.__dict__, "cpu_runtime": CpuRuntime.INLINE}))
    assert inline.total > worker.total
    assert inline.total >= 80 * MS + 2 * 32 * 0.8 * MS - 1e-9  # CPU work 80 ms + launches


def test_neo_published_follows_the_slack_rule_with_its_launch_cost():
    """8 GPU decodes of 1000 tokens, linear 1 + 0.5/token ms (SPLIT_CHEAP): sub-batch 0 has width 8
    (5 ms linear), G = 8 ms. CPU decodes of 1000 tokens cost 2 ms each; NEO's launch adds 32 x 0.8 =
    25.6 ms to every sub-batch's CPU time, so no CPU decode fits the slack (remains[1] = 5 - 2 - 25.6 < 0)
    and NEO's published scheduler runs GPU-only. With a zero launch cost it pipelines."""
    state = candidate([1000] * 8, [1000] * 6)
    decision = NeoPublishedPolicy(SPLIT_CHEAP).decide(state)
    assert decision.mode is OverlapMode.NONE and decision.cpu_decodes == ()
    cheap_launch = LinearCosts(fixed=1 * MS, per_token=0.5 * MS, gpu_per_kv=1e-6, cpu_per_kv=2e-6)
    cheap_launch.inline_launch_seconds = 0.0
    decision = NeoPublishedPolicy(cheap_launch).decide(state)
    assert decision.mode is OverlapMode.ASYMMETRIC_PIPELINE and decision.cpu_runtime is CpuRuntime.INLINE
    assert decision.cpu_decodes and decision.predicted.total > 0


def test_apex_keeps_every_request_neo_would_advance():
    """30 GPU decodes, 20 CPU decodes of 1000 tokens (SPLIT_CHEAP): NEO pipelines a set A of them.
    APEX's plan advances every request of A (whatever mode it picks) at a rate >= NEO's."""
    state = candidate([300] * 30, [1000] * 20)
    neo = NeoPolicy(SPLIT_CHEAP).decide(state)
    apex = ApexPolicy(SPLIT_CHEAP).decide(state)
    assert {s.request_id for s in neo.cpu_decodes} <= {s.request_id for s in apex.cpu_decodes}
    neo_rate = (30 + len(neo.cpu_decodes)) / neo.predicted.total
    assert (30 + len(apex.cpu_decodes)) / apex.predicted.total >= neo_rate * (1 - 1e-9)


def test_apex_overlap_takes_only_free_riders_beyond_neo():
    """Bandwidth-bound GPU (10 ms weight pass), 8 GPU decodes of 1000 tokens: G = 8 ms. CPU decodes of
    100, 100, 100 and 6000 tokens (0.2 ms each, 12 ms). NEO: all four fit its slack, but the pipeline
    (12 tokens / ~28.1 ms = 427/s) loses to GPU-only (8 / 18.08 ms = 442/s): GPU-only. APEX overlaps the
    three short ones (0.6 ms, hidden under G: 11 / 18.11 ms = 607/s); the long one (12.6 ms) would
    lengthen the iteration past G, so it is no free rider."""
    bandwidth_bound = LinearCosts(fixed=10 * MS, per_token=0.01 * MS, gpu_per_kv=1e-6, cpu_per_kv=2e-6)
    state = candidate([1000] * 8, [100, 6000, 100, 100])
    assert NeoPolicy(bandwidth_bound).decide(state).mode is OverlapMode.NONE
    apex = ApexPolicy(bandwidth_bound).decide(state)
    assert apex.mode is OverlapMode.ASYNC_OVERLAP
    assert sorted(s.context_len for s in apex.cpu_decodes) == [100, 100, 100]
    assert apex.predicted.total == pytest.approx(18.11 * MS, rel=1e-6)


def test_apex_forces_an_overdue_request_in():
    """Same state, but the 20000-token CPU decode (40 ms, never a free rider) has waited the bound: APEX
    must advance it this iteration, whatever the rate."""
    bandwidth_bound = LinearCosts(fixed=10 * MS, per_token=0.01 * MS, gpu_per_kv=1e-6, cpu_per_kv=2e-6)
    state = candidate([1000] * 8, [1000, 1000, 20000])
    policy = ApexPolicy(bandwidth_bound, max_stall_iterations=3)
    assert "c2" not in {s.request_id for s in policy.decide(state).cpu_decodes}
    overdue = IterationCandidate(prefills=(), gpu_decodes=state.gpu_decodes, cpu_decodes=state.cpu_decodes,
                                 cpu_stalls=(0, 0, 3))
    assert "c2" in {s.request_id for s in policy.decide(overdue).cpu_decodes}


@pytest.mark.parametrize("bad", [-1, 1.5, True, "8"])
def test_max_stall_iterations_is_validated(bad):
    with pytest.raises(ValueError, match="max_stall_iterations"):
        ApexPolicy(SPLIT_CHEAP, max_stall_iterations=bad)


@pytest.fixture(scope="module")
def t4_llama2():
    return load_cost_model(datasheet_profile_path("t4", "data/profiles"),
                           ModelShape.from_config(model_config_for_shape("llama-2-7b")), "float16")


def test_progress_bound_holds_in_a_cpu_bound_run(t4_llama2, monkeypatch):
    """A CPU-bound T4 run (many CPU-resident decodes, NEO's slack admits few): no CPU decode offered to
    APEX ever waits more than ``max_stall_iterations + k - 1`` iterations (k: CPU decodes offered), the
    longest-waiting overdue request advances every iteration, and every request finishes."""
    seen = []  # (longest wait, CPU decodes offered, the longest-waiting one advanced?)
    original = ApexPolicy.decide

    def recording(self, candidate):
        decision = original(self, candidate)
        if candidate.cpu_decodes:
            longest = max(range(len(candidate.cpu_decodes)), key=candidate.stalls_of)
            advanced = candidate.cpu_decodes[longest].request_id in {s.request_id for s in decision.cpu_decodes}
            seen.append((candidate.stalls_of(longest), len(candidate.cpu_decodes), advanced))
        return decision

    monkeypatch.setattr(ApexPolicy, "decide", recording)
    workload = get_preset("grid-point", prompt_len=128, output_len=256, num_requests=48, seed=0)
    result = simulate(workload, model="llama-2-7b", policy="apex", cost_model=t4_llama2, cpu_kv_gib=4.0,
                      policy_options={"max_stall_iterations": 4}, max_model_len=workload.max_total_len, record_iterations=False)
    assert result.summary.completed == 48
    most_offered = max(k for _, k, _ in seen)
    assert max(wait for wait, _, _ in seen) <= 4 + most_offered - 1
    assert max(wait for wait, _, _ in seen) >= 4  # requests did become overdue
    assert all(advanced for wait, _, advanced in seen if wait >= 4)


def test_apex_is_not_beaten_by_its_baselines_on_a_small_t4_point(t4_llama2):
    """The design claim on a small simulated point: APEX >= 0.98 x the best of GPU-only and both NEOs."""
    workload = get_preset("grid-point", prompt_len=128, output_len=512, num_requests=48, seed=0)
    rates = {policy: simulate(workload, model="llama-2-7b", policy=policy, cost_model=t4_llama2, cpu_kv_gib=8.0,
                              max_model_len=workload.max_total_len, record_iterations=False).summary.output_throughput
             for policy in ("gpu_only", "neo", "neo_published", "apex")}
    assert rates["apex"] >= 0.98 * max(rate for policy, rate in rates.items() if policy != "apex"), rates


@pytest.mark.parametrize("context, mode, hidden", [(1000, OverlapMode.ASYNC_OVERLAP, 4),
                                                   (2000, OverlapMode.ASYMMETRIC_PIPELINE, 2)])
def test_apex_mode_flips_where_the_composition_says(context, mode, hidden):
    """Bandwidth-bound GPU: Lin = 10 ms per weight pass, 8 GPU decodes of 1000 tokens (G = 8 ms), 6 CPU
    decodes. NEO pipelines all 6 in both cases (14 tokens / ~28 ms beats GPU-only's 8 / 18 ms). With the
    same set, overlap costs Lin + max(G, C) and the pipeline about Lin(A) + G + Lin(B) = 28 ms, so overlap
    wins while C < G + Lin(B) = 18 ms: at 1000 tokens C = 12 ms (overlap: 22.1 ms), at 2000 tokens
    C = 24 ms (overlap: 34.1 ms, the pipeline wins). Neither runs: the hidden overlap (the CPU decodes
    whose job hides under G = 8 ms: 4 of 2 ms, or 2 of 4 ms) beats both, 12 / 18.12 ms = 662/s against
    14 / 22.1 ms = 633/s, and 10 / 18.1 ms = 552/s against 14 / ~28 ms = 500/s."""
    bandwidth_bound = LinearCosts(fixed=10 * MS, per_token=0.01 * MS, gpu_per_kv=1e-6, cpu_per_kv=2e-6)
    state = candidate([1000] * 8, [context] * 6)
    neo_rate, neo = NeoPolicy(bandwidth_bound)._neo_plan(state)
    assert neo.mode is OverlapMode.ASYMMETRIC_PIPELINE and len(neo.cpu_decodes) == 6
    policy = ApexPolicy(bandwidth_bound)
    same_set_rate, same_set = policy._async_overlap(state, list(neo.cpu_decodes))
    assert (same_set_rate > neo_rate) is (mode is OverlapMode.ASYNC_OVERLAP)
    if mode is OverlapMode.ASYNC_OVERLAP:
        assert same_set.predicted.total == pytest.approx((10.14 + 12) * MS, rel=1e-6)
    apex = policy.decide(state)
    assert apex.mode is OverlapMode.ASYNC_OVERLAP and len(apex.cpu_decodes) == hidden
    assert (8 + hidden) / apex.predicted.total > max(neo_rate, same_set_rate)


# A device whose decode attention is long beside its weight pass and a host 5x slower per KV token:
# a 10 ms weight pass (+0.01 ms per token), GPU attention 1 us and CPU attention 5 us per KV token.
SLOW_HOST = LinearCosts(fixed=10 * MS, per_token=0.01 * MS, gpu_per_kv=1e-6, cpu_per_kv=5e-6)


def test_apex_runs_the_hidden_overlap_when_it_beats_neos_pipeline():
    """8 GPU decodes of 1000 tokens (G = 8 ms), 6 CPU decodes of 1000 tokens (5 ms each). GPU-only:
    8 / 18.08 ms = 442/s. NEO's slack rule puts 3 in sub-batch B (15 ms under A's 18.08 ms of device work)
    and 2 in A (10 ms under B's 10.03 ms linear): 13 tokens in about 28 ms (two weight passes), ~460/s,
    so NEO pipelines, and the old rule, which required NEO's 5 CPU decodes, followed it (overlap with 5:
    13 / 35.1 ms). The hidden overlap runs the one CPU decode whose 5 ms hide under G: 9 / 18.09 ms =
    497/s, the highest rate; the other 5 wait."""
    state = candidate([1000] * 8, [1000] * 6)
    neo = NeoPolicy(SLOW_HOST).decide(state)
    assert neo.mode is OverlapMode.ASYMMETRIC_PIPELINE and len(neo.cpu_decodes) == 5
    apex = ApexPolicy(SLOW_HOST).decide(state)
    assert apex.mode is OverlapMode.ASYNC_OVERLAP and len(apex.cpu_decodes) == 1
    assert apex.predicted.total == pytest.approx(18.09 * MS, rel=1e-6)
    assert 9 / apex.predicted.total > 13 / neo.predicted.total


def test_the_hidden_overlap_still_serves_the_overdue_request():
    """Same state with the 1000-token CPU decode c5 overdue: the hidden overlap must carry it (it is the
    one forced in), so whatever runs advances c5."""
    base = candidate([1000] * 8, [1000] * 6)
    stalls = (0, 0, 0, 0, 0, 40)
    state = IterationCandidate(prefills=(), gpu_decodes=base.gpu_decodes, cpu_decodes=base.cpu_decodes,
                               cpu_stalls=stalls)
    decision = ApexPolicy(SLOW_HOST, max_stall_iterations=32).decide(state)
    assert "c5" in {s.request_id for s in decision.cpu_decodes}
