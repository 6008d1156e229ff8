"""The simulator (apexlib.sim): the engine's scheduler and policies on a virtual clock. CPU only, fast."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from apexlib.core.models import model_config_for_shape
from apexlib.core.models import model_config_for_shape as _shape_config
from apexlib.costs import ModelShape as _ModelShape
from apexlib.costs import RooflineCostModel, ZeroCostModel
from apexlib.costs.hardware import get_hardware
from apexlib.sim import simulate
from apexlib.workloads import get_preset

LLAMA2_7B = _ModelShape.from_config(_shape_config("llama-2-7b"))

# Columns the simulator adds to the real runner's rows.
SIMULATOR_COLUMNS = {"executor", "cost_model", "cost_model_hardware", "cost_model_source"}


class ConstantOverheadModel(ZeroCostModel):
    """Every subtask is free except a fixed launch overhead per iteration."""

    source = "constant overhead (test)"

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def launch_overhead(self) -> float:
        return self.seconds


@pytest.fixture(scope="module")
def t4_llama2():
    return RooflineCostModel(get_hardware("t4"), LLAMA2_7B, "float16")


def test_sim_path_imports_no_torch():
    code = (
        "import sys\n"
        "from apexlib.sim import simulate\n"
        "from apexlib.workloads import get_preset\n"
        "from apexlib.core.models import model_config_for_shape\n"
        "from apexlib.costs import ModelShape, RooflineCostModel\n"
        "from apexlib.costs.hardware import get_hardware\n"
        "shape = ModelShape.from_config(model_config_for_shape('llama-2-7b'))\n"
        "cost = RooflineCostModel(get_hardware('t4'), shape, 'float16')\n"
        "for policy in ('gpu_only', 'hybrid', 'neo', 'apex'):\n"
        "    simulate(get_preset('t4-decode-heavy', num_requests=6, arrival='offline'), model='llama-2-7b',\n"
        "             policy=policy, cost_model=cost, gpu_kv_gib=0.5, cpu_kv_gib=2.0)\n"
        "assert 'torch' not in sys.modules, 'the simulator imported torch'\n"
        "print('ok')\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "ok"


def test_deterministic_for_a_seed(t4_llama2):
    workload = get_preset("t4-decode-heavy", num_requests=24, rate=2.0)
    runs = [simulate(workload, model="llama-2-7b", policy="apex", cost_model=t4_llama2, gpu_kv_gib=0.5,
                     cpu_kv_gib=4.0) for _ in range(2)]
    first, second = ([{k: v for k, v in row.items() if k != "date_utc"} for row in run.rows] for run in runs)
    assert first == second
    assert runs[0].iterations.columns == runs[1].iterations.columns


def test_virtual_time_is_iterations_times_overhead():
    overhead = 1e-3
    result = simulate(get_preset("tiny-decode-heavy", num_requests=12), model="tiny-demo", policy="gpu_only",
                      cost_model=ConstantOverheadModel(overhead), device="cpu", dtype="float32")
    iterations = result.provenance["engine_iterations"]
    assert iterations == len(result.iterations) > 0
    assert result.extra["virtual_time_s"] == pytest.approx(iterations * overhead)
    assert result.summary.duration_s == pytest.approx(iterations * overhead)
    # every token is produced at the end of an iteration
    for record in result.records:
        for time in record.token_times:
            assert time / overhead == pytest.approx(round(time / overhead))
    trace = result.iterations.to_dataframe()
    assert (trace["duration"] == overhead).all()
    assert trace["start"].iloc[-1] + overhead == pytest.approx(result.extra["virtual_time_s"])


class StepOverheadModel(ConstantOverheadModel):
    """ConstantOverheadModel plus a measured-style engine step overhead per sequence."""

    def engine_step_overhead(self, num_sequences: int) -> float:
        return 1e-4 * num_sequences


def test_engine_step_overhead_is_added_between_iterations():
    overhead = 1e-3
    workload = get_preset("tiny-decode-heavy", num_requests=12)
    base = simulate(workload, model="tiny-demo", policy="gpu_only", cost_model=ConstantOverheadModel(overhead),
                    device="cpu", dtype="float32")
    result = simulate(workload, model="tiny-demo", policy="gpu_only", cost_model=StepOverheadModel(overhead),
                      device="cpu", dtype="float32")
    trace = result.iterations.to_dataframe()
    assert len(trace) == len(base.iterations)  # same decisions
    sequences = (trace["num_prefills"] + trace["num_gpu_decodes"] + trace["num_cpu_decodes"]).sum()
    assert result.extra["virtual_time_s"] == pytest.approx(len(trace) * overhead + 1e-4 * sequences)
    assert (trace["scheduler_seconds"] > 0).all()


def test_online_arrivals_are_respected(t4_llama2):
    # Sparse arrivals: the clock jumps over idle gaps, and no request is scheduled before it arrives.
    workload = get_preset("t4-decode-heavy", num_requests=30, rate=0.05)
    result = simulate(workload, model="llama-2-7b", policy="gpu_only", cost_model=t4_llama2, gpu_kv_gib=1.0)
    assert result.provenance["mode"] == "online" and result.provenance["rate"] == 0.05
    arrivals = {request.request_id: request.arrival_time for request in workload.requests}
    for record in result.records:
        assert record.arrival_time == pytest.approx(arrivals[record.request_id])
        assert record.first_scheduled_time >= record.arrival_time
        assert record.first_token_time > record.first_scheduled_time
    first = min(result.records, key=lambda record: record.arrival_time)
    assert first.first_scheduled_time == pytest.approx(first.arrival_time)
    # idle gaps are not iterations: virtual time is the last arrival plus the tail, not iterations x step
    trace = result.iterations.to_dataframe()
    assert trace["duration"].sum() < result.extra["virtual_time_s"]


def test_same_decisions_as_the_real_engine(tiny_path):
    """The plans are the scheduler's, so the simulator and the engine make the same ones."""
    from apexlib.bench.benchmark import run_benchmark
    from apexlib.engine.settings import BenchmarkSettings

    path = str(tiny_path("gqa"))
    workload = get_preset("tiny-decode-heavy", num_requests=12, seed=3)
    settings = BenchmarkSettings.create(model=path, device="cpu", num_gpu_blocks=24, warmup_requests=0)
    engine = run_benchmark(workload, settings, progress=False)
    sim = simulate(workload, model=path, policy="gpu_only", cost_model=ConstantOverheadModel(1e-3),
                   num_gpu_blocks=24, device="cpu", dtype="auto")
    assert engine.provenance["engine_preemptions"] > 0, "the squeezed budget should preempt"
    for column in ("engine_iterations", "engine_preemptions", "engine_mode_counts", "num_gpu_blocks",
                   "num_cpu_blocks", "max_model_len", "max_num_batched_tokens", "dtype", "model_config_sha256"):
        assert sim.provenance[column] == engine.provenance[column], column
    engine_records = {record.request_id: record for record in engine.records}
    for record in sim.records:
        twin = engine_records[record.request_id]
        assert len(record.output_token_ids) == len(twin.output_token_ids)
        assert record.num_preemptions == twin.num_preemptions
    # the same rows, plus the simulator's columns
    engine_columns, sim_columns = set(engine.rows[0]), set(sim.rows[0])
    assert engine_columns <= sim_columns
    assert sim_columns - engine_columns == SIMULATOR_COLUMNS - engine_columns
    assert set(engine.rows[-1]) <= set(sim.rows[-1])
    assert sim.rows[0]["executor"] == "simulator"


