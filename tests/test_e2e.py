"""`apex bench e2e`: the three engines on one checkpoint and the same prompts; here apexlib and
transformers (vLLM skips with its reason where its venv is absent), a small workload."""

from __future__ import annotations

import json

import pytest

from apexlib.bench.e2e import E2ESettings, format_report, run_e2e


def test_e2e_runs_agrees_and_says_where_the_time_goes(tmp_path):
    report = run_e2e(E2ESettings(num_requests=3, prompt_len=16, output_len=8, repeats=1, model="bench512",
                                 vllm_python=str(tmp_path / "no-vllm" / "python")), tmp_path, progress=False)
    rows = {row["engine"]: row for row in report["rows"]}
    assert set(rows) == {"apexlib", "transformers"}
    assert "vllm" in report["skipped"] and "does not exist" in report["skipped"]["vllm"]
    assert rows["transformers"]["greedy_tokens_equal_to_apexlib"] == "3/3"
    assert all(row["output_tok_s_median"] > 0 for row in rows.values())
    shares = report["apexlib_time_shares"]
    assert set(shares) == {"linear", "attention", "sampling", "scheduling", "update", "other", "wall_s"}
    assert 0.99 <= sum(v for k, v in shares.items() if k != "wall_s") <= 1.01
    assert shares["linear"] > 0 and shares["attention"] > 0
    limit = report["machine_limit"]
    # the limit is of apexlib's own iterations: one prefill of the 3 prompts, then 7 decode steps of 3
    assert limit["iterations"] == 8 and limit["dram_read_gbps"] > 0
    assert set(limit["gemm_alone_s"]) == {"48x3", "3x3"}
    assert limit["roofline_s"] >= limit["iterations"] * limit["weights_stream_s"]
    assert limit["apexlib_fraction_of_roofline"] == pytest.approx(
        rows["apexlib"]["output_tok_s_median"] / limit["roofline_output_tok_s"])
    written = json.loads(open(report["path"]).read())
    assert written["settings"]["block_size"] == 32 and written["cpu_model"]
    assert "transformers" in format_report(report)


def test_e2e_settings_name_the_field():
    with pytest.raises(ValueError, match="repeats must be an int >= 1"):
        E2ESettings(repeats=0)
    with pytest.raises(ValueError, match="dtype must be"):
        E2ESettings(dtype="int8")


def test_linear_probe_runs_the_engines_gemms_and_the_roofline_takes_the_larger_term():
    import torch

    from apexlib.bench.linear_roofline import (
        LinearProbe,
        StepShape,
        layer_linear_shapes,
        roofline_seconds,
        weight_bytes,
    )
    from apexlib.core.models import model_config_for_shape

    config = model_config_for_shape("smollm2")
    assert layer_linear_shapes(config) == [(576, 576 + 2 * 192), (576, 576), (576, 2 * 1536), (1536, 576)]
    # 30 layers of projections plus the (tied) LM head, in fp32: the 538 MB the checkpoint holds, less norms
    assert weight_bytes(config, torch.float32) == 4 * (30 * (576 * 960 + 576 * 576 + 576 * 3072 + 1536 * 576)
                                                       + 49152 * 576)
    tiny = model_config_for_shape("tiny-demo")
    probe = LinearProbe(tiny, torch.float32)
    assert len(probe.layers) == tiny.num_layers and probe.time(StepShape(4, 2), repeats=1) > 0
    steps = [StepShape(8, 2), StepShape(2, 2), StepShape(2, 2)]
    gemm = {StepShape(8, 2): 0.5, StepShape(2, 2): 0.1}
    assert roofline_seconds(steps, gemm, stream_seconds=0.2) == pytest.approx(0.5 + 0.2 + 0.2)


def test_bf16_disagreements_are_checked_against_an_fp32_reference(tmp_path):
    from apexlib.bench.e2e import e2e_workload, near_tie_check
    from apexlib.core.config import ModelConfig
    from apexlib.core.models import special_token_ids
    from apexlib.model.catalog import resolve_checkpoint

    path = resolve_checkpoint("bench512")
    config = ModelConfig.from_pretrained(path)
    settings = E2ESettings(num_requests=2, prompt_len=8, output_len=4, model="bench512")
    workload = e2e_workload(settings, config.vocab_size, special_token_ids(path, config.vocab_size))
    first, second = (r.request_id for r in workload.requests)
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt = list(workload.requests[1].prompt_token_ids)
    with torch.inference_mode():
        logits = model(torch.tensor([prompt])).logits[0, -1]
    best, worst = int(torch.argmax(logits)), int(torch.argmin(logits))
    reference = {first: (5, 6, 7, 8), second: (best, 1, 1, 1)}
    other = {first: (5, 6, 7, 8), second: (worst, 1, 1, 1)}
    checks = near_tie_check(path, workload, reference, other)
    assert len(checks) == 1 and checks[0]["position"] == 0 and checks[0]["fp32_top_token"] == best
    assert checks[0]["fp32_logit_gap"] > 1.0 and not checks[0]["near_tie"]
    assert near_tie_check(path, workload, reference, dict(reference)) == []


def test_native_dtypes_follow_the_cpu_flags():
    from apexlib.bench.e2e import native_dtypes

    assert native_dtypes(["avx2", "fma"]) == ("float32",)
    assert native_dtypes(["avx512f", "avx512_bf16"]) == ("float32", "bfloat16")
    assert native_dtypes(["amx_bf16"]) == ("float32", "bfloat16")
