"""Scheduler + gpu_only policy with a fake runner: no torch, hand-derived expectations."""

from __future__ import annotations

import subprocess
import sys

import pytest

from apexlib.core.config import CacheConfig, SchedulerConfig
from apexlib.core.plan import RunnerOutput, Tier
from apexlib.core.request import Request, RequestStatus, SamplingParams
from apexlib.engine.scheduler import Scheduler
from apexlib.policies import build_policy

EOS = 2


def make_scheduler(num_gpu_blocks=16, block_size=4, max_model_len=64, max_num_seqs=8, budget=64, chunked=True):
    return Scheduler(
        SchedulerConfig(max_model_len=max_model_len, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                        enable_chunked_prefill=chunked),
        CacheConfig(block_size=block_size, num_gpu_blocks=num_gpu_blocks, num_cpu_blocks=0, kv_dtype="float32"),
        build_policy("gpu_only"),
    )


def request(request_id: str, prompt_len: int, max_tokens: int = 4, **params) -> Request:
    return Request(request_id=request_id, prompt_token_ids=list(range(10, 10 + prompt_len)),
                   sampling_params=SamplingParams(max_tokens=max_tokens, temperature=0.0, **params),
                   arrival_time=0.0, eos_token_ids=(EOS,))


class FakeRunner:
    """Returns token 7 (never EOS) for every sampled sequence, or a scripted token per request."""

    def __init__(self, scripted: dict[str, list[int]] | None = None) -> None:
        self.scripted = scripted or {}

    def execute(self, plan) -> RunnerOutput:
        out = {}
        for seq in plan.sequences:
            if seq.sample:
                script = self.scripted.get(seq.request_id)
                out[seq.request_id] = script.pop(0) if script else 7
        return RunnerOutput(sampled_token_ids=out)


def run_to_completion(scheduler, runner, limit=1000):
    plans = []
    for _ in range(limit):
        if not scheduler.has_unfinished_requests():
            return plans
        plan = scheduler.schedule(now=0.0)
        plans.append(plan)
        scheduler.update_from_output(plan, runner.execute(plan), now=0.0)
    raise AssertionError("scheduler did not drain")


