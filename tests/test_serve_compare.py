"""apex bench serve-compare: starts apex serve as a subprocess, sends the same workload to it and to the engine
in-process, writes one results directory with the HTTP-over-engine tokens/s ratio."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from apexlib.bench.serve_compare import CompareSettings, apex_server_command, vllm_server_command

pytestmark = pytest.mark.timeout(600)


def test_serve_compare_runs_servers_and_engine_on_one_workload(tiny_path, tmp_path):
    from apexlib.cli import main

    model = str(tiny_path("gqa"))
    code = main(["bench", "serve-compare", "--model", model, "--servers", "apexlib", "apexlib-thread", "apexlib-engine",
                 "--workload", "tiny-online", "--num-requests", "4", "--rate", "0", "--block-size", "8",
                 "--max-model-len", "256", "--warmup", "1", "--out", str(tmp_path), "--experiment", "cmp",
                 "--lock", str(tmp_path / "lock")])
    assert code == 0
    rows = pd.read_csv(tmp_path / "cmp" / "rows.csv")
    summary = rows[rows["row_type"] == "summary"]
    assert sorted(summary["engine"]) == ["apexlib", "apexlib-serve", "apexlib-thread-serve"]
    assert set(summary["block_size"]) == {8} and (summary["completed"] == 4).all()
    assert summary["ttft_p99_s"].notna().all() and summary["tpot_p99_s"].notna().all()
    report = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    for key in ("http_over_engine_tokens_per_s", "http_engine_thread_over_engine_tokens_per_s"):
        assert set(report[key]) == {"all"}
        for entry in report[key].values():
            assert entry["ratio"] == pytest.approx(entry["server_tok_s"] / entry["reference_tok_s"])
    assert "--block-size 8" in report["server_commands"]["apexlib"] and report["cpu_model"]
    assert report["command"].startswith("apex bench serve-compare --model ")
    assert report["server_commands"]["apexlib-thread"].endswith("--engine-thread")


def test_server_commands_pass_the_same_settings():
    settings = CompareSettings(model="/m", block_size=32, max_model_len=512)
    apex, vllm = apex_server_command(settings, 1), vllm_server_command(settings, 2, "/venv/bin/python")
    for command in (apex, vllm):
        for flag, value in (("--block-size", "32"), ("--max-model-len", "512"), ("--dtype", "float32")):
            assert command[command.index(flag) + 1] == value
    assert "--skip-tokenizer-init" in vllm and "--enforce-eager" in vllm


def test_compare_settings_name_bad_fields():
    with pytest.raises(ValueError, match="engines"):
        CompareSettings(model="/m", engines=("sglang",))
    with pytest.raises(ValueError, match="rates"):
        CompareSettings(model="/m", rates=(-1.0,))
