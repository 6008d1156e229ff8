"""Sampling: greedy, seeded determinism, top-k/top-p, and batch-composition independence."""

from __future__ import annotations

import pytest
import torch

from apexlib import LLM, SamplingParams
from apexlib.core.plan import ScheduledSequence, Tier
from apexlib.runner.sampler import Sampler


@pytest.fixture(scope="module")
def llm(tiny_path):
    return LLM(str(tiny_path("gqa")), dtype="float32", device="cpu", max_model_len=256)


def tokens(llm, prompts, params):
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]


PROMPTS = [{"prompt_token_ids": [10, 20, 30]}, {"prompt_token_ids": list(range(40, 90))}]


def test_seeded_sampling_is_deterministic_and_seed_dependent(llm):
    params = SamplingParams(max_tokens=20, temperature=1.0, seed=123)
    first = tokens(llm, PROMPTS, params)
    assert first == tokens(llm, PROMPTS, params)
    other = tokens(llm, PROMPTS, SamplingParams(max_tokens=20, temperature=1.0, seed=124))
    assert first != other


def test_seeded_request_ignores_batch_composition(llm):
    params = SamplingParams(max_tokens=16, temperature=0.8, seed=7)
    alone = tokens(llm, PROMPTS[:1], params)[0]
    noise = [{"prompt_token_ids": [i, i + 1, i + 2]} for i in range(100, 110)]
    together = tokens(llm, PROMPTS[:1] + noise, [params] + [SamplingParams(max_tokens=5, temperature=1.0)] * 10)
    assert together[0] == alone


def test_top_k_one_and_tiny_top_p_are_greedy(llm):
    greedy = tokens(llm, PROMPTS, SamplingParams(max_tokens=12, temperature=0.0))
    assert tokens(llm, PROMPTS, SamplingParams(max_tokens=12, temperature=1.5, top_k=1, seed=1)) == greedy
    assert tokens(llm, PROMPTS, SamplingParams(max_tokens=12, temperature=1.0, top_p=1e-6, seed=1)) == greedy


def test_engine_seed_makes_unseeded_sampling_reproducible(tiny_path):
    params = SamplingParams(max_tokens=12, temperature=1.0)
    runs = [tokens(LLM(str(tiny_path("gqa")), device="cpu", dtype="float32", max_model_len=128, seed=s), PROMPTS,
                   params) for s in (3, 3, 4)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def _sequence(request_id, **params):
    return ScheduledSequence(request_id=request_id, token_ids=(1,), start_position=0, block_table=(0,),
                             tier=Tier.GPU, sample=True, sampling_params=SamplingParams(**params), num_output_tokens=0)


def test_sampler_top_k_and_top_p_restrict_support():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    sampler = Sampler(seed=0)
    top_k = {sampler.sample(logits, [_sequence("a", temperature=1.0, top_k=2)])[0] for _ in range(200)}
    assert top_k == {0, 1}
    # top_p=0.7: the smallest prefix reaching 0.7 is {0, 1} (0.5 + 0.3)
    top_p = {sampler.sample(logits, [_sequence("b", temperature=1.0, top_p=0.7)])[0] for _ in range(200)}
    assert top_p == {0, 1}
    everything = {sampler.sample(logits, [_sequence("c", temperature=1.0)])[0] for _ in range(400)}
    assert everything == {0, 1, 2, 3}


def test_output_kind_final_only_reports_once_with_the_same_result(llm):
    engine = llm.llm_engine
    seen: dict[str, list] = {"cumulative": [], "final_only": []}
    for kind in seen:
        engine.add_request(kind, {"prompt_token_ids": [5, 6, 7]},
                           SamplingParams(max_tokens=6, temperature=0.0, output_kind=kind))
    while engine.has_unfinished_requests():
        for output in engine.step():
            seen[output.request_id].append(output)
    cumulative, final = seen["cumulative"], seen["final_only"]
    assert len(cumulative) == 6 and [len(o.outputs[0].token_ids) for o in cumulative] == [1, 2, 3, 4, 5, 6]
    assert len(final) == 1 and final[0].finished
    assert final[0].outputs[0].token_ids == cumulative[-1].outputs[0].token_ids
    assert final[0].metrics.token_times and len(final[0].metrics.token_times) == 6


def test_output_kind_is_validated():
    with pytest.raises(ValueError, match="output_kind"):
        SamplingParams(output_kind="delta")
