"""An iteration is atomic: a fault at any stage leaves no request on data that was never written.

A fault is injected once, at one stage of one iteration (scheduling, the tier-move copies, each
layer, a CPU-attention job, sampling, the scheduler's update); the driver catches what ``step()``
raises and steps on. Every request that was not failed must come back with exactly the tokens of
the fault-free run (seeded sampling, so every token is checked, not only greedy ones), and every KV
block must be returned. The requests that may fail are the ones the engine names: those whose KV
blocks were being moved when the fault hit (``IterationError.failed_request_ids``), or the one
request whose own processing failed (finish_reason ``"error"``).
"""

from __future__ import annotations

import random

import pytest

from apexlib import SamplingParams
from apexlib.attention import cpu as cpu_attention
from apexlib.core.config import ModelConfig
from apexlib.core.plan import Tier
from apexlib.engine import LLMEngine
from apexlib.engine.engine import IterationError
from apexlib.runner import model_runner

LENGTHS = [40, 60, 33, 70, 9, 50, 45, 66, 20, 58, 12, 37]
OUTPUTS = [8, 40, 8, 40, 8, 40, 8, 40, 8, 40, 20, 20]


class Fault(RuntimeError):
    """The injected fault."""


def make_engine(path, mode):
    return LLMEngine.from_engine_args(model=str(path), dtype="float32", device="cpu", block_size=8,
                                      max_model_len=192, policy="hybrid", num_gpu_blocks=30, num_cpu_blocks=120,
                                      policy_options={"hybrid_mode": mode, "cpu_placement": "overflow"})


def requests(path):
    vocab = ModelConfig.from_pretrained(path).vocab_size
    rng = random.Random(11)
    prompts = [[rng.randrange(4, vocab) for _ in range(n)] for n in LENGTHS]
    return [(f"r{i}", prompt, SamplingParams(max_tokens=n, temperature=0.9, seed=100 + i, ignore_eos=True,
                                             output_kind="final_only"))
            for i, (prompt, n) in enumerate(zip(prompts, OUTPUTS, strict=True))]


def drive(engine, work):
    """Run ``work`` to the end, stepping on after every IterationError; (outputs, errors raised)."""
    for request_id, prompt, params in work:
        engine.add_request(request_id, {"prompt_token_ids": prompt}, params)
    outputs, raised = {}, []
    for _ in range(5000):
        if not engine.has_unfinished_requests() and not engine.scheduler.has_finished_elsewhere():
            break
        try:
            for output in engine.step():
                assert output.finished
                outputs[output.request_id] = output
        except IterationError as error:
            raised.append(error)
    else:
        pytest.fail("the engine did not drain")
    kv = engine.scheduler.kv
    for tier in Tier:
        assert kv.pools[tier].num_free_blocks == kv.pools[tier].num_blocks, f"{tier} blocks not returned"
    return outputs, raised


class Trigger:
    """Raise Fault on the ``at``-th call for which ``when()`` holds (once)."""

    def __init__(self, at, when=lambda *a, **k: True):
        self.at, self.when, self.calls, self.fired = at, when, 0, False

    def check(self, *args, **kwargs):
        if not self.fired and self.when(*args, **kwargs):
            self.calls += 1
            if self.calls == self.at:
                self.fired = True
                raise Fault(f"injected fault (call {self.at})")


def wrap(monkeypatch, owner, name, trigger):
    original = getattr(owner, name)

    def faulty(*args, **kwargs):
        trigger.check(*args, **kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, faulty)


