"""Regression tests for hostile use of the engine: poison requests, orphans, threads, a stuck CPU worker,
mismatched or truncated weights, and the messages bad arguments get."""

from __future__ import annotations

import json
import shutil
import threading
import time

import numpy as np
import pytest
import torch

from apexlib import LLM, SamplingParams
from apexlib.attention import cpu as cpu_attention
from apexlib.cli import main as cli_main
from apexlib.core.plan import Tier
from apexlib.engine import LLMEngine
from apexlib.engine.engine import IterationError
from apexlib.runner.overlap import CpuWorkerTimeout


@pytest.fixture(scope="module")
def engine(tiny_path):
    engine = LLMEngine.from_engine_args(model=str(tiny_path("gqa")), dtype="float32", device="cpu",
                                        max_model_len=128, num_gpu_blocks=64)
    yield engine
    engine.close()


def run_all(engine):
    outputs = {}
    while engine.has_unfinished_requests() or engine.scheduler.has_finished_elsewhere():
        for output in engine.step():
            if output.finished:
                outputs[output.request_id] = output
    return outputs


def all_blocks_free(engine):
    kv = engine.scheduler.kv
    return all(kv.pools[t].num_free_blocks == kv.pools[t].num_blocks for t in Tier)


# -- 1. a poison request ------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"seed": "42"}, TypeError, r"SamplingParams.seed must be an integer, got str '42'"),
    ({"seed": 1.5}, TypeError, r"SamplingParams.seed must be an integer, got float 1.5"),
    ({"seed": 2**64}, ValueError, r"SamplingParams.seed must be None or an integer in \[0, 2\*\*64 - 1\]"),
    ({"seed": -1}, ValueError, r"SamplingParams.seed must be None or an integer in \[0, 2\*\*64 - 1\]"),
    ({"seed": True}, TypeError, r"SamplingParams.seed must be an integer, got bool"),
    ({"top_k": 2.5}, TypeError, r"SamplingParams.top_k must be an integer, got float 2.5"),
    ({"max_tokens": True}, TypeError, r"SamplingParams.max_tokens must be an integer, got bool"),
    ({"max_tokens": 3.0}, TypeError, r"SamplingParams.max_tokens must be an integer, got float"),
    ({"temperature": 1e-38}, ValueError, r"SamplingParams.temperature must be >= 0: 0 \(greedy\) or >= 1e-05"),
    ({"temperature": "0.8"}, TypeError, r"SamplingParams.temperature must be a number, got str '0.8'"),
    ({"temperature": float("nan")}, ValueError, r"SamplingParams.temperature must be finite"),
    ({"temperature": float("inf")}, ValueError, r"SamplingParams.temperature must be finite"),
    ({"top_p": "1"}, TypeError, r"SamplingParams.top_p must be a number"),
    ({"stop_token_ids": [1, "2"]}, TypeError, r"SamplingParams.stop_token_ids\[1\] must be an integer"),
    ({"stop_token_ids": 7}, TypeError, r"SamplingParams.stop_token_ids must be None or a list"),
    ({"ignore_eos": 1}, TypeError, r"SamplingParams.ignore_eos must be a bool"),
    ({"output_kind": 3}, ValueError, r"SamplingParams.output_kind must be one of"),
])
def test_sampling_params_reject_bad_fields_at_construction(kwargs, error, message):
    with pytest.raises(error, match=message):
        SamplingParams(**kwargs)


def test_sampling_params_take_numpy_and_torch_integers_as_ints():
    params = SamplingParams(max_tokens=np.int64(4), seed=torch.tensor(7), top_k=np.int32(3),
                            temperature=np.float32(0.5), stop_token_ids=np.array([1, 2]))
    assert (params.max_tokens, params.seed, params.top_k, params.stop_token_ids) == (4, 7, 3, (1, 2))
    assert all(type(v) is int for v in (params.max_tokens, params.seed, params.top_k, *params.stop_token_ids))
    assert type(params.temperature) is float


