"""`apex bench e2e`: the three engines on one checkpoint and the same prompts; here apexlib and
transformers (vLLM skips with its reason where its venv is absent), a small workload."""

from __future__ import annotations

import json

import pytest

from apexlib.bench.e2e import E2ESettings, format_report, run_e2e


def test_e2e_runs_agrees_and_says_where_the_time_goes(tmp_path):
    report = run_e2e(E2ESettings(num_requests=3, prompt_len=16, output_len=8, repeats=1,
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
    written = json.loads(open(report["path"]).read())
    assert written["settings"]["block_size"] == 32 and written["cpu_model"]
    assert "transformers" in format_report(report)


def test_e2e_settings_name_the_field():
    with pytest.raises(ValueError, match="repeats must be an int >= 1"):
        E2ESettings(repeats=0)
    with pytest.raises(ValueError, match="dtype must be"):
        E2ESettings(dtype="int8")