def test_policy_comparison_on_a_t4_shaped_roofline(t4_llama2):
    """Llama-2-7B fp16 on a T4 roofline, GPU KV capped at ~2 GiB, decode-heavy: apex >= gpu_only."""
    workload = get_preset("t4-decode-heavy", num_requests=100, arrival="offline")
    results = {policy: simulate(workload, model="llama-2-7b", policy=policy, cost_model=t4_llama2, gpu_kv_gib=2.0,
                                cpu_kv_gib=20.0)
               for policy in ("gpu_only", "neo", "apex")}
    throughput = {policy: result.summary.output_throughput for policy, result in results.items()}
    sys.stderr.write(f"T4 roofline, Llama-2-7B, 100 t4-decode-heavy requests: output tok/s {throughput}\n")
    assert throughput["apex"] >= throughput["gpu_only"]
    apex = results["apex"]
    modes = json.loads(apex.provenance["engine_mode_counts"])
    assert set(modes) - {"none"}, "apex should run CPU decodes on a T4-sized KV budget"
    assert apex.provenance["gpu_names"] == "T4 (g4dn.4xlarge)" and "T4 datasheet" in apex.provenance["cost_model_source"]


def test_iteration_trace_matches_the_run(t4_llama2):
    result = simulate(get_preset("t4-decode-heavy", num_requests=20, arrival="offline"), model="llama-2-7b",
                      policy="apex", cost_model=t4_llama2, gpu_kv_gib=0.5, cpu_kv_gib=4.0)
    trace = result.iterations.to_dataframe()
    assert len(trace) == result.provenance["engine_iterations"]
    assert trace["duration"].sum() == pytest.approx(result.extra["virtual_time_s"])
    assert trace["mode"].value_counts().to_dict() == json.loads(result.provenance["engine_mode_counts"])
    cpu = trace[trace["num_cpu_decodes"] > 0]
    assert len(cpu) > 0 and (cpu["predicted_cpu_attention"] > 0).all() and (cpu["predicted_transfer"] > 0).all()
    assert trace["policy_predicted_total"].notna().all()  # apex predicts every plan
    assert trace["num_cpu_decodes"].sum() == result.extra["stats"]["cpu_decode_tokens"]
    records = result.iterations.records()
    assert records[0]["iteration"] == 0 and set(records[0]) == set(trace.columns)