def inject(stage, at, engine, monkeypatch):
    """Install a fault at ``stage`` on its ``at``-th occasion; return its trigger."""
    scheduler, runner = engine.scheduler, engine.runner
    if stage == "schedule":  # after the swap bookkeeping, before any block moved
        trigger = Trigger(at, lambda *a: bool(scheduler._uncommitted_swaps))
        wrap(monkeypatch, scheduler.policy, "decide", trigger)
    elif stage == "swaps":  # each call copies one direction: a fault between the swap-in and swap-out copies
        trigger = Trigger(at)
        wrap(monkeypatch, model_runner, "copy_blocks", trigger)
    elif stage.startswith("layer"):
        trigger = Trigger(at)
        wrap(monkeypatch, engine.model.layers[int(stage[len("layer"):])], "post_attention", trigger)
    elif stage == "cpu_job":  # raised on the worker thread, re-raised where the layer collects it
        trigger = Trigger(at)
        wrap(monkeypatch, cpu_attention, "paged_decode_attention", trigger)
    elif stage == "logits":  # the batch's LM head
        trigger = Trigger(at)
        wrap(monkeypatch, engine.model, "compute_logits", trigger)
    elif stage == "sample_row":  # one request's sampling
        trigger = Trigger(at)
        wrap(monkeypatch, runner.sampler, "_sample_one", trigger)
    elif stage == "update":  # applying one request's result
        trigger = Trigger(at)
        wrap(monkeypatch, scheduler, "_stop_status", trigger)
    else:
        raise AssertionError(stage)
    return trigger


STAGES = [("schedule", 1), ("schedule", 3), ("swaps", 1), ("swaps", 2), ("swaps", 6), ("layer0", 5),
          ("layer1", 40), ("cpu_job", 3), ("cpu_job", 30), ("logits", 10), ("sample_row", 25), ("update", 60)]


@pytest.fixture(scope="module", params=["async_overlap", "asymmetric_pipeline"])
def setup(request, tiny_path):
    path = tiny_path("gqa")
    engine = make_engine(path, request.param)
    work = requests(path)
    reference, raised = drive(engine, work)
    assert not raised
    stats = engine.stats
    assert stats.swapped_in_blocks > 0 and stats.swapped_out_blocks > 0 and stats.cpu_decode_tokens > 0, stats
    assert all(o.outputs[0].finish_reason == "length" for o in reference.values())
    yield engine, work, {k: o.outputs[0].token_ids for k, o in reference.items()}
    engine.close()


@pytest.mark.parametrize(("stage", "at"), STAGES, ids=[f"{s}-{a}" for s, a in STAGES])
def test_fault_at_every_stage_leaves_survivors_exact(stage, at, setup, monkeypatch):
    engine, work, reference = setup
    with monkeypatch.context() as patch:
        trigger = inject(stage, at, engine, patch)
        outputs, raised = drive(engine, work)
    assert trigger.fired, f"the {stage} fault never fired (call {at})"
    assert set(outputs) == set(reference)  # nothing lost
    allowed = {request_id for error in raised for request_id in error.failed_request_ids}
    failed = {k for k, o in outputs.items() if o.outputs[0].finish_reason == "error"}
    one_request = stage in ("sample_row", "update")  # one request's own failure: it alone fails
    if one_request:
        allowed = failed
    differing = [k for k, o in outputs.items() if k not in allowed and o.outputs[0].token_ids != reference[k]]
    assert not differing, f"{differing} differ from the fault-free run after a {stage} fault"
    for request_id, output in outputs.items():
        expected = "error" if request_id in allowed else "length"
        assert output.outputs[0].finish_reason == expected, (request_id, output.error)
        assert (output.error is not None) == (request_id in allowed)
    if one_request:  # nothing raised: the engine finished that request with the error and went on
        assert not raised and len(failed) == 1
        assert "injected fault" in outputs[next(iter(failed))].error
    else:  # an iteration's failure: step() raised once, the iteration was discarded
        assert len(raised) == 1 and isinstance(raised[0].__cause__, Fault)
        if stage in ("schedule", "swaps"):
            assert allowed, "a fault before the tier-move copies must fail the moved requests"
        else:
            assert not allowed, "a fault after the copies fails nobody: the iteration is simply run again"
