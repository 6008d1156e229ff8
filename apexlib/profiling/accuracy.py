"""A profile's accuracy: the iteration times a cost model predicts for the plans a real engine runs,
against the times measured (``apex profile --check``). Needs torch (the real engine).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import statistics
import time
from collections.abc import Sequence
from typing import Any

from apexlib.core.host import load_average_1min
from apexlib.costs import (
    CostModel,
    predict_iteration,
    shape_from_plan,
)
from apexlib.model.catalog import resolve_checkpoint
from apexlib.profiling.profiler import ProfileSettings

logger = logging.getLogger(__name__)


def default_workload(num_requests: int = 24, seed: int = 0, max_prompt: int = 384,
                     max_output: int = 96) -> list[tuple[int, int]]:
    """(prompt length, output length) pairs with varied lengths (seeded)."""
    rng = random.Random(seed)
    return [(rng.randint(8, max_prompt), rng.randint(8, max_output)) for _ in range(num_requests)]


def _relative_errors(rows: list[dict[str, Any]]) -> dict[str, Any]:
    errors = sorted(abs(r["predicted"] - r["measured"]) / r["measured"] for r in rows if r["measured"] > 0)
    signed = [(r["predicted"] - r["measured"]) / r["measured"] for r in rows if r["measured"] > 0]
    overhead = sorted(r["predict_seconds"] / r["measured"] for r in rows if r["measured"] > 0)

    def quantile(values: list[float], q: float) -> float:
        return values[min(len(values) - 1, int(math.ceil(q * len(values))) - 1)] if values else float("nan")

    return {"iterations": len(errors), "median_relative_error": quantile(errors, 0.5),
            "p90_relative_error": quantile(errors, 0.9),
            "median_signed_error": statistics.median(signed) if signed else float("nan"),
            "median_prediction_overhead_fraction": quantile(overhead, 0.5),
            "p90_prediction_overhead_fraction": quantile(overhead, 0.9)}


def accuracy_report(engine_or_args: Any, cost_model: CostModel, workload: Sequence[tuple[int, int]] | None = None,
                    skip_iterations: int = 2, seed: int = 0) -> dict[str, Any]:
    """Run ``workload`` through a real engine, predicting each iteration from its plan's shape.

    ``engine_or_args``: an ``LLMEngine`` (built with ``profile_subtasks=True``) or ``EngineArgs`` (built,
    used and closed here). ``workload``: (prompt length, output length) pairs (default:
    :func:`default_workload`); all requests are added at once and the engine steps until they finish,
    recording every step (``LLMEngine.recording_steps``). Per step the measured time is the runner's
    ``iteration`` seconds plus its block copies (the scheduler is not in it), the prediction is
    ``predict_iteration(cost_model, shape_from_plan(plan))`` and its own cost (shape + prediction) is timed. Returns ``{"by_mode": {mode: stats}, "all": stats, "rows": [...]}``
    with median / p90 relative error and the prediction overhead as a fraction of the iteration.
    """
    from apexlib.core.request import SamplingParams
    from apexlib.engine.args import EngineArgs
    from apexlib.engine.assemble import cpu_transfer
    from apexlib.engine.engine import LLMEngine

    owned = isinstance(engine_or_args, EngineArgs)
    engine = LLMEngine(engine_or_args) if owned else engine_or_args
    try:
        if not engine.config.profile_subtasks:
            raise ValueError("accuracy_report needs an engine built with profile_subtasks=True")
        model = engine.config.model
        transfer = cpu_transfer(model, engine.config.dtype, engine.config.device)
        bytes_per_block = engine.gpu_storage.bytes_per_block
        rng = random.Random(seed)
        for prompt_length, output_length in (workload or default_workload(seed=seed)):
            tokens = [rng.randrange(4, model.vocab_size) for _ in range(prompt_length)]
            engine.add_request(None, {"prompt_token_ids": tokens},
                               SamplingParams(max_tokens=output_length, temperature=0.0, ignore_eos=True))
        with engine.recording_steps() as steps:
            while engine.has_unfinished_requests():
                engine.step()
        rows = []
        for step in steps:
            plan = step.plan
            if not plan.sequences:
                continue
            started = time.perf_counter()
            iteration_shape = shape_from_plan(plan, transfer.bytes_per_token, bytes_per_block, transfer.to_cpu_fraction)
            predicted = predict_iteration(cost_model, iteration_shape)
            predict_seconds = time.perf_counter() - started
            measured = dict(step.subtask_seconds or {})
            measured["iteration"] += measured.pop("swap", 0.0)  # the block copies run before the forward
            rows.append({"iteration": plan.iteration, "mode": iteration_shape.mode.value,
                         "num_tokens": iteration_shape.num_tokens, "prefills": len(iteration_shape.prefill_lengths),
                         "gpu_decodes": iteration_shape.num_gpu_decodes,
                         "cpu_decodes": iteration_shape.num_cpu_decodes,
                         "swapped_blocks": len(plan.swap_in) + len(plan.swap_out),
                         "measured": measured["iteration"], "predicted": predicted.total,
                         "predict_seconds": predict_seconds,
                         **{f"measured_{k}": v for k, v in measured.items() if k != "iteration"},
                         **{f"predicted_{k}": getattr(predicted, k) for k in
                            ("linear", "gpu_attention", "cpu_attention", "transfer", "overhead")}})
        rows = rows[skip_iterations:]
        modes = sorted({r["mode"] for r in rows})
        return {"by_mode": {m: _relative_errors([r for r in rows if r["mode"] == m]) for m in modes},
                "all": _relative_errors(rows), "rows": rows,
                "engine": {"policy": engine.config.scheduler.policy,
                           "policy_options": dataclasses.asdict(engine.config.policy_options),
                           "num_gpu_blocks": engine.config.cache.num_gpu_blocks,
                           "num_cpu_blocks": engine.config.cache.num_cpu_blocks},
                "cost_model": {"source": cost_model.source, "extrapolated": getattr(cost_model, "extrapolated", 0)}}
    finally:
        if owned:
            engine.close()


def check_profile(settings: ProfileSettings, cost_model: CostModel, workload: Sequence[tuple[int, int]] | None = None,
                  num_gpu_blocks: int = 64) -> dict[str, Any]:
    """The ``--check`` report: the workload once per execution mode with a GPU tier too small for it
    (so CPU-tier decodes and swaps happen), errors per plan mode.

    Every run, GPU-only included, has a CPU tier and hence the CPU-attention worker: with device=cpu the
    worker takes cores from torch, and the profile was measured that way; a GPU-only engine without it
    would give torch every core, a different machine from the profile's point of view (measured: ~30%
    over-prediction in mode none)."""
    from apexlib.core.config import ModelConfig
    from apexlib.engine.args import EngineArgs

    model_path = resolve_checkpoint(settings.model)
    config = ModelConfig.from_pretrained(model_path)
    report: dict[str, Any] = {"runs": {}}
    for mode in ("none", "async_overlap", "asymmetric_pipeline"):
        args = EngineArgs(model=model_path, device=settings.device, dtype=settings.dtype,
                          block_size=settings.block_size, policy="gpu_only" if mode == "none" else "hybrid",
                          policy_options=None if mode == "none" else {"hybrid_mode": mode},
                          num_gpu_blocks=num_gpu_blocks,
                          num_cpu_blocks=4096,  # every run with the CPU worker: the profile's thread layout
                          max_model_len=min(config.max_position_embeddings, 1024), profile_subtasks=True,
                          seed=settings.seed)
        load_before = load_average_1min()
        result = accuracy_report(args, cost_model, workload, seed=settings.seed)
        report["runs"][mode] = {k: v for k, v in result.items() if k != "rows"}
        report["runs"][mode]["load_average_1min"] = {  # other processes on the cores distort the measurement
            "before": load_before, "after": load_average_1min()}
        report["runs"][mode]["rows"] = result["rows"]
    all_rows = [r for run in report["runs"].values() for r in run["rows"]]
    modes = sorted({r["mode"] for r in all_rows})
    report["by_mode"] = {m: _relative_errors([r for r in all_rows if r["mode"] == m]) for m in modes}
    report["all"] = _relative_errors(all_rows)
    return report
