"""The engine benchmark runner (apexlib.bench.benchmark) and `apex bench` on tiny checkpoints, CPU only."""

from __future__ import annotations

import json
import math
import sys
import types

import pandas as pd
import pytest

from apexlib.bench.benchmark import load_workload, run_benchmark
from apexlib.cli import main
from apexlib.core.models import special_token_ids
from apexlib.core.results import PROVENANCE_COLUMNS, write_results
from apexlib.engine.settings import BenchmarkSettings
from apexlib.workloads import get_preset

# Provenance columns that must be known on every machine (the GPU / CUDA ones are None on a CPU box).
ALWAYS_KNOWN = tuple(column for column in PROVENANCE_COLUMNS
                     if column not in ("gpu_names", "cuda_version", "rate", "git_commit", "engine_preemptions"))


@pytest.fixture(scope="module")
def gqa_settings(tiny_path):
    return BenchmarkSettings.create(model=str(tiny_path("gqa")), device="cpu", warmup_requests=1)


@pytest.fixture(scope="module")
def offline_result(gqa_settings):
    return run_benchmark(get_preset("tiny-smoke", num_requests=6), gqa_settings, progress=False)


def test_rows_carry_every_provenance_field(offline_result):
    rows = offline_result.rows
    assert [row["row_type"] for row in rows] == ["request"] * 6 + ["summary"]
    for row in rows:
        for column in PROVENANCE_COLUMNS:
            assert column in row, column
        for column in ALWAYS_KNOWN:
            assert row[column] is not None, column
    first = rows[0]
    assert first["engine"] == "apexlib" and first["policy"] == "gpu_only" and first["mode"] == "offline"
    assert first["workload"] == "tiny-smoke" and first["workload_seed"] == 0
    assert first["device"] == "cpu" and first["dtype"] == "float32" and first["block_size"] == 16
    assert first["cpu_count"] >= 1 and first["torch_version"] and first["date_utc"].endswith("+00:00")
    assert len(first["model_config_sha256"]) == 16
    assert first["engine_iterations"] > 0 and first["engine_preemptions"] == 0
    assert json.loads(first["engine_mode_counts"]) == {"none": first["engine_iterations"]}


def test_output_lengths_are_exact_and_prompts_avoid_special_ids(offline_result, gqa_settings):
    workload = get_preset("tiny-smoke", num_requests=6)
    wanted = {request.request_id: request for request in workload.requests}
    special = set(special_token_ids(gqa_settings.engine.model, 512))
    assert {0, 1, 2, 3} <= special
    for record in offline_result.records:
        assert len(record.output_token_ids) == wanted[record.request_id].output_len
        assert record.prompt_len == wanted[record.request_id].prompt_len
        assert len(record.token_times) == len(record.output_token_ids)
    for row in offline_result.request_rows():
        assert row["output_len"] == wanted[row["request_id"]].output_len


def test_summary_is_consistent_with_the_rows(offline_result):
    requests = pd.DataFrame(offline_result.request_rows())
    summary = offline_result.summary_row()
    assert summary["completed"] == len(requests) == 6
    assert summary["total_output_tokens"] == requests["output_len"].sum()
    assert summary["total_prompt_tokens"] == requests["prompt_len"].sum()
    duration = requests["finish_time"].max() - requests["arrival_time"].min()
    assert summary["duration_s"] == pytest.approx(duration)
    assert summary["output_throughput"] == pytest.approx(requests["output_len"].sum() / duration)
    assert summary["ttft_mean_s"] == pytest.approx(requests["ttft_s"].mean())
    assert summary["ttft_median_s"] == pytest.approx(requests["ttft_s"].median())
    assert summary["e2e_latency_p99_s"] == pytest.approx(requests["e2e_latency_s"].quantile(0.99))
    assert summary["tpot_mean_s"] == pytest.approx(requests["tpot_s"].mean())
    # offline: everything arrives at the start
    assert (requests["arrival_time"] == 0).all()


def test_online_mode_delays_arrivals(gqa_settings):
    workload = load_workload("tiny-smoke", num_requests=4, rate=5.0, arrival="fixed")  # every 0.2 s
    result = run_benchmark(workload, gqa_settings, progress=False)
    assert result.provenance["mode"] == "online" and result.provenance["arrival"] == "fixed"
    assert result.provenance["rate"] == 5.0
    records = sorted(result.records, key=lambda record: record.arrival_time)
    for index, record in enumerate(records):
        assert record.arrival_time == pytest.approx(0.2 * index, abs=1e-6)
        assert record.first_scheduled_time >= record.arrival_time - 1e-9
        assert record.first_token_time > record.first_scheduled_time
    assert result.wall_time_s >= records[-1].arrival_time
    for timing in result.timings:  # TTFT counts from the scheduled arrival, not from the start
        assert timing.ttft == pytest.approx(timing.first_token_time - timing.arrival_time)
    assert records[-1].first_token_time - records[-1].arrival_time < records[-1].first_token_time


