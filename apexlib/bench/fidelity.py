"""Fidelity: the simulator against the real engine on the same workload, plans and profile.

:func:`fidelity` runs a workload through both executors (the real engine, e.g. with device=cpu, and the
simulator with a measured profile) and reports the relative errors of throughput and TPOT, and
:func:`compare_iterations` lines up their iterations.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from apexlib.core.host import load_average_1min
from apexlib.core.results import BenchmarkResult
from apexlib.costs import CostModel, TableCostModel
from apexlib.engine.settings import BenchmarkSettings
from apexlib.policies.registry import policy_spec
from apexlib.sim.simulator import SimulationResult, simulate
from apexlib.workloads import Workload


def _load_average() -> float:
    load = load_average_1min()
    return math.nan if load is None else load


def _relative_error(simulated: float, measured: float) -> float:
    return (simulated - measured) / measured if measured else math.nan


def compare_iterations(measured: BenchmarkResult, simulated: SimulationResult):
    """Per iteration: the real engine's step time next to the simulator's, for the same plans.

    The engine's iteration ends are the distinct token times of its run (every iteration that samples
    ends at one); when their count equals the simulator's iterations (no prefill-only chunks) the
    iterations are the same plans in the same order. Returns the trace with ``measured`` (seconds between
    consecutive ends, the first from the run's start) and ``ratio`` = simulated / measured, where
    simulated = ``duration + scheduler_seconds``; None when the iterations cannot be aligned.
    """
    ends = sorted({time for record in measured.records for time in record.token_times})
    trace = simulated.iterations.to_dataframe()
    if len(ends) != len(trace) or not len(trace):
        return None
    start = min(record.arrival_time for record in measured.records)
    trace["measured"] = [end - previous for previous, end in zip([start, *ends[:-1]], ends, strict=True)]
    trace["ratio"] = (trace["duration"] + trace["scheduler_seconds"]) / trace["measured"]
    return trace


def machine_drift(seconds: float = 10.0, interval: float = 0.5) -> dict[str, Any]:
    """How steady this machine's speed is, and where it moves: a fixed single-thread load timed every
    ``interval`` seconds for ``seconds`` (median of 30 passes per sample), in two forms:

    - ``llc``: 28 float32 linears of 256 x 256 on 4 rows with 28 different weights (7 MiB: out of the core's
      L2, in the last-level cache), the demo model's layer shapes and working set;
    - ``core``: the same 28 linears with one weight (256 KiB, in L2): the core alone.

    Returns per form the per-op microseconds of each sample and their min, median, max and max/min
    ``spread``. On a steady machine both spreads are a few percent. When ``llc`` swings and ``core`` does
    not, the speed moves with the shared last-level cache or memory (other tenants of the host), which no
    profile measured minutes before can predict. Needs torch."""
    import statistics
    import time

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generator = torch.Generator().manual_seed(0)
        weights = [torch.randn(256, 256, generator=generator) / 16 for _ in range(28)]  # activations stay O(1)
        forms = {"llc": weights, "core": [weights[0]] * len(weights)}
        rows = torch.randn(4, 256, generator=generator)
        samples: dict[str, list[float]] = {name: [] for name in forms}
        end = time.perf_counter() + seconds
        while not samples["llc"] or time.perf_counter() < end:
            for name, chain in forms.items():
                passes = []
                for _ in range(30):
                    started = time.perf_counter()
                    hidden = rows
                    for weight in chain:
                        hidden = torch.nn.functional.linear(hidden, weight)
                    passes.append(time.perf_counter() - started)
                samples[name].append(statistics.median(passes) / len(chain) * 1e6)
            time.sleep(interval)
    finally:
        torch.set_num_threads(threads)
    return {name: {"op_us": [round(x, 2) for x in values], "min_us": min(values),
                   "median_us": statistics.median(values), "max_us": max(values),
                   "spread": max(values) / min(values)} for name, values in samples.items()}


def fidelity(workload: Workload, engine_settings: BenchmarkSettings,
             cost_model: CostModel | str | Path | Callable[[], CostModel], *,
             policies: Sequence[str] | None = None, mode: str = "offline", progress: bool = False,
             scheduler_overhead: float | str = "measured", results: list[BenchmarkResult] | None = None,
             repeats: int = 1):
    """Run ``workload`` through the real engine (``run_benchmark``) and the simulator, per policy.

    ``engine_settings``: the engine's ``BenchmarkSettings`` (e.g. device="cpu", the smollm2 model); its
    ``policy`` is replaced by each of ``policies`` (default: that one policy). ``cost_model``: a
    ``TableCostModel`` (a profile of this machine), the path of a profile JSON, or a function that measures
    one. The engine's neo/apex decide on the same profile the simulator runs. Returns a DataFrame, one row
    per policy: measured and simulated output throughput and mean/median TPOT, mean TTFT, iterations and
    preemptions, and the relative errors ``(simulated - measured) / measured``, and the median
    per-iteration error overall and per mode (:func:`compare_iterations`). Pass ``results`` (a list) to
    receive the runs' results. ``scheduler_overhead`` goes to :func:`simulate` (default ``"measured"``: the
    engine pays for its scheduler, which a profile does not time). Needs torch (the real engine).

    ``repeats`` rounds run the engine once per policy each, the policies in alternating order from one
    round to the next. With a fixed profile, the simulator (deterministic) runs once per policy and is
    compared with the median of the rounds' runs. With a function, the profile is measured again before
    every round (profile, run each policy, re-profile, run again, ...), the engine decides with it and each
    round is compared with the simulator on the profile measured right before it: the comparison then
    follows the machine's speed from one minute to the next instead of counting its drift as simulator
    error. The reported errors are the medians of the rounds' errors (``error_*_rounds`` lists them) and
    ``profile_linear_drift_rounds`` each round's linear-table level relative to the first round's (what
    moved: the profile, or the engine).

    With device=cpu every engine gets at least one CPU-tier block: a profile is measured on the hybrid
    engine, whose CPU-attention worker takes a core from torch, and a gpu_only engine without a CPU tier
    would give torch every core (a different machine from the profile's point of view).
    """
    import statistics

    import pandas as pd

    from apexlib.bench.benchmark import build_engine, run_benchmark
    from apexlib.model.catalog import resolve_checkpoint

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if isinstance(cost_model, CostModel):
        measure, fixed = None, cost_model
    elif callable(cost_model):
        measure, fixed = cost_model, None
    else:
        measure, fixed = None, TableCostModel.from_file(str(cost_model))
    remeasure = measure is not None
    base = engine_settings.replace_engine(model=resolve_checkpoint(engine_settings.engine.model))
    names = list(policies or (base.policy,))

    def policy_settings(policy: str, profile: CostModel) -> BenchmarkSettings:
        settings = base.replace_engine(policy=policy, cost_model=profile)
        engine_args = settings.engine
        if engine_args.device == "cpu" and not engine_args.num_cpu_blocks and engine_args.cpu_kv_gib is None:
            settings = settings.replace_engine(num_cpu_blocks=None if policy_spec(policy).uses_cpu_tier else 1)
        return settings

    def simulated_run(policy: str, profile: CostModel, config: Any) -> SimulationResult:
        # the simulator gets the engine's resolved budgets and limits, not a copy of its arguments
        return simulate(workload, policy_settings(policy, profile).replace_engine(
            device=config.device, dtype=config.dtype, block_size=config.cache.block_size,
            num_gpu_blocks=config.cache.num_gpu_blocks, num_cpu_blocks=config.cache.num_cpu_blocks,
            gpu_kv_gib=None, cpu_kv_gib=None, max_num_seqs=config.scheduler.max_num_seqs,
            max_num_batched_tokens=config.scheduler.max_num_batched_tokens,
            max_model_len=config.scheduler.max_model_len),
            cost_model=profile, mode=mode, scheduler_overhead=scheduler_overhead)

    profiles: list[CostModel] = [fixed] if fixed is not None else []
    runs: dict[str, list[tuple[BenchmarkResult, Any, float, float, int]]] = {policy: [] for policy in names}
    for round_index in range(repeats):
        if measure is not None:
            profiles.append(measure())
        for policy in (names if round_index % 2 == 0 else names[::-1]):
            settings = policy_settings(policy, profiles[-1])
            engine = build_engine(settings, workload)
            load_before = _load_average()
            try:
                measured = run_benchmark(workload, settings, mode=mode, progress=progress, engine=engine)
            finally:
                engine.close()
            # the last item: the index of the profile this run decided with (and is compared against)
            runs[policy].append((measured, engine.config, load_before, _load_average(), len(profiles) - 1))
    metrics = ("output_throughput", "tpot_mean_s", "tpot_median_s", "ttft_mean_s", "duration_s")
    rows = []
    for policy in names:
        config = runs[policy][0][1]
        sims: dict[int, SimulationResult] = {}  # one simulated run per profile (the simulator is deterministic)
        for run in runs[policy]:
            if run[4] not in sims:
                sims[run[4]] = simulated_run(policy, profiles[run[4]], run[1])
        summaries = [run[0].summary_row() for run in runs[policy]]
        sim_rows = [sims[run[4]].summary_row() for run in runs[policy]]
        # the run whose throughput is the median one stands for the engine in the per-iteration comparison
        order = sorted(range(len(summaries)), key=lambda i: summaries[i]["output_throughput"])
        middle = order[len(order) // 2]
        measured = runs[policy][middle][0]
        simulated = sims[runs[policy][middle][4]]
        if results is not None:
            results.extend([measured, simulated])
        row: dict[str, Any] = {"policy": policy, "model_path": base.engine.model, "workload": workload.name,
                               "num_requests": len(workload),
                               "num_gpu_blocks": config.cache.num_gpu_blocks, "cost_model": profiles[0].source,
                               "engine_runs": len(summaries), "profiles": len(profiles)}
        for key in metrics:
            row[f"engine_{key}"] = statistics.median(summary[key] for summary in summaries)
            row[f"sim_{key}"] = statistics.median(sim[key] for sim in sim_rows)
            errors = [_relative_error(sim[key], summary[key]) for sim, summary in zip(sim_rows, summaries, strict=True)]
            row[f"error_{key}"] = (statistics.median(errors) if remeasure
                                   else _relative_error(row[f"sim_{key}"], row[f"engine_{key}"]))
            if remeasure and key in ("output_throughput", "tpot_mean_s"):
                row[f"error_{key}_rounds"] = json.dumps([round(e, 4) for e in errors])
        row["engine_output_throughput_runs"] = json.dumps([round(s["output_throughput"], 3) for s in summaries])
        if remeasure:
            row["profile_linear_drift_rounds"] = json.dumps([round(_linear_level(p) / _linear_level(profiles[0]), 4)
                                                             for p in profiles])
        # other processes on the cores slow the engine, not the simulator: keep the load next to the errors
        row["load_average_1min"] = (min(run[2] for run in runs[policy]), max(run[3] for run in runs[policy]))
        row["engine_iterations"] = measured.provenance["engine_iterations"]
        row["sim_iterations"] = simulated.provenance["engine_iterations"]
        row["engine_preemptions"] = measured.provenance["engine_preemptions"]
        row["sim_preemptions"] = simulated.provenance["engine_preemptions"]
        row["engine_mode_counts"] = measured.provenance["engine_mode_counts"]
        row["sim_mode_counts"] = simulated.provenance["engine_mode_counts"]
        aligned = compare_iterations(measured, simulated)
        if aligned is not None:
            row["iteration_error_median"] = float(aligned["ratio"].median() - 1.0)
            row["iteration_error_median_by_mode"] = json.dumps(
                {mode: round(float(ratio - 1.0), 4) for mode, ratio in aligned.groupby("mode")["ratio"].median().items()},
                sort_keys=True)
        rows.append(row)
    return pd.DataFrame(rows)


def _linear_level(profile: CostModel) -> float:
    """The median of a table profile's linear-work seconds (NaN for other cost models): its speed level."""
    import statistics

    tables = (getattr(profile, "profile", None) or {}).get("tables", {})
    seconds = tables.get("linear", {}).get("seconds") or []
    return statistics.median(seconds) if seconds else math.nan
