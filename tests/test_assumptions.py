"""The assumption ranges behind the simulated figures, the scenario corners, the SLO throughput rule and
the process-pool grid runner."""

from __future__ import annotations

import dataclasses

import pytest

from apexlib.core.metrics import best_within_slo
from apexlib.core.models import model_config_for_shape
from apexlib.costs import (
    ModelShape,
    RooflineCostModel,
    datasheet_profile_path,
    load_cost_model,
)
from apexlib.costs.assumptions import ASSUMPTIONS, SCENARIOS, Assumption, assumption, scenario_cost_model
from apexlib.costs.hardware import get_hardware
from apexlib.sim.batch import SimulationJob, simulate_rows
from apexlib.sim.simulator import simulate
from apexlib.workloads import get_preset

LLAMA2_7B = ModelShape.from_config(model_config_for_shape("llama-2-7b"))


def test_central_values_are_the_datasheet_profiles():
    """The bar of every simulated figure uses exactly the committed datasheet profile's factors."""
    model = load_cost_model(datasheet_profile_path("t4", "data/profiles"),
                            ModelShape.from_config(model_config_for_shape("llama-2-7b")), "float16")
    for item in ASSUMPTIONS:
        if item.name != "host_dram_factor":
            assert getattr(model, item.name) == pytest.approx(item.central), item.name
    assert scenario_cost_model(model, "central") is model


def test_corners_move_every_assumption_in_its_direction():
    base = RooflineCostModel(get_hardware("t4"), LLAMA2_7B, "float16")
    adverse, friendly = (scenario_cost_model(base, s) for s in ("offload-adverse", "offload-friendly"))
    assert adverse.cpu_attention_efficiency == 0.5 and friendly.cpu_attention_efficiency == 0.9
    assert adverse.memory_efficiency == 0.85 and friendly.memory_efficiency == 0.6  # an efficient GPU hurts offload
    assert adverse.spec.dram_gbps == pytest.approx(base.spec.dram_gbps * 0.67)
    assert friendly.spec.dram_gbps == pytest.approx(base.spec.dram_gbps * 1.33)
    # a slower host makes CPU attention slower; a faster one faster
    assert adverse.cpu_decode_attention(10_000, 8) > base.cpu_decode_attention(10_000, 8) \
        > friendly.cpu_decode_attention(10_000, 8)


def test_bad_ranges_and_names_are_refused():
    with pytest.raises(ValueError, match="low <= central <= high"):
        Assumption("x", 2.0, 1.0, 3.0, "", True, "")
    with pytest.raises(ValueError, match="scenario must be one of"):
        assumption("memory_efficiency").value("optimistic")
    with pytest.raises(ValueError, match="unknown assumption"):
        assumption("nope")
    assert set(SCENARIOS) == {"central", "offload-adverse", "offload-friendly"}


def test_best_within_slo_takes_the_fastest_rate_that_meets_it():
    rows = [{"rate": 0.5, "output_throughput": 100.0, "tpot_p90_s": 0.05},
            {"rate": 1.0, "output_throughput": 180.0, "tpot_p90_s": 0.09},
            {"rate": 2.0, "output_throughput": 220.0, "tpot_p90_s": 0.30},
            {"rate": 4.0, "output_throughput": 230.0, "tpot_p90_s": float("nan")}]
    assert best_within_slo(rows, bound=0.1)["rate"] == 1.0
    assert best_within_slo(rows, bound=0.01) is None
    with pytest.raises(ValueError, match="bound"):
        best_within_slo(rows, bound=0)


def test_pool_rows_equal_serial_rows_in_order():
    cost = RooflineCostModel(get_hardware("t4"), LLAMA2_7B, "float16")
    workload = get_preset("grid-point", prompt_len=64, output_len=32, num_requests=12, seed=0)
    jobs = [SimulationJob(workload, cost, dict(model="llama-2-7b", policy=policy, gpu_kv_gib=0.5, cpu_kv_gib=2.0,
                                               max_model_len=workload.max_total_len), {"label": policy})
            for policy in ("gpu_only", "neo", "neo_published", "apex")]
    pooled = simulate_rows(jobs, workers=2, progress=False)
    serial = simulate_rows(jobs, workers=1, progress=False)
    assert [row["label"] for row in pooled] == ["gpu_only", "neo", "neo_published", "apex"]
    drop = ("date_utc", "wall_time_s", "simulation_seconds", "git_commit")
    assert [{k: v for k, v in r.items() if k not in drop} for r in pooled] == \
        [{k: v for k, v in r.items() if k not in drop} for r in serial]
    direct = simulate(workload, cost_model=cost, record_iterations=False, **jobs[3].options)
    assert pooled[3]["output_throughput"] == direct.summary.output_throughput
    with pytest.raises(ValueError, match="workers"):
        simulate_rows(jobs, workers=0)
    assert dataclasses.is_dataclass(jobs[0])


def test_labels_win_over_the_rows_own_columns():
    """A job labelled policy='apex_slo' keeps that label though the simulated row says policy='apex'."""
    cost = RooflineCostModel(get_hardware("t4"), LLAMA2_7B, "float16")
    workload = get_preset("grid-point", prompt_len=64, output_len=16, num_requests=4, seed=0)
    job = SimulationJob(workload, cost, dict(model="llama-2-7b", policy="apex", gpu_kv_gib=0.5, cpu_kv_gib=2.0,
                                             max_model_len=workload.max_total_len), {"policy": "apex_slo"})
    row = simulate_rows([job], workers=1, progress=False)[0]
    assert row["policy"] == "apex_slo" and next(iter(row)) == "policy"