def test_one_failing_request_fails_alone_and_frees_its_blocks(engine, monkeypatch):
    """An error while one request is processed (here: its sampling) finishes that request with
    finish_reason 'error' and its blocks freed; the batch it was in completes."""
    sampler = engine.runner.sampler
    original = sampler._sample_one

    def poisoned(logits, sequence):
        if sequence.request_id == "poison" and sequence.num_output_tokens == 2:
            raise RuntimeError("probabilities contain NaN")
        return original(logits, sequence)

    monkeypatch.setattr(sampler, "_sample_one", poisoned)
    for name in ("a", "poison", "b"):
        engine.add_request(name, {"prompt_token_ids": [5, 6, 7, 8]},
                           SamplingParams(max_tokens=6, temperature=0.7, seed=3, ignore_eos=True))
    outputs = run_all(engine)
    assert outputs["poison"].outputs[0].finish_reason == "error"
    assert "probabilities contain NaN" in outputs["poison"].error
    assert len(outputs["poison"].outputs[0].token_ids) == 2
    for name in ("a", "b"):
        assert outputs[name].outputs[0].finish_reason == "length" and len(outputs[name].outputs[0].token_ids) == 6
    assert outputs["a"].outputs[0].token_ids == outputs["b"].outputs[0].token_ids  # same seed, same prompt
    assert all_blocks_free(engine) and not engine.has_unfinished_requests()


def test_a_failed_iteration_is_discarded_and_the_engine_goes_on(engine, monkeypatch):
    layer = engine.model.layers[0]
    original, calls = layer.post_attention, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("transient device error")
        return original(*args, **kwargs)

    engine.add_request("ref", {"prompt_token_ids": [9, 10, 11]}, SamplingParams(max_tokens=5, temperature=0.0))
    reference = run_all(engine)["ref"].outputs[0].token_ids
    monkeypatch.setattr(layer, "post_attention", flaky)
    engine.add_request("x", {"prompt_token_ids": [9, 10, 11]}, SamplingParams(max_tokens=5, temperature=0.0))
    engine.step()
    engine.step()
    with pytest.raises(IterationError, match=r"failed in execute: RuntimeError: transient device error\. "
                                             r"It was discarded \(no request advanced\); step\(\) may be called again"):
        engine.step()
    assert run_all(engine)["x"].outputs[0].token_ids == reference


# -- 3. LLM.generate owns its requests ------------------------------------------------------------
@pytest.fixture(scope="module")
def llm(tiny_path):
    llm = LLM(str(tiny_path("gqa")), dtype="float32", device="cpu", max_model_len=128, num_gpu_blocks=64)
    yield llm
    llm.llm_engine.close()


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, RuntimeError])
def test_generate_aborts_its_requests_on_any_exit(llm, monkeypatch, interrupt):
    engine = llm.llm_engine
    original, calls = engine.step, []

    def step():
        calls.append(1)
        if len(calls) == 5:
            raise interrupt("stop")
        return original()

    monkeypatch.setattr(engine, "step", step)
    with pytest.raises(interrupt):
        llm.generate([{"prompt_token_ids": [4 + i, 5, 6]} for i in range(16)],
                     SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True), use_tqdm=False)
    monkeypatch.setattr(engine, "step", original)
    assert not engine.has_unfinished_requests() and all_blocks_free(engine)
    assert not engine.scheduler.has_finished_elsewhere()  # nobody is left to read them
    steps = []
    monkeypatch.setattr(engine, "step", lambda: steps.append(1) or original())
    [output] = llm.generate({"prompt_token_ids": [7, 8]}, SamplingParams(max_tokens=8, temperature=0.0,
                                                                          ignore_eos=True), use_tqdm=False)
    assert len(output.outputs[0].token_ids) == 8 and len(steps) <= 9


@pytest.mark.timeout(120)
def test_generate_returns_a_request_aborted_elsewhere_as_aborted(llm, monkeypatch):
    engine = llm.llm_engine
    original, calls = engine.step, []

    def step():
        calls.append(1)
        if len(calls) == 3:  # someone else (a signal handler, another thread) aborts one of generate's requests
            engine.abort_request(sorted(engine.scheduler.requests)[0])
        return original()

    monkeypatch.setattr(engine, "step", step)
    outputs = llm.generate([{"prompt_token_ids": [4 + i, 5, 6]} for i in range(3)],
                           SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True), use_tqdm=False)
    reasons = sorted(o.outputs[0].finish_reason for o in outputs)
    assert reasons == ["abort", "length", "length"]
    assert all(o.finished for o in outputs) and all_blocks_free(engine)


def test_aborted_request_comes_back_once_from_step(engine):
    engine.add_request("gone", {"prompt_token_ids": [5, 6]}, SamplingParams(max_tokens=50))
    engine.step()
    engine.abort_request("gone")
    [output] = engine.step()
    assert output.request_id == "gone" and output.finished and output.outputs[0].finish_reason == "abort"
    assert engine.step() == [] and all_blocks_free(engine)


