"""The engine under load, as a service would run it: soak, abort storms, determinism across policies.

- soak: a stream of requests of random lengths through every policy with squeezed KV budgets
  (preemption, swaps, chunked prefill): none lost, none of the wrong length, every KV block returned,
  resident memory flat once the outputs are not kept;
- abort storms: aborts that hit decoding, mid-prefill, CPU-tier, preempted and waiting requests;
- determinism: with per-request seeds, outputs do not depend on the policy or the batch composition.

Each runs in seconds; the ``slow`` variants (``make test-all``) run a few thousand requests. Every test
prints its figures (``pytest -s``).
"""

from __future__ import annotations

import gc
import os
import random

import pytest
import torch

from apexlib import SamplingParams
from apexlib.core.plan import Tier
from apexlib.core.request import RequestStatus
from apexlib.engine import LLMEngine

POLICIES = ("gpu_only", "hybrid", "neo", "apex")
MAX_MODEL_LEN = 192


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One torch thread, as the hybrid engines set for themselves on device=cpu: on a shared two-core
    machine a second OpenMP thread makes every iteration wait for a descheduled thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_engine(path, policy, **overrides):
    kwargs = dict(model=str(path), dtype="float32", device="cpu", block_size=8, max_model_len=MAX_MODEL_LEN,
                  policy=policy, num_gpu_blocks=28, max_num_batched_tokens=64)
    if policy != "gpu_only":
        kwargs["num_cpu_blocks"] = 96
    if policy in ("neo", "apex"):
        kwargs["cost_model"] = "zero"
    kwargs.update(overrides)
    return LLMEngine.from_engine_args(**kwargs)


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def blocks_in_use(engine) -> int:
    kv = engine.scheduler.kv
    return sum(kv.pools[t].num_blocks - kv.pools[t].num_free_blocks for t in Tier)


def random_request(rng, vocab):
    prompt = [rng.randrange(4, vocab) for _ in range(rng.randint(1, 100))]
    temperature = rng.choice([0.0, 0.8, 1.0])
    params = SamplingParams(max_tokens=rng.randint(1, 40), temperature=temperature, top_p=rng.choice([1.0, 0.9]),
                            seed=rng.randrange(2**32) if temperature else None, ignore_eos=True,
                            output_kind="final_only")
    return prompt, params


def expected_length(prompt, params):
    return min(params.max_tokens, MAX_MODEL_LEN - len(prompt))


