"""`apex gpu-check`: every part that runs without CUDA, on CPU; the CUDA-only parts for their refusal here."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import cuda_available
from safetensors.torch import load_file

from apexlib.bench import gpu_check
from apexlib.bench.gpu_check import (
    LLAMA_2_7B,
    SIZES,
    StepFailed,
    TimeLimitReached,
    format_report,
    run_cuda_tests,
    run_gpu_check,
    t4_gpu_kv_gib,
)
from apexlib.cli import main
from apexlib.model.tiny import TinyModelSpec, init_tiny_state_dict, write_random_checkpoint

no_cuda = pytest.mark.skipif(cuda_available(), reason="checks the behaviour on a machine without CUDA")


@pytest.mark.parametrize("tied", [False, True])
def test_streamed_checkpoint_has_the_tiny_writers_tensors(tmp_path, tied):
    spec = TinyModelSpec(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, tie_word_embeddings=tied)
    expected = init_tiny_state_dict(spec, seed=7)
    shard_bytes = 40_000  # several shards, one oversized tensor (the embeddings) alone in its own
    path = write_random_checkpoint(tmp_path / "ckpt", spec, seed=7, shard_bytes=shard_bytes)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0].endswith(f"-of-{len(files):05d}.safetensors")
    loaded = {}
    for name in files:
        shard = load_file(path / name)
        sizes = [t.numel() * t.element_size() for t in shard.values()]
        assert len(shard) == 1 or sum(sizes) <= shard_bytes, name
        loaded.update(shard)
    assert sorted(loaded) == sorted(expected)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in expected.values())
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name
    assert not list(path.glob(".shard-*"))
    # one shard when everything fits; a non-empty target is refused, then replaced on request
    with pytest.raises(FileExistsError):
        write_random_checkpoint(path, spec, seed=7)
    write_random_checkpoint(path, spec, seed=7, overwrite=True, with_tokenizer=False)
    assert (path / "model.safetensors").is_file() and not (path / "tokenizer.json").exists()
    assert torch.equal(load_file(path / "model.safetensors")["lm_head.weight" if not tied else
                                                             "model.embed_tokens.weight"],
                       expected["lm_head.weight" if not tied else "model.embed_tokens.weight"])


def test_llama_2_7b_shape_and_its_t4_kv_cap():
    from apexlib.core.models import model_config_for_shape

    assert LLAMA_2_7B.to_hf_config()["num_key_value_heads"] == 32
    assert abs(LLAMA_2_7B.num_parameters() - 6_738_415_616) == 0  # Llama-2-7B's parameter count
    config = model_config_for_shape("llama-2-7b")
    gib, reason = t4_gpu_kv_gib(config, LLAMA_2_7B.num_parameters() * 2)
    # 15 GiB - 12.55 GiB of weights - 1.25 GiB activation reserve (1.12 GiB of activations, logits and
    # libraries + 0.125 GiB decode gather of 8192 padded tokens) = 1.20 GiB, x 0.9
    assert gib == pytest.approx(1.082, abs=0.01)
    assert "T4" in reason and "12.55 GiB" in reason
    with pytest.raises(ValueError, match="do not fit in a T4"):
        t4_gpu_kv_gib(config, 15 * 1024**3)


def test_plan_of_the_7b_size(tmp_path):
    """The real size's plan, from a checkpoint's config and index alone (no 13.5 GB of weights here)."""
    from apexlib.bench.gpu_check import make_plan

    directory = tmp_path / "llama-2-7b"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(LLAMA_2_7B.to_hf_config()))
    weight_bytes = LLAMA_2_7B.num_parameters() * 2
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": weight_bytes}, "weight_map": {}}))
    plan = make_plan(SIZES["llama-2-7b"], directory)
    assert plan["weight_bytes"] == weight_bytes and plan["dtype"] == "float16"
    assert 1.0 <= plan["gpu_kv_gib"] <= 1.5 and plan["num_gpu_blocks"] is None and "T4" in plan["gpu_kv_reason"]
    assert plan["kv_bytes_per_token"] == 2 * 32 * 32 * 128 * 2  # 512 KiB per token
    assert plan["gpu_kv_tokens"] == int(plan["gpu_kv_gib"] * 1024**3 // plan["kv_bytes_per_token"])
    workload = plan["workload"]
    assert 32 <= workload["num_requests"] <= 64 and workload["max_total_len"] <= 160 + 320
    assert 96 * workload["num_requests"] <= workload["prompt_tokens"] <= 160 * workload["num_requests"]
    assert workload["output_tokens"] > workload["prompt_tokens"]  # decode-heavy
    # the T4 cap holds a small share of the workload's KV; the host tier holds all of it
    assert 0.05 < plan["gpu_kv_share_of_demand"] < 0.5
    assert plan["kv_demand_gib"] <= plan["cpu_kv_gib"] <= 1.2 * plan["kv_demand_gib"] + 0.125


def test_tiny_rehearsal_runs_every_step_on_cpu(tmp_path):
    out, checkpoints = tmp_path / "out", tmp_path / "checkpoints"
    report = run_gpu_check(device="cpu", size="tiny", out_dir=out, checkpoint_dir=checkpoints)
    steps = {step.name: step for step in report.steps}
    assert list(steps) == list(gpu_check.STEPS)
    assert steps["cuda-tests"].status == "skipped" and "CUDA" in steps["cuda-tests"].detail
    assert "ISA" in steps["kernels"].detail
    assert all(step.status in ("ok", "over-budget") for name, step in steps.items() if name != "cuda-tests")
    names = ("comparison.csv", "comparison.json", "rows.csv", "meta.json", "profile.json", "plan.json",
             "environment.json", "steps.json")
    for name in names:
        assert (out / name).is_file(), name
    import tarfile

    with tarfile.open(out / "results.tgz") as archive:  # everything in one file, under the directory's name
        assert {f"{out.name}/{name}" for name in names} <= set(archive.getnames())
    rows = json.loads((out / "comparison.json").read_text())
    assert [row["policy"] for row in rows] == ["gpu_only", "neo", "apex"]
    for row in rows:
        assert row["device"] == "cpu" and row["device_name"].endswith("(device=cpu)") and row["date_utc"]
        assert row["torch"] == torch.__version__ and row["size"] == "tiny"
        assert row["engine_output_throughput"] > 0 and row["sim_output_throughput"] > 0
        assert row["engine_tpot_median_s"] > 0 and row["sim_tpot_median_s"] > 0
        assert row["num_gpu_blocks"] == SIZES["tiny"].num_gpu_blocks
    # the hybrid policies ran CPU-tier decodes under the cap, in the engine and in the simulator
    for row in rows[1:]:
        assert row["num_cpu_blocks"] > 1
        assert set(json.loads(row["engine_mode_counts"])) - {"none"}, row["engine_mode_counts"]
        assert set(json.loads(row["sim_mode_counts"])) - {"none"}, row["sim_mode_counts"]
    profile = json.loads((out / "profile.json").read_text())
    assert profile["grid"]["hybrid_contexts"] == [64] and profile["provenance"]["device"] == "cpu"
    assert "engine_step_overhead" not in profile["tables"]  # no calibration runs in the rehearsal
    plan = json.loads((out / "plan.json").read_text())
    assert 0 < plan["gpu_kv_share_of_demand"] < 1 and plan["cpu_kv_gib"] * 1024**3 >= plan["kv_demand_gib"] * 1024**3
    recorded = json.loads((out / "steps.json").read_text())["steps"]
    assert [step["name"] for step in recorded] == list(gpu_check.STEPS)
    text = format_report(report)
    assert "gpu_only" in text and "apex" in text and "profile" in text and str(out) in text
    # a second run reuses the checkpoint
    again = run_gpu_check(device="cpu", size="tiny", out_dir=out, checkpoint_dir=checkpoints, num_requests=3)
    assert again.steps[1].name == "checkpoint" and again.steps[1].detail.startswith("reused")
    assert [row["num_requests"] for row in again.comparison] == [3, 3, 3]


@no_cuda
def test_cuda_device_is_refused_without_cuda(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["gpu-check", "--device", "cuda", "--size", "tiny", "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "sees no CUDA device" in error and "--device cpu --size tiny" in error
    assert not out.exists()  # refused before anything ran


def test_real_size_and_bad_input_are_refused_before_anything_runs(tmp_path, capsys):
    assert main(["gpu-check", "--device", "cpu", "--out", str(tmp_path / "a")]) == 2
    assert "--size llama-2-7b needs --device cuda" in capsys.readouterr().err
    assert main(["gpu-check", "--device", "tpu", "--size", "tiny", "--out", str(tmp_path / "b")]) == 2
    assert "--device must be cuda, cuda:N or cpu" in capsys.readouterr().err
    assert main(["gpu-check", "--device", "cpu", "--size", "tiny", "--num-requests", "0"]) == 2
    assert "--num-requests must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_failing_step_ends_the_run_with_its_name(tmp_path, capsys):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    with pytest.raises(StepFailed) as caught:
        run_gpu_check(device="cpu", size="tiny", out_dir=tmp_path / "out", checkpoint_dir=blocker / "sub")
    assert caught.value.step == "checkpoint"
    recorded = json.loads((tmp_path / "out" / "steps.json").read_text())["steps"]
    assert [(s["name"], s["status"]) for s in recorded] == [("cuda-tests", "skipped"), ("checkpoint", "failed")]
    assert main(["gpu-check", "--device", "cpu", "--size", "tiny", "--out", str(tmp_path / "out2"),
                 "--checkpoint-dir", str(blocker / "sub")]) == gpu_check.EXIT_STEP_FAILED
    captured = capsys.readouterr()
    assert "step 'checkpoint' failed" in captured.err
    assert "checkpoint       failed" in captured.out  # the table of what ran is printed too


def test_no_step_starts_past_the_time_limit(tmp_path, capsys):
    with pytest.raises(TimeLimitReached, match="not starting step 'checkpoint'"):
        run_gpu_check(device="cpu", size="tiny", out_dir=tmp_path / "out", time_limit_s=0)
    assert main(["gpu-check", "--device", "cpu", "--size", "tiny", "--out", str(tmp_path / "out2"),
                 "--time-limit", "0"]) == gpu_check.EXIT_TIME_LIMIT
    assert "time limit" in capsys.readouterr().err


def test_junit_counts(tmp_path):
    from apexlib.bench.gpu_check import junit_counts

    path = tmp_path / "report.xml"
    path.write_text('<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="1" '
                    'failures="1" skipped="2" tests="5"><testcase name="a"/><testcase name="b"><skipped '
                    'message="no CUDA GPU on this machine"/></testcase><testcase name="c"><skipped message="other"/>'
                    '</testcase></testsuite></testsuites>')
    counts = junit_counts(path)
    assert (counts["tests"], counts["failures"], counts["errors"], counts["skipped"], counts["passed"]) == (5, 1, 1, 2, 1)
    assert counts["skip_reasons"] == ["no CUDA GPU on this machine", "other"]


@no_cuda
@pytest.mark.slow  # a pytest subprocess (~20 s)
def test_cuda_tests_step_fails_when_the_cuda_tests_skip(tmp_path):
    """On a machine without CUDA `pytest -m cuda` only skips: the step must not count that as a pass."""
    with pytest.raises(RuntimeError, match="must run them all.*no CUDA GPU"):
        run_cuda_tests(tmp_path, files=("tests/test_parity.py",), timeout_s=300)
    assert (tmp_path / "cuda-tests.xml").is_file() and (tmp_path / "cuda-tests.log").is_file()
    with pytest.raises(FileNotFoundError, match="not in"):
        run_cuda_tests(tmp_path, files=("tests/no_such_file.py",))


def test_cuda_launch_blocking_is_unset(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_LAUNCH_BLOCKING", "1")
    with pytest.raises(TimeLimitReached):
        run_gpu_check(device="cpu", size="tiny", out_dir=tmp_path / "out", time_limit_s=0)
    import os

    assert "CUDA_LAUNCH_BLOCKING" not in os.environ


def test_smoke_rehearsal_runs_one_policy(tmp_path):
    out = tmp_path / "smoke"
    report = run_gpu_check(device="cpu", size="tiny", smoke=True, out_dir=out, checkpoint_dir=tmp_path / "ck")
    assert [step.name for step in report.steps] == list(gpu_check.steps_of(gpu_check.SMOKE_POLICIES))
    assert [row["policy"] for row in report.comparison] == list(gpu_check.SMOKE_POLICIES)
    assert json.loads((out / "steps.json").read_text())["smoke"] is True
    assert (out / "results.tgz").is_file()


def test_the_smoke_size_is_small_and_refused_on_cpu(tmp_path):
    from apexlib.bench.gpu_check import make_plan

    small = SIZES[gpu_check.SMOKE_SIZES["llama-2-7b"]]
    assert small.spec.num_parameters() < 1e9 and small.spec.num_key_value_heads < small.spec.num_attention_heads
    assert sum(small.budgets[step] for step in gpu_check.steps_of(gpu_check.SMOKE_POLICIES)) < 180 <= small.time_limit_s
    directory = tmp_path / "small"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(small.spec.to_hf_config()))
    plan = make_plan(small, directory)
    # one maximum-length request fits the GPU cap, the workload does not
    assert plan["workload"]["max_total_len"] <= plan["gpu_kv_tokens"] and plan["gpu_kv_share_of_demand"] < 0.5
    with pytest.raises(ValueError, match="needs --device cuda"):
        gpu_check.resolve_check_device("cpu", small)


def test_the_full_check_budgets_fit_its_limit():
    full = SIZES["llama-2-7b"]
    assert sum(full.budgets[step] for step in gpu_check.STEPS) <= full.time_limit_s <= 480


def test_cuda_tests_run_before_the_checkpoint_is_built(tmp_path, monkeypatch):
    """On CUDA (faked here) a failing CUDA test ends the run before any checkpoint is written."""
    monkeypatch.setattr(gpu_check, "resolve_check_device", lambda device, size: device)
    monkeypatch.setattr(gpu_check, "device_provenance",
                        lambda device: {"device": device, "device_name": "Fake GPU", "cpu_model": "x", "simd": ()})
    for name in ("reset_peak_memory_stats", "synchronize", "empty_cache"):
        monkeypatch.setattr(torch.cuda, name, lambda *args, **kwargs: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *args, **kwargs: 0)

    def failing_tests(*args, **kwargs):
        raise RuntimeError("1 CUDA test(s): 0 passed, 1 failed")

    monkeypatch.setattr(gpu_check, "run_cuda_tests", failing_tests)
    checkpoints = tmp_path / "ck"
    with pytest.raises(StepFailed) as caught:
        run_gpu_check(device="cuda", size="tiny", out_dir=tmp_path / "out", checkpoint_dir=checkpoints)
    assert caught.value.step == "cuda-tests"
    assert not checkpoints.exists()
    recorded = json.loads((tmp_path / "out" / "steps.json").read_text())["steps"]
    assert [(s["name"], s["status"]) for s in recorded] == [("cuda-tests", "failed")]


def test_gpu_python_prefers_an_existing_cuda_torch_and_never_builds_offline():
    from apexlib.bench.gpu_python import choose_python

    pythons = {".venv/bin/python": (False, "torch 2.13.0+cpu (CUDA None) sees no CUDA device"),
               "python3": (True, "torch 2.13.0, CUDA 12.8, NVIDIA H100")}
    offline = lambda: False  # noqa: E731
    choice = choose_python(None, [".venv/bin/python", "python3"], probe=pythons.__getitem__, network=offline)
    assert choice.python == "python3" and "H100" in choice.reason
    pythons["python3"] = (False, "lacks torch (ModuleNotFoundError)")
    choice = choose_python(None, [".venv/bin/python", "python3"], probe=pythons.__getitem__, network=offline)
    assert choice.python is None and "GPU_PYTHON=" in choice.reason and "lacks torch" in choice.reason
    choice = choose_python(None, [".venv/bin/python", "python3"], probe=pythons.__getitem__, network=lambda: True)
    assert choice.python == "build"
    choice = choose_python("python3", [], probe=pythons.__getitem__, network=lambda: True)
    assert choice.python is None and choice.reason.startswith("GPU_PYTHON=python3")


def test_gpu_python_cli_exits_2_without_a_usable_python(monkeypatch, capsys):
    from apexlib.bench import gpu_python

    monkeypatch.setattr(gpu_python, "index_reachable", lambda timeout_s=3.0: False)
    assert gpu_python.main(["/nonexistent/python"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "/nonexistent/python: not found" in captured.err
    # this test's own python: usable only where its torch sees a GPU
    status = gpu_python.main([sys.executable])
    assert status == (0 if torch.cuda.is_available() else 2)