def test_device_kind_cpu_moves_no_bytes(t4_llama2):
    workload = get_preset("t4-decode-heavy", num_requests=8, arrival="offline")
    cuda = simulate(workload, model="llama-2-7b", policy="hybrid", cost_model=t4_llama2, gpu_kv_gib=0.5,
                    cpu_kv_gib=2.0)
    cpu = simulate(workload, model="llama-2-7b", policy="hybrid", cost_model=t4_llama2, gpu_kv_gib=0.5,
                   cpu_kv_gib=2.0, device="cpu")
    assert cuda.extra["transfer_bytes_per_cpu_token"] == sum(LLAMA2_7B.cpu_token_transfer_bytes("float16"))
    assert cpu.extra["transfer_bytes_per_cpu_token"] == 0
    # only KV swaps move bytes with device=cpu (a host memcpy between the tiers' pools): no q/k/v copies
    trace = cpu.iterations.to_dataframe()
    no_swaps = trace[(trace["num_swap_out_blocks"] == 0) & (trace["num_swap_in_blocks"] == 0)]
    assert (no_swaps["num_cpu_decodes"] > 0).any() and (no_swaps["predicted_transfer"] == 0).all()
    assert cpu.summary.output_throughput >= cuda.summary.output_throughput


def test_model_shapes_and_gpu_sizing(t4_llama2):
    llama2, llama3 = model_config_for_shape("llama-2-7b"), model_config_for_shape("Llama-3.1-8B")
    assert llama2.kv_bytes_per_token("float16") == 512 * 1024
    assert llama3.kv_bytes_per_token("bfloat16") == 128 * 1024
    assert (llama3.num_kv_heads, llama3.vocab_size, llama3.max_position_embeddings) == (8, 128256, 131072)
    with pytest.raises(ValueError, match="unknown model shape"):
        model_config_for_shape("gpt-2")
    # No budget on a datasheet GPU: sized like the engine (memory - weights - activation reserve) x 0.9.
    result = simulate(get_preset("t4-decode-heavy", num_requests=4, arrival="offline"), model="llama-2-7b",
                      policy="gpu_only", cost_model=t4_llama2)
    blocks = result.provenance["num_gpu_blocks"]
    kv_gib = blocks * 16 * 512 * 1024 / 1024**3
    assert 0.5 < kv_gib < 2.0, kv_gib


def test_cli_simulate_writes_rows_and_iterations(tmp_path, capsys):
    from apexlib.cli import main

    code = main(["simulate", "--policy", "gpu_only", "apex", "--workload", "t4-decode-heavy", "--model",
                 "llama-2-7b", "--cost-model", "roofline:t4", "--gpu-kv-gib", "0.5", "--cpu-kv-gib", "4", "--num-requests",
                 "10", "--rate", "0", "--out", str(tmp_path), "--experiment", "sim-test"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "output tok/s" in printed and "apex simulate" in printed
    rows = pd.read_csv(tmp_path / "sim-test" / "rows.csv")
    assert set(rows["executor"]) == {"simulator"} and set(rows["policy"]) == {"gpu_only", "apex"}
    assert (rows["row_type"] == "summary").sum() == 2
    iterations = pd.read_csv(tmp_path / "sim-test" / "iterations.csv")
    assert set(iterations["policy"]) == {"gpu_only", "apex"} and len(iterations) == rows.groupby("policy")[
        "engine_iterations"].first().sum()


def test_cli_simulate_from_a_datasheet_profile_matches_hardware(tmp_path):
    from apexlib.cli import main

    common = ["simulate", "--policy", "apex", "--workload", "t4-decode-heavy", "--model", "llama-2-7b",
              "--gpu-kv-gib", "0.5", "--cpu-kv-gib", "4", "--num-requests", "10", "--rate", "0"]
    profile = Path(__file__).resolve().parents[1] / "data" / "profiles" / "datasheet-t4.json"
    assert main([*common, "--cost-model", str(profile), "--out", str(tmp_path), "--experiment", "a"]) == 0
    assert main([*common, "--cost-model", "roofline:t4", "--out", str(tmp_path), "--experiment", "b"]) == 0
    columns = ["output_throughput", "engine_iterations", "duration_s"]
    first, second = (pd.read_csv(tmp_path / name / "rows.csv").query("row_type == 'summary'")[columns]
                     for name in ("a", "b"))
    assert first.to_dict("records") == second.to_dict("records")