# -- soak ------------------------------------------------------------------------------------------
def soak(engine, num_requests, inflight=24, seed=0):
    rng = random.Random(seed)
    vocab = engine.config.model.vocab_size
    expected, returned, lost_outputs, wrong = {}, set(), 0, 0
    rss = []
    submitted = 0
    while submitted < num_requests or engine.has_unfinished_requests():
        while submitted < num_requests and engine.get_num_unfinished_requests() < inflight:
            prompt, params = random_request(rng, vocab)
            request_id = engine.add_request(f"s{submitted}", {"prompt_token_ids": prompt}, params)
            expected[request_id] = expected_length(prompt, params)
            submitted += 1
            if submitted in (num_requests // 5, num_requests):
                gc.collect()
                rss.append((submitted, rss_mb()))
        for output in engine.step():  # outputs are counted, not kept
            assert output.finished and output.request_id not in returned
            returned.add(output.request_id)
            if len(output.outputs[0].token_ids) != expected.pop(output.request_id):
                wrong += 1
    lost_outputs = len(expected)
    gc.collect()
    rss.append((submitted, rss_mb()))
    growth = rss[-1][1] - rss[0][1]  # after the first fifth of the requests (allocator warm-up) to the end
    return {"requests": num_requests, "lost": lost_outputs, "wrong_length": wrong,
            "blocks_in_use": blocks_in_use(engine), "rss_growth_mb": round(growth, 2),
            "rss_mb_per_1000": round(growth / (num_requests - rss[0][0]) * 1000, 3), "rss_mb": round(rss[-1][1], 1),
            "preemptions": engine.stats.preemptions, "swapped_out_blocks": engine.stats.swapped_out_blocks,
            "cpu_decode_tokens": engine.stats.cpu_decode_tokens}


def check_soak(tiny_path, num_requests, rss_bound_mb):
    totals = {"requests": 0, "lost": 0, "wrong_length": 0}
    for policy in POLICIES:
        engine = make_engine(tiny_path("gqa"), policy)
        try:
            figures = soak(engine, num_requests, seed=POLICIES.index(policy))
        finally:
            engine.close()
        print(f"soak {policy}: {figures}")
        assert figures["lost"] == 0 and figures["wrong_length"] == 0 and figures["blocks_in_use"] == 0, figures
        assert figures["preemptions"] > 0  # the budget is squeezed for real
        if policy != "gpu_only":
            assert figures["swapped_out_blocks"] > 0 or figures["cpu_decode_tokens"] > 0, figures
        assert figures["rss_growth_mb"] < rss_bound_mb, figures
        for key in totals:
            totals[key] += figures[key]
    print(f"soak total: {totals}")


def test_soak_every_policy(tiny_path):
    check_soak(tiny_path, 64, rss_bound_mb=64.0)  # too short for a leak rate: only a gross leak fails it


@pytest.mark.slow
def test_soak_every_policy_long(tiny_path):
    check_soak(tiny_path, 750, rss_bound_mb=2.0)  # 3000 requests in all; 600 per policy after warm-up


# -- abort storms ---------------------------------------------------------------------------------
STATES = ("decoding", "mid_prefill", "cpu_tier", "preempted", "waiting")


def state_of(engine, request_id):
    request = engine.scheduler.requests[request_id]
    if request.status is RequestStatus.WAITING:
        return "preempted" if request.num_preemptions else "waiting"
    if engine.scheduler.kv.tier_of(request_id) is Tier.CPU:
        return "cpu_tier"
    if request.num_computed_tokens < request.num_prompt_tokens:
        return "mid_prefill"
    return "decoding"


def abort_storm(engine, num_aborts, seed):
    """Keep the engine full and abort a random unfinished request at most steps until ``num_aborts``."""
    rng = random.Random(seed)
    vocab = engine.config.model.vocab_size
    expected, aborted, outcomes, hits = {}, set(), {}, {}
    submitted = 0
    while len(aborted) < num_aborts or engine.has_unfinished_requests() or engine.scheduler.has_finished_elsewhere():
        while len(aborted) < num_aborts and engine.get_num_unfinished_requests() < 24:
            prompt = [rng.randrange(4, vocab) for _ in range(rng.randint(20, 120))]
            params = SamplingParams(max_tokens=rng.randint(8, 60), temperature=0.0, ignore_eos=True,
                                    output_kind="final_only")
            request_id = engine.add_request(f"a{submitted}", {"prompt_token_ids": prompt}, params)
            expected[request_id] = expected_length(prompt, params)
            submitted += 1
        by_state: dict[str, list[str]] = {}
        for request_id in sorted(engine.scheduler.requests):
            by_state.setdefault(state_of(engine, request_id), []).append(request_id)
        for _ in range(rng.choice([0, 1, 1, 2])):
            if len(aborted) >= num_aborts or not by_state:
                break
            # aim at each state in turn (a random request when none is in it), then a random one in it
            wanted = STATES[len(aborted) % len(STATES)]
            state = wanted if wanted in by_state else rng.choice(sorted(by_state))
            victims = by_state[state]
            victim = victims.pop(rng.randrange(len(victims)))
            if not victims:
                del by_state[state]
            hits[state] = hits.get(state, 0) + 1
            engine.abort_request(victim)
            aborted.add(victim)
        for output in engine.step():
            assert output.finished and output.request_id not in outcomes
            outcomes[output.request_id] = output
    lost = set(expected) - set(outcomes)
    wrong = 0
    for request_id, output in outcomes.items():
        completion = output.outputs[0]
        if request_id in aborted:
            wrong += completion.finish_reason != "abort"
        else:
            wrong += completion.finish_reason != "length" or len(completion.token_ids) != expected[request_id]
    return {"requests": submitted, "aborts": len(aborted), "hits": hits, "lost": len(lost), "wrong": wrong,
            "blocks_in_use": blocks_in_use(engine)}


def check_storms(tiny_path, aborts_per_storm):
    # gpu_only with small chunks: preemption and chunked prefills; hybrid placing in the CPU tier; apex
    storms = [("gpu_only", {"max_num_batched_tokens": 32}), ("gpu_only", {"num_gpu_blocks": 24}),
              ("hybrid", {"policy_options": {"cpu_placement": "cpu"}}), ("apex", {})]
    hits = {}
    for index, (policy, overrides) in enumerate(storms):
        engine = make_engine(tiny_path("gqa"), policy, **overrides)
        try:
            figures = abort_storm(engine, aborts_per_storm, seed=index)  # an exception fails the test
        finally:
            engine.close()
        print(f"abort storm {index} ({policy} {overrides}): {figures}")
        assert figures["lost"] == 0 and figures["wrong"] == 0 and figures["blocks_in_use"] == 0, figures
        for state, count in figures["hits"].items():
            hits[state] = hits.get(state, 0) + count
    print(f"abort storms: {len(storms)} x {aborts_per_storm} aborts, by state hit: {hits}")
    assert set(hits) == set(STATES), hits


def test_abort_storms(tiny_path):
    check_storms(tiny_path, 30)


@pytest.mark.slow
def test_abort_storms_long(tiny_path):
    check_storms(tiny_path, 250)


# -- determinism ----------------------------------------------------------------------------------
DETERMINISM_CONFIGS = [
    ("gpu_only", {"num_gpu_blocks": 400, "max_num_batched_tokens": 2048}),  # everything fits: the reference
    ("gpu_only", {}),  # squeezed: preemption and recompute, chunked prefill
    ("gpu_only", {"max_num_seqs": 3}),  # other batch compositions
    ("hybrid", {"policy_options": {"cpu_placement": "overflow"}}),
    ("hybrid", {"policy_options": {"cpu_placement": "cpu", "hybrid_mode": "asymmetric_pipeline"}}),
    ("neo", {}),
    ("apex", {}),
]


def check_determinism(tiny_path, num_requests):
    rng = random.Random(5)
    path = tiny_path("gqa")
    runs = []
    for policy, overrides in DETERMINISM_CONFIGS:
        engine = make_engine(path, policy, **overrides)
        vocab = engine.config.model.vocab_size
        rng = random.Random(5)
        work = []
        for i in range(num_requests):
            prompt = [rng.randrange(4, vocab) for _ in range(rng.randint(1, 90))]
            work.append((prompt, SamplingParams(max_tokens=rng.randint(1, 40), temperature=0.8, top_p=0.95,
                                                seed=1000 + i, ignore_eos=True, output_kind="final_only")))
        outputs = {}
        try:
            for i, (prompt, params) in enumerate(work):
                engine.add_request(f"d{i}", {"prompt_token_ids": prompt}, params)
            while engine.has_unfinished_requests():
                for output in engine.step():
                    outputs[output.request_id] = output.outputs[0].token_ids
        finally:
            engine.close()
        stats = engine.stats
        print(f"determinism {policy} {overrides}: {len(outputs)} requests, preemptions {stats.preemptions}, "
              f"swapped out {stats.swapped_out_blocks} blocks, CPU decodes {stats.cpu_decode_tokens}, "
              f"modes {stats.mode_counts}")
        runs.append(outputs)
    reference = runs[0]
    differing = [sum(run[k] != reference[k] for k in reference) for run in runs[1:]]
    print(f"determinism: {len(DETERMINISM_CONFIGS)} configurations x {num_requests} seeded requests, "
          f"outputs differing from the reference per configuration: {differing}")
    assert all(len(run) == num_requests for run in runs)
    assert differing == [0] * len(differing)


def test_outputs_identical_across_policies_and_batches(tiny_path):
    check_determinism(tiny_path, 24)


@pytest.mark.slow
def test_outputs_identical_across_policies_and_batches_long(tiny_path):
    check_determinism(tiny_path, 200)
