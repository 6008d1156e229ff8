"""Fidelity: the simulator against the real engine on the same workload, plans and profile.

:func:`fidelity` runs a workload through both executors (the real engine, e.g. with device=cpu, and the
simulator with a measured profile) and reports the relative errors of throughput and TPOT, and
:func:`compare_iterations` lines up their iterations.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from apexlib.core.results import BenchmarkResult
from apexlib.costs import CostModel, TableCostModel
from apexlib.engine.settings import BenchmarkSettings
from apexlib.sim.simulator import SimulationResult, simulate
from apexlib.workloads import Workload


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


def fidelity(workload: Workload, engine_settings: BenchmarkSettings, cost_model: CostModel | str | Path, *,
             policies: Sequence[str] | None = None, mode: str = "offline", progress: bool = False,
             scheduler_overhead: float | str = "measured", results: list[BenchmarkResult] | None = None):
    """Run ``workload`` through the real engine (``run_benchmark``) and the simulator, per policy.

    ``engine_settings``: the engine's ``BenchmarkSettings`` (e.g. device="cpu", the tiny demo model);
    its ``policy`` is replaced by each of ``policies`` (default: that one policy). ``cost_model``: a
    ``TableCostModel`` (a profile of this machine) or the path of a profile JSON; the engine's neo/apex
    decide on the same profile. Returns a DataFrame, one row per policy: measured and simulated output
    throughput and mean/median TPOT, mean TTFT, iterations and preemptions, and the relative errors
    ``(simulated - measured) / measured``, and the median per-iteration error overall and per mode
    (:func:`compare_iterations`). Pass ``results`` (a list) to receive the runs' results.
    ``scheduler_overhead`` goes to :func:`simulate` (default ``"measured"``: the engine pays for its
    scheduler, which a profile does not time). Needs torch (the real engine).

    With device=cpu every engine gets at least one CPU-tier block: a profile is measured on the hybrid
    engine, whose CPU-attention worker takes a core from torch, and a gpu_only engine without a CPU tier
    would give torch every core (a different machine from the profile's point of view).
    """
    import pandas as pd

    from apexlib.bench.benchmark import build_engine, run_benchmark
    from apexlib.model.tiny import resolve_checkpoint

    if not isinstance(cost_model, CostModel):
        cost_model = TableCostModel.from_file(str(cost_model))
    base = engine_settings.replace_engine(model=resolve_checkpoint(engine_settings.engine.model),
                                          cost_model=cost_model)
    rows = []
    for policy in policies or (base.policy,):
        settings = base.replace_engine(policy=policy)
        engine_args = settings.engine
        if engine_args.device == "cpu" and not engine_args.num_cpu_blocks and engine_args.cpu_kv_gib is None:
            settings = settings.replace_engine(num_cpu_blocks=1 if policy == "gpu_only" else None)
        engine = build_engine(settings, workload)
        load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
        try:
            measured = run_benchmark(workload, settings, mode=mode, progress=progress, engine=engine)
        finally:
            engine.close()
        config = engine.config
        # the simulator gets the engine's resolved budgets and limits, not a copy of its arguments
        simulated = simulate(workload, settings.replace_engine(
            device=config.device, dtype=config.dtype, block_size=config.cache.block_size,
            num_gpu_blocks=config.cache.num_gpu_blocks, num_cpu_blocks=config.cache.num_cpu_blocks,
            gpu_kv_gib=None, cpu_kv_gib=None, max_num_seqs=config.scheduler.max_num_seqs,
            max_num_batched_tokens=config.scheduler.max_num_batched_tokens,
            max_model_len=config.scheduler.max_model_len),
            cost_model=cost_model, mode=mode, scheduler_overhead=scheduler_overhead)
        if results is not None:
            results.extend([measured, simulated])
        real, sim = measured.summary_row(), simulated.summary_row()
        row: dict[str, Any] = {"policy": policy, "workload": workload.name, "num_requests": len(workload),
                               "num_gpu_blocks": config.cache.num_gpu_blocks, "cost_model": cost_model.source}
        for key in ("output_throughput", "tpot_mean_s", "tpot_median_s", "ttft_mean_s", "duration_s"):
            row[f"engine_{key}"] = real[key]
            row[f"sim_{key}"] = sim[key]
            row[f"error_{key}"] = _relative_error(sim[key], real[key])
        # other processes on the cores slow the engine, not the simulator: keep the load next to the errors
        row["load_average_1min"] = (load_before, os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan)
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
