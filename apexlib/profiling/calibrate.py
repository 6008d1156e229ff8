"""The hybrid modes' calibration: real engine runs of the profiled policies on a calibration workload
(:func:`calibration_runs`) and the per-mode ``HybridAdjustment`` that best explains the mixed
iterations measured on the grid and in those runs (:func:`fit_hybrid`). Needs torch (the real engine).
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from apexlib.costs import (
    PROFILE_SCHEMA,
    ModelShape,
    TableCostModel,
    predict_iteration,
    shape_from_plan,
)

if TYPE_CHECKING:
    from apexlib.profiling.profiler import ProfileSettings

logger = logging.getLogger(__name__)


CALIBRATION_REQUESTS = {"quick": 16, "full": 32}


def calibration_runs(settings: ProfileSettings, model_path: str, config: Any,
                      preliminary: dict[str, Any]) -> tuple[list[tuple[Any, float]], list[tuple[int, float]]]:
    """Real engine runs of the profiled policies: (mixed iterations as (shape, runner seconds),
    per-step engine overhead as (sequences in the plan, seconds)).

    The grid repeats one uniform batch per point; the iterations the policies build differ from it
    in what a grid does not show: contexts that differ within a batch, NEO's and APEX's own batch
    splits, a new plan every step. So ``neo`` and then ``apex`` run a seeded decode-heavy calibration
    workload (prompts uniform 8-96, outputs 32-192 tokens, seed ``settings.seed + 1``; not a
    benchmark preset) through the benchmark loop (``apexlib.engine.drive.drive``), deciding with the ``preliminary``
    profile (the tables plus a grid-only fit), with a GPU tier of 32 blocks so that most iterations
    are mixed. Their hybrid iterations (no prefill in them; the first two of each run dropped as
    warm-up) join the grid's samples in the final fit, with the same total weight as the grid's. The
    engine's own per-step cost beyond the scheduler and the runner (output building, the driving
    loop) is the gap between consecutive steps minus scheduling, execution and the scheduler's update
    (``LLMEngine.recording_steps``). ``config`` is the ``ModelConfig`` of ``model_path``."""
    from apexlib.core.models import special_token_ids
    from apexlib.core.plan import OverlapMode
    from apexlib.engine.args import EngineArgs
    from apexlib.engine.drive import WallClock, drive
    from apexlib.engine.engine import LLMEngine
    from apexlib.workloads import Uniform, make_workload, prepare_workload

    count = settings.calibration_requests or CALIBRATION_REQUESTS["quick" if settings.quick else "full"]
    limit = min(config.max_position_embeddings, 512)
    workload = make_workload("profile-calibration", count, Uniform(8, min(96, limit // 4)),
                             Uniform(32, min(192, limit // 2)), seed=settings.seed + 1, max_model_len=limit)
    workload = prepare_workload(workload, config.vocab_size, special_token_ids(model_path, config.vocab_size),
                                settings.seed + 1)
    hybrid: list[tuple[Any, float]] = []
    overhead: list[tuple[int, float]] = []
    preliminary_model = TableCostModel(preliminary)
    for policy in ("neo", "apex"):
        engine = LLMEngine(EngineArgs(
            model=model_path, device=settings.device, dtype=settings.dtype, block_size=settings.block_size,
            policy=policy, cost_model=preliminary_model, num_gpu_blocks=max(32, -(-limit // settings.block_size)),
            # a host tier for the whole workload, no larger (pinned memory: 4 GiB for a 7B shape, not 32)
            num_cpu_blocks=count * -(-limit // settings.block_size), max_model_len=limit, profile_subtasks=True,
            seed=settings.seed))
        try:
            with engine.recording_steps() as steps:
                drive(engine, workload, "offline", WallClock())
            records = [r for r in steps if r.plan.sequences][2:]
        finally:
            engine.close()
        for record, following in zip(records[:-1], records[1:], strict=True):
            overhead.append((len(record.plan.sequences), following.started - record.started
                             - record.schedule_seconds - record.execute_seconds - record.update_seconds))
        for record in records:
            shape = shape_from_plan(record.plan)
            if shape.mode is not OverlapMode.NONE and not shape.prefill_lengths:
                hybrid.append((shape, record.subtask_seconds["iteration"]))
    return hybrid, overhead


def fit_hybrid(tables: dict[str, Any], shape: ModelShape, samples: list[tuple[Any, float]],
                engine_samples: Sequence[tuple[Any, float]] = ()) -> dict[str, Any]:
    """Per hybrid mode, the ``HybridAdjustment`` that best explains the mixed iterations given the
    single-subtask tables (weighted least relative squares): device slowdown s on a 0.05 grid and CPU
    slowdown c on a 0.1 grid, both in [1, 2], serial fraction a on a 0.1 grid in [0, 1] (async overlap
    only), per-job seconds j >= 0 fitted in closed form for each (s, c, a). See ``predict_iteration``.

    ``samples`` are the grid's iterations; ``engine_samples`` those of real engine runs, which weigh
    as much in total as the grid's (per mode), however many there are."""
    from apexlib.core.plan import OverlapMode
    from apexlib.costs import HybridAdjustment

    result: dict[str, Any] = {"method": "least relative squares over mixed GPU+CPU decode iterations measured "
                                        "with the same runner: device work x device_slowdown, CPU attention x "
                                        "cpu_slowdown, + per_job_seconds per CPU job (layer x sub-batch), + "
                                        "serial_fraction x the shorter of (device attention, CPU job)", "modes": {}}
    base_profile = {"schema": PROFILE_SCHEMA, "model_shape": shape.to_dict(), "tables": tables}
    model = TableCostModel(base_profile)
    for mode in (OverlapMode.ASYNC_OVERLAP, OverlapMode.ASYMMETRIC_PIPELINE):
        grid = [(p, m) for p, m in samples if p.mode is mode and m > 0]
        engine = [(p, m) for p, m in engine_samples if p.mode is mode and m > 0]
        points = grid + engine
        if not points:
            continue
        engine_weight = len(grid) / len(engine) if (grid and engine) else 1.0
        weights = [1.0] * len(grid) + [engine_weight] * len(engine)
        jobs = [shape.num_layers * (2 if (mode is OverlapMode.ASYMMETRIC_PIPELINE and p.pipeline_split
                                          and p.pipeline_split[1]) else 1) for p, _ in points]
        best = None
        serial_grid = [0.1 * k for k in range(11)] if mode is OverlapMode.ASYNC_OVERLAP else [0.0]
        for step in range(21):
            for cpu_step in range(11):
                for serial in serial_grid:
                    adjustment = HybridAdjustment(0.0, 1.0 + 0.05 * step, serial, 1.0 + 0.1 * cpu_step)
                    model.set_hybrid_adjustment(mode, adjustment)
                    bases = [predict_iteration(model, p).total for p, _ in points]
                    numerator = sum(w * n * (m - b) / m**2
                                    for (_, m), b, n, w in zip(points, bases, jobs, weights, strict=True))
                    denominator = sum(w * n * n / m**2 for (_, m), n, w in zip(points, jobs, weights, strict=True))
                    adjustment = dataclasses.replace(adjustment, per_job_seconds=max(0.0, numerator / denominator))
                    model.set_hybrid_adjustment(mode, adjustment)  # the pipeline's job cost sits inside a max(): re-evaluate
                    errors = [abs(predict_iteration(model, p).total - m) / m for p, m in points]
                    score = sum(w * e * e for e, w in zip(errors, weights, strict=True))
                    if best is None or score < best[0]:
                        best = (score, adjustment, errors)
        result["modes"][mode.value] = {"device_slowdown": best[1].device_slowdown,
                                       "cpu_slowdown": best[1].cpu_slowdown,
                                       "per_job_seconds": best[1].per_job_seconds,
                                       "serial_fraction": best[1].serial_fraction,
                                       "median_relative_error": statistics.median(best[2]),
                                       "median_relative_error_grid": (statistics.median(best[2][:len(grid)])
                                                                      if grid else None),
                                       "median_relative_error_engine_runs": (statistics.median(best[2][len(grid):])
                                                                             if engine else None),
                                       "points": len(points), "points_from_engine_runs": len(engine)}
    return result