def test_squeezed_kv_budget_preempts_and_keeps_exact_lengths(tiny_path):
    settings = BenchmarkSettings.create(model=str(tiny_path("gqa")), device="cpu", num_gpu_blocks=16, warmup_requests=0)
    workload = get_preset("tiny-decode-heavy", num_requests=8)
    result = run_benchmark(workload, settings, progress=False)
    assert result.provenance["num_gpu_blocks"] == 16
    assert result.provenance["engine_preemptions"] > 0
    assert result.provenance["max_model_len"] >= workload.max_total_len
    for record, request in zip(result.records, workload.requests, strict=True):
        assert len(record.output_token_ids) == request.output_len
        assert len(record.token_times) == request.output_len


def test_csv_and_parquet_are_written_and_readable(offline_result, tmp_path):
    directory = write_results([offline_result], tmp_path, "unit-test")
    assert directory == tmp_path / "unit-test"
    frame = pd.read_csv(directory / "rows.csv")
    assert len(frame) == 7 and list(frame["row_type"]).count("summary") == 1
    assert set(PROVENANCE_COLUMNS) <= set(frame.columns)
    summary = frame[frame["row_type"] == "summary"].iloc[0]
    assert math.isclose(summary["output_throughput"], offline_result.summary.output_throughput)
    parquet = pd.read_parquet(directory / "rows.parquet")
    assert len(parquet) == 7
    meta = json.loads((directory / "meta.json").read_text())
    assert meta["experiment"] == "unit-test" and meta["num_rows"] == 7
    assert meta["runs"][0]["provenance"]["run_id"] == offline_result.run_id


def test_jsonl_workload_is_used_as_written(tmp_path):
    path = get_preset("tiny-smoke", num_requests=5).to_jsonl(tmp_path / "w.jsonl")
    workload = load_workload(str(path), num_requests=3)
    assert len(workload) == 3 and workload.name == "tiny-smoke"
    with pytest.raises(ValueError, match="presets only"):
        load_workload(str(path), rate=2.0)
    with pytest.raises(FileNotFoundError, match="neither a preset"):
        load_workload(str(tmp_path / "missing.jsonl"))


def test_cli_bench_runs_and_writes_rows(tmp_path, capsys):
    assert main(["bench", "--workload", "tiny-smoke", "--num-requests", "4", "--out", str(tmp_path),
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "output tok/s" in out and "TTFT median (ms)" in out
    csvs = list(tmp_path.glob("*/rows.csv"))
    assert len(csvs) == 1
    frame = pd.read_csv(csvs[0])
    assert len(frame) == 5 and frame["model_path"].str.contains("demo").all()


def test_cli_bench_goodput_is_vllms_good_requests_per_second(tmp_path, capsys):
    # A TTFT bound no request can miss and a TPOT bound none can meet: every request good, then none.
    for items, good in ((["ttft:1000000"], 4), (["ttft:1000000", "tpot:0.000001"], 0)):
        assert main(["bench", "--workload", "tiny-smoke", "--num-requests", "4", "--out", str(tmp_path),
                     "--experiment", f"g{good}", "--no-progress", "--goodput", *items]) == 0
        assert "request goodput (req/s)" in capsys.readouterr().out
        rows = pd.read_csv(tmp_path / f"g{good}" / "rows.csv")
        summary = rows[rows["row_type"] == "summary"].iloc[0]
        assert summary["good_completed"] == good and summary["slo_ttft_s"] == 1000.0
        assert summary["request_goodput"] == pytest.approx(good / summary["duration_s"])
    assert main(["bench", "--workload", "tiny-smoke", "--goodput", "ttfb:5"]) == 2  # before anything runs
    assert "KEY one of" in capsys.readouterr().err


def test_cli_bench_cpu_attention_still_dispatches(monkeypatch):
    seen = {}
    fake = types.ModuleType("apexlib.bench.cpu_attention")

    def fake_main(argv):
        seen["argv"] = argv
        return 0

    fake.main = fake_main
    monkeypatch.setitem(sys.modules, "apexlib.bench.cpu_attention", fake)
    assert main(["bench", "cpu-attention", "--quick", "--dtype", "float16"]) == 0
    assert seen["argv"] == ["--quick", "--dtype", "float16"]
