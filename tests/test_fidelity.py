"""The simulator against the real engine (issue 7's fidelity bar): same workload, same policies, a
profile of this machine measured in the same test, throughput and mean TPOT within 10%.

This is a measurement, on whatever machine runs the tests: other processes on the cores slow the
engine but not the simulator, and a VM's speed moves by 10-20% from one minute to the next. So each
attempt compares the simulator with the median of three engine runs per policy (the policies
alternating), and the comparison is made up to twice (the second with a profile measured again); it
passes when one attempt has every error within the tolerance; the failure message lists every attempt
with its runs and the load average.
"""

from __future__ import annotations

import pytest

from apexlib.bench.fidelity import fidelity, machine_drift
from apexlib.costs import TableCostModel
from apexlib.engine.settings import BenchmarkSettings
from apexlib.profiling.profiler import ProfileSettings, profile_model
from apexlib.workloads import get_preset

TOLERANCE = 0.10  # relative error of output throughput and mean TPOT, per policy
POLICIES = ("gpu_only", "neo", "apex")
ATTEMPTS = 2
REPEATS = 3  # engine runs per policy and attempt (their median is compared)


def measure_profile() -> TableCostModel:
    """The full-grid profile of the demo model on this machine (~90 s on 2 EPYC cores), as notebook 01 makes it."""
    return TableCostModel(profile_model(ProfileSettings(model="demo", device="cpu", progress=False)))


@pytest.fixture(scope="module")
def demo_profile():
    return measure_profile()


@pytest.mark.slow
def test_simulator_matches_the_engine_within_tolerance(demo_profile):
    workload = get_preset("tiny-decode-heavy", num_requests=32)
    settings = BenchmarkSettings.create(model=None, device="cpu", dtype="float32", num_gpu_blocks=24,
                                 num_cpu_blocks=2048, warmup_requests=2)
    attempts = []
    profile = demo_profile
    for attempt in range(ATTEMPTS):
        if attempt == ATTEMPTS - 1:
            profile = measure_profile()  # the machine may have drifted since the first profile
        table = fidelity(workload, settings, profile, policies=list(POLICIES), repeats=REPEATS)
        errors = table.set_index("policy")[["error_output_throughput", "error_tpot_mean_s",
                                            "engine_output_throughput_runs", "load_average_1min"]]
        attempts.append(errors)
        # the simulator and the engine took the same decisions: the comparison is of time alone
        assert (table["engine_iterations"] == table["sim_iterations"]).all(), table
        assert (table["engine_mode_counts"] == table["sim_mode_counts"]).all(), table
        worst = errors[["error_output_throughput", "error_tpot_mean_s"]].abs().to_numpy().max()
        if worst <= TOLERANCE:
            return
    report = "\n".join(f"attempt {i + 1}:\n{frame.to_string()}" for i, frame in enumerate(attempts))
    drift = machine_drift(seconds=10.0)
    steadiness = "; ".join(f"{name}: {d['min_us']:.1f}-{d['max_us']:.1f} us per op (x{d['spread']:.2f})"
                           for name, d in drift.items())
    pytest.fail(f"simulator vs engine beyond {TOLERANCE:.0%} in every attempt:\n{report}\nthis machine's speed "
                f"right after (machine_drift, 10 s, a fixed single-thread load): {steadiness}")


def test_machine_drift_times_both_forms():
    drift = machine_drift(seconds=0.0, interval=0.0)  # one sample of each form
    assert set(drift) == {"llc", "core"}
    for form in drift.values():
        assert len(form["op_us"]) == 1 and 0 < form["min_us"] <= form["median_us"] <= form["max_us"]
        assert form["spread"] >= 1.0