def test_control_plane_imports_no_torch():
    code = ("import sys, apexlib, apexlib.engine.scheduler, apexlib.kvcache.manager, apexlib.policies, "
            "apexlib.core.plan, apexlib.core.config; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_prefill_then_decode_and_finish_on_max_tokens():
    scheduler = make_scheduler()
    scheduler.add_request(request("a", 5, max_tokens=3))
    scheduler.add_request(request("b", 2, max_tokens=1))
    plan = scheduler.schedule(0.0)
    assert [s.request_id for s in plan.prefills] == ["a", "b"] and not plan.gpu_decodes
    assert plan.prefills[0].token_ids == tuple(range(10, 15)) and plan.prefills[0].sample
    updated = scheduler.update_from_output(plan, FakeRunner().execute(plan), 0.0)
    assert {r.request_id for r in updated} == {"a", "b"}
    b = next(r for r in updated if r.request_id == "b")
    assert b.status is RequestStatus.FINISHED_LENGTH
    plan = scheduler.schedule(0.0)
    assert plan.finished_request_ids == ("b",)
    assert [s.request_id for s in plan.gpu_decodes] == ["a"] and plan.gpu_decodes[0].token_ids == (7,)
    assert plan.gpu_decodes[0].start_position == 5
    plans = run_to_completion(scheduler, FakeRunner())
    assert len(plans) == 2  # plan above was not applied; 2 more decodes finish "a" (3 tokens)


def test_eos_and_stop_tokens_and_ignore_eos():
    scheduler = make_scheduler()
    scheduler.add_request(request("eos", 3, max_tokens=10))
    scheduler.add_request(request("stop", 3, max_tokens=10, stop_token_ids=[9]))
    scheduler.add_request(request("ignore", 3, max_tokens=3, ignore_eos=True))
    runner = FakeRunner({"eos": [5, EOS, 5], "stop": [9], "ignore": [EOS, EOS, EOS]})
    finished = {}
    for _ in range(10):
        plan = scheduler.schedule(0.0)
        for req in scheduler.update_from_output(plan, runner.execute(plan), 0.0):
            if req.is_finished:
                finished[req.request_id] = (req.status, list(req.output_token_ids))
    assert finished["eos"] == (RequestStatus.FINISHED_STOPPED, [5, EOS])
    assert finished["stop"] == (RequestStatus.FINISHED_STOPPED, [9])
    assert finished["ignore"] == (RequestStatus.FINISHED_LENGTH, [EOS, EOS, EOS])


def test_max_model_len_caps_generation():
    scheduler = make_scheduler(max_model_len=8)
    a = request("a", 6, max_tokens=100)
    scheduler.add_request(a)
    run_to_completion(scheduler, FakeRunner())
    # 6 prompt + 2 outputs = 8 = max_model_len
    assert a.status is RequestStatus.FINISHED_LENGTH and a.num_output_tokens == 2


def test_chunked_prefill_respects_token_budget():
    scheduler = make_scheduler(budget=4)
    scheduler.add_request(request("long", 10, max_tokens=2))
    scheduler.add_request(request("short", 2, max_tokens=2))
    plan = scheduler.schedule(0.0)
    assert [(s.request_id, s.num_new_tokens, s.sample) for s in plan.prefills] == [("long", 4, False)]
    scheduler.update_from_output(plan, FakeRunner().execute(plan), 0.0)
    plan = scheduler.schedule(0.0)
    assert [(s.request_id, s.start_position, s.num_new_tokens) for s in plan.prefills] == [("long", 4, 4)]
    scheduler.update_from_output(plan, FakeRunner().execute(plan), 0.0)
    plan = scheduler.schedule(0.0)
    # the last 2 prompt tokens of "long" (sampled) + the 2-token prompt of "short" fill the budget of 4
    assert [(s.request_id, s.num_new_tokens, s.sample) for s in plan.prefills] == [("long", 2, True),
                                                                                   ("short", 2, True)]


def test_without_chunked_prefill_a_prompt_waits_for_a_budget_that_holds_it():
    scheduler = make_scheduler(budget=64, max_model_len=64, chunked=False)
    scheduler.add_request(request("a", 40))
    scheduler.add_request(request("b", 30))
    plan = scheduler.schedule(0.0)
    assert [s.request_id for s in plan.prefills] == ["a"]


def test_max_num_seqs_limits_the_batch():
    scheduler = make_scheduler(max_num_seqs=2)
    for name in "abc":
        scheduler.add_request(request(name, 2))
    plan = scheduler.schedule(0.0)
    assert [s.request_id for s in plan.prefills] == ["a", "b"]


def test_preemption_evicts_newest_and_recomputes_all_tokens():
    # 4 blocks of 4 tokens = 16 tokens of KV. Three requests of 4-token prompts fill 3 blocks; the
    # decodes need a 2nd block each, so the newest must be preempted.
    scheduler = make_scheduler(num_gpu_blocks=4, block_size=4, max_model_len=16)
    for name in "abc":
        scheduler.add_request(request(name, 4, max_tokens=6))
    plan = scheduler.schedule(0.0)
    scheduler.update_from_output(plan, FakeRunner().execute(plan), 0.0)  # all prefilled, 1 output each
    plan = scheduler.schedule(0.0)
    # a takes block 4 (the last free one); b needs another -> c (newest) is preempted; b fits
    assert [s.request_id for s in plan.gpu_decodes] == ["a", "b"]
    assert scheduler.stats.preemptions == 1
    c = scheduler.requests["c"]
    assert c.status is RequestStatus.WAITING and c.num_computed_tokens == 0 and scheduler.waiting[0] is c
    scheduler.update_from_output(plan, FakeRunner().execute(plan), 0.0)
    plans = run_to_completion(scheduler, FakeRunner())
    recompute = next(s for p in plans for s in p.prefills if s.request_id == "c")
    # c is recomputed from its prompt plus the one token it had generated: 5 tokens in one chunk
    assert recompute.token_ids == (10, 11, 12, 13, 7) and recompute.start_position == 0 and recompute.sample
    assert scheduler.kv.num_free_blocks(Tier.GPU) == 4


def test_abort_frees_blocks_and_reports_release():
    scheduler = make_scheduler()
    scheduler.add_request(request("a", 5))
    scheduler.add_request(request("b", 5))
    plan = scheduler.schedule(0.0)
    scheduler.update_from_output(plan, FakeRunner().execute(plan), 0.0)
    free_before = scheduler.kv.num_free_blocks(Tier.GPU)
    aborted = scheduler.abort_request("a")
    assert aborted.status is RequestStatus.FINISHED_ABORTED
    assert scheduler.kv.num_free_blocks(Tier.GPU) == free_before + 2
    assert scheduler.schedule(0.0).finished_request_ids == ("a",)
    assert scheduler.abort_request("missing") is None


def test_duplicate_request_id_is_rejected():
    scheduler = make_scheduler()
    scheduler.add_request(request("a", 3))
    with pytest.raises(ValueError, match="already in the engine"):
        scheduler.add_request(request("a", 3))
