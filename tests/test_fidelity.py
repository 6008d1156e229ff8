"""The simulator against the real engine: same workload, same policies, profiles of this machine measured
in the same test, throughput and mean TPOT within 10%, on the real model (SmolLM2-135M-Instruct, whose
538 MB of fp32 weights stream from DRAM every step instead of sitting in a shared last-level cache).

This is a measurement, on whatever machine runs the tests. The profile and the engine runs interleave
(profile, run each policy, re-profile, run again, ...) and each round is compared with the simulator on
the profile measured right before it, so the machine's drift from one minute to the next moves both
sides; the reported error is the median over the rounds. The failure message lists every round's errors,
each round's profile level against the first and the machine's steadiness (``machine_drift``) right after.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from apexlib.bench.fidelity import fidelity, machine_drift
from apexlib.costs import TableCostModel
from apexlib.engine.settings import BenchmarkSettings
from apexlib.profiling.profiler import ProfileSettings, profile_model
from apexlib.workloads import get_preset

TOLERANCE = 0.10  # relative error of output throughput and mean TPOT, per policy
POLICIES = ("gpu_only", "neo", "apex")
ROUNDS = 3  # profile + one engine run per policy, each
#: the quick grid, with decode batches reaching the CPU tier's batch of the workload below
GRID = {"decode_batches": (1, 4, 16, 32), "hybrid_cpu_batches": (2, 8, 16, 32)}


def measure_profile() -> TableCostModel:
    """A profile of the real model on this machine, over the range the workload below covers."""
    return TableCostModel(profile_model(ProfileSettings(model="smollm2", device="cpu", quick=True, grid=GRID,
                                                        progress=False)))


@pytest.mark.slow
@pytest.mark.timeout(3600)  # 3 profiles and 9 engine runs of a 30-layer model: past the suite's 600 s on 2 cores
def test_simulator_matches_the_engine_within_tolerance():
    workload = get_preset("tiny-decode-heavy", num_requests=32)
    settings = BenchmarkSettings.create(model="smollm2", device="cpu", dtype="float32", num_gpu_blocks=24,
                                        num_cpu_blocks=2048, warmup_requests=2)
    table = fidelity(workload, settings, measure_profile, policies=list(POLICIES), repeats=ROUNDS)
    # the simulator and the engine took the same decisions: the comparison is of time alone
    assert (table["engine_iterations"] == table["sim_iterations"]).all(), table
    assert (table["engine_mode_counts"] == table["sim_mode_counts"]).all(), table
    errors = table.set_index("policy")[["error_output_throughput", "error_tpot_mean_s",
                                        "error_output_throughput_rounds", "error_tpot_mean_s_rounds",
                                        "profile_linear_drift_rounds", "load_average_1min"]]
    print(errors.to_string())  # the measurement, shown with -s whether it passes or not
    worst = errors[["error_output_throughput", "error_tpot_mean_s"]].abs().to_numpy().max()
    if worst > TOLERANCE:
        drift = machine_drift(seconds=10.0)
        steadiness = "; ".join(f"{name}: {d['min_us']:.1f}-{d['max_us']:.1f} us per op (x{d['spread']:.2f})"
                               for name, d in drift.items())
        pytest.fail(f"simulator vs engine beyond {TOLERANCE:.0%}:\n{errors.to_string()}\nthis machine's speed "
                    f"right after (machine_drift, 10 s, a fixed single-thread load): {steadiness}")


def test_interleaved_fidelity_measures_a_profile_before_every_round_and_compares_with_it():
    """The profile function runs once per round; each round's errors are against that round's profile."""
    committed = sorted(Path(__file__).resolve().parents[1].glob("data/profiles/cpu-*-tiny-demo.json"))[0]
    profile = json.loads(committed.read_text())
    calls = []

    def measure() -> TableCostModel:
        calls.append(len(calls))
        scaled = json.loads(json.dumps(profile))  # the second round's machine is 4x slower at linear work
        scaled["tables"]["linear"]["seconds"] = [s * 4 ** (len(calls) - 1) for s in scaled["tables"]["linear"]["seconds"]]
        return TableCostModel(scaled)

    workload = get_preset("tiny-decode-heavy", num_requests=4)
    settings = BenchmarkSettings.create(model="demo", device="cpu", dtype="float32", num_gpu_blocks=24,
                                        num_cpu_blocks=256, warmup_requests=0)
    table = fidelity(workload, settings, measure, policies=["gpu_only", "apex"], repeats=2)
    assert calls == [0, 1]
    for _, row in table.iterrows():
        assert row["profiles"] == 2 and row["engine_runs"] == 2
        assert json.loads(row["profile_linear_drift_rounds"]) == [1.0, 4.0]
        rounds = json.loads(row["error_output_throughput_rounds"])
        # the slower profile predicts less throughput for the same engine speed
        assert len(rounds) == 2 and rounds[1] < rounds[0]
        assert row["error_output_throughput"] == pytest.approx(sum(rounds) / 2, abs=1e-4)


def test_machine_drift_times_both_forms():
    drift = machine_drift(seconds=0.0, interval=0.0)  # one sample of each form
    assert set(drift) == {"llc", "core"}
    for form in drift.values():
        assert len(form["op_us"]) == 1 and 0 < form["min_us"] <= form["median_us"] <= form["max_us"]
        assert form["spread"] >= 1.0