# -- 4. threads ------------------------------------------------------------------------------------
def test_concurrent_step_add_and_abort_serialize(tiny_path):
    engine = LLMEngine.from_engine_args(model=str(tiny_path("gqa")), dtype="float32", device="cpu",
                                        max_model_len=128, num_gpu_blocks=64)
    outputs, errors, added = {}, [], threading.Event()
    lock = threading.Lock()

    def stepper():
        try:
            while not added.is_set() or engine.has_unfinished_requests():
                for output in engine.step():
                    if output.finished:
                        with lock:
                            outputs[output.request_id] = output
        except Exception as error:  # noqa: BLE001 - collected for the assertion below
            errors.append(error)

    def submitter():
        try:
            for i in range(60):
                engine.add_request(f"r{i}", {"prompt_token_ids": [4 + i % 50, 5, 6, 7]},
                                   SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
                if i % 7 == 3:
                    engine.abort_request(f"r{i - 2}")
                time.sleep(0.001)
        except Exception as error:  # noqa: BLE001
            errors.append(error)
        finally:
            added.set()

    threads = [threading.Thread(target=stepper), threading.Thread(target=stepper), threading.Thread(target=submitter)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    engine.close()
    assert not errors, errors
    assert len(outputs) == 60
    for output in outputs.values():
        completion = output.outputs[0]
        assert completion.finish_reason in ("abort", "length")
        if completion.finish_reason == "length":
            assert len(completion.token_ids) == 12
    assert all_blocks_free(engine)


# -- 6. config / weights mismatch -------------------------------------------------------------------
def _copy(tmp_path, tiny_path, **config_changes):
    target = tmp_path / "model"
    shutil.copytree(tiny_path("gqa"), target)
    config = json.loads((target / "config.json").read_text())
    config.update(config_changes)
    (target / "config.json").write_text(json.dumps(config))
    return target


def test_weights_for_more_layers_than_the_config_are_an_error(tmp_path, tiny_path):
    with pytest.raises(ValueError, match=r"checkpoint has 9 tensor\(s\) that config.json .* does not use "
                                         r"\(num_hidden_layers=1.*'model.layers.1.input_layernorm.weight'"):
        LLM(str(_copy(tmp_path, tiny_path, num_hidden_layers=1)), device="cpu")


def test_weights_for_fewer_layers_than_the_config_are_an_error(tmp_path, tiny_path):
    with pytest.raises(ValueError, match=r"missing 9 tensor\(s\) .*num_hidden_layers=3.*model.layers.2"):
        LLM(str(_copy(tmp_path, tiny_path, num_hidden_layers=3)), device="cpu")


def test_a_shape_mismatch_names_the_tensor_and_both_shapes(tmp_path, tiny_path):
    target = _copy(tmp_path, tiny_path)
    size = json.loads((target / "config.json").read_text())["intermediate_size"]
    _copy_config = json.loads((target / "config.json").read_text())
    _copy_config["intermediate_size"] = size + 8
    (target / "config.json").write_text(json.dumps(_copy_config))
    with pytest.raises(ValueError, match=rf"tensor model.layers.0.mlp.gate_proj.weight in model.safetensors has "
                                         rf"shape \({size}, \d+\), but config.json at .* implies \({size + 8}, \d+\)"):
        LLM(str(target), device="cpu")


# -- 7. a stuck CPU worker ------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_a_stuck_cpu_attention_job_raises_within_the_timeout(tiny_path, monkeypatch):
    engine = LLMEngine.from_engine_args(model=str(tiny_path("gqa")), dtype="float32", device="cpu", block_size=8,
                                        max_model_len=128, policy="hybrid", num_gpu_blocks=32, num_cpu_blocks=64,
                                        policy_options={"cpu_placement": "cpu"}, cpu_attention_timeout=0.5)
    release = threading.Event()
    original = cpu_attention.paged_decode_attention

    def hang(*args, **kwargs):
        release.wait(60)
        return original(*args, **kwargs)

    monkeypatch.setattr(cpu_attention, "paged_decode_attention", hang)
    engine.add_request("a", {"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=8, temperature=0.0))
    started = time.perf_counter()
    try:
        with pytest.raises(IterationError, match=r"cpu_attention_timeout=0.5 s.*stuck") as raised:
            for _ in range(10):
                engine.step()
        assert isinstance(raised.value.__cause__, CpuWorkerTimeout)
        assert time.perf_counter() - started < 20
        with pytest.raises(IterationError, match="stuck"):  # later steps say so at once, no second wait
            engine.step()
    finally:
        release.set()
        engine.close()


def test_cpu_attention_timeout_is_validated(tiny_path):
    with pytest.raises(ValueError, match="cpu_attention_timeout must be a finite number > 0, got 0"):
        LLM(str(tiny_path("gqa")), device="cpu", cpu_attention_timeout=0)


# -- 8. messages ----------------------------------------------------------------------------------
def test_numpy_and_torch_token_ids_are_ints(engine):
    prompts = [{"prompt_token_ids": [np.int64(5), np.int32(6), 7]}, {"prompt_token_ids": np.array([5, 6, 7])},
               {"prompt_token_ids": torch.tensor([5, 6, 7])}, [torch.tensor(5), 6, 7]]
    ids = [engine.add_request(None, prompt, SamplingParams(max_tokens=3, temperature=0.0)) for prompt in prompts]
    outputs = run_all(engine)
    assert {outputs[i].prompt_token_ids for i in ids} == {(5, 6, 7)}
    assert len({outputs[i].outputs[0].token_ids for i in ids}) == 1


@pytest.mark.parametrize(("prompt", "message"), [
    ({"prompt_token_ids": [5, 1.5]}, r"prompt_token_ids\[1\]=1.5 is not an integer token id \(got float\)"),
    ({"prompt_token_ids": [5, "6"]}, r"prompt_token_ids\[1\]='6' is not an integer token id \(got str\)"),
    ({"prompt_token_ids": [True, 6]}, r"prompt_token_ids\[0\]=True is a bool"),
    ({"prompt_token_ids": np.array([[5, 6]])}, r"prompt_token_ids must be one-dimensional"),
    ({"prompt_token_ids": 5}, r"prompt_token_ids must be a list of token ids, got int"),
])
def test_bad_token_ids_say_what_is_wrong(engine, prompt, message):
    with pytest.raises(ValueError, match=message):
        engine.add_request(None, prompt, SamplingParams(max_tokens=3))


def test_abort_request_takes_int_ids_and_rejects_other_types(engine):
    engine.add_request(5, {"prompt_token_ids": [5, 6]}, SamplingParams(max_tokens=40))
    engine.abort_request(5)  # the id add_request made of it: "5"
    [output] = engine.step()
    assert output.request_id == "5" and output.outputs[0].finish_reason == "abort"
    with pytest.raises(TypeError, match=r"abort_request takes a request id \(str\) or a list of them, got float"):
        engine.abort_request(5.0)
    with pytest.raises(TypeError, match=r"request id 1 must be a str \(as add_request returned it\), got NoneType"):
        engine.abort_request(["1", None])


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"max_model_len": 0}, ValueError, "max_model_len must be >= 2, got 0"),
    ({"max_model_len": -5}, ValueError, "max_model_len must be >= 2, got -5"),
    ({"max_model_len": 64.0}, TypeError, "max_model_len must be an integer or None, got float"),
    ({"max_num_batched_tokens": 0}, ValueError, "max_num_batched_tokens must be >= 1, got 0"),
    ({"max_num_seqs": True}, TypeError, "max_num_seqs must be an integer, got bool"),
    ({"num_cpu_blocks": -1}, ValueError, "num_cpu_blocks must be >= 0, got -1"),
    ({"gpu_kv_gib": float("nan")}, ValueError, "gpu_kv_gib must be a finite number > 0"),
    ({"seed": "0"}, TypeError, "seed must be an integer, got str"),
])
def test_engine_arguments_are_rejected_not_defaulted(tiny_path, kwargs, error, message):
    with pytest.raises(error, match=message):
        LLM(str(tiny_path("gqa")), device="cpu", **kwargs)


def test_cli_names_a_truncated_safetensors_file_in_one_line(tmp_path, tiny_path, capsys):
    target = _copy(tmp_path, tiny_path)
    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    code = cli_main(["generate", "--model", str(target), "--device", "cpu", "--prompt-token-ids", "1,2,3"])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(weights) in lines[0] and "not a readable safetensors file" in lines[0]
    assert "Traceback" not in err
