"""The profiler on the tiny 'gqa' checkpoint (CPU): every section and provenance field, loadable, checkable."""

from __future__ import annotations

import json
import math

import pytest

from apexlib.costs import IterationShape, TableCostModel, predict_iteration
from apexlib.engine.args import EngineArgs
from apexlib.profiling.accuracy import accuracy_report, default_workload
from apexlib.profiling.profiler import ProfileSettings, profile_model, write_profile


@pytest.fixture(scope="module")
def quick_profile(tiny_path):
    settings = ProfileSettings(model=str(tiny_path("gqa")), device="cpu", dtype="float32", quick=True,
                               repetitions=5, warmup=1, progress=False)
    return profile_model(settings)


def test_quick_profile_sections_and_provenance(quick_profile, tmp_path):
    path = write_profile(quick_profile, tmp_path / "gqa.json")
    profile = json.loads(path.read_text())
    assert profile["schema"] == "apexlib.profile/1" and "device=cpu" in profile["label"]
    for key in ("date_utc", "git_commit", "device", "device_name", "cpu_model", "cpu_count", "torch", "cuda",
                "torch_threads", "cpu_attention_threads", "repetitions"):
        assert key in profile["provenance"], key
    assert profile["provenance"]["repetitions"] >= 5
    assert profile["model"]["dtype"] == "float32" and profile["model_shape"]["num_kv_heads"] == 2
    tables = profile["tables"]
    for name in ("linear", "sample", "gpu_prefill_attention", "gpu_decode_attention", "cpu_decode_attention",
                 "transfer", "launch_overhead", "hybrid_calibration", "engine_step_overhead"):
        assert name in tables, name
    assert all(s > 0 for s in tables["linear"]["seconds"])
    assert tables["cpu_decode_attention"]["model"] in ("grid", "fit")
    assert all(s > 0 for row in tables["cpu_decode_attention"]["seconds"] for s in row)
    assert set(tables["hybrid_calibration"]["modes"]) == {"async_overlap", "asymmetric_pipeline"}
    model = TableCostModel.from_file(path)
    shape = IterationShape(mode="async_overlap", prefill_lengths=(20,), gpu_decode_kv_tokens=200, num_gpu_decodes=4,
                           cpu_decode_kv_tokens=300, num_cpu_decodes=4)
    assert predict_iteration(model, shape).total > 0


def test_accuracy_report_runs(quick_profile, tiny_path):
    args = EngineArgs(model=str(tiny_path("gqa")), device="cpu", dtype="float32", policy="hybrid",
                      policy_options={"hybrid_mode": "async_overlap"}, num_gpu_blocks=16, num_cpu_blocks=256, max_model_len=256,
                      profile_subtasks=True)
    report = accuracy_report(args, TableCostModel(quick_profile), default_workload(6, max_prompt=64, max_output=16))
    assert report["all"]["iterations"] > 5 and "async_overlap" in report["by_mode"]
    for stats in report["by_mode"].values():
        assert math.isfinite(stats["median_relative_error"]) and math.isfinite(stats["p90_relative_error"])
        assert 0 <= stats["median_prediction_overhead_fraction"] < 1
