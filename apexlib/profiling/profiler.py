"""Measure every subtask of an iteration on this hardware, through the real engine and runner.

``profile_model(settings)`` builds an ``LLMEngine`` with ``policy="hybrid"`` (so a CPU KV tier and
the CPU-attention worker exist) and ``profile_subtasks=True``, then drives ``engine.runner.execute``
with hand-built ``IterationPlan``s (block tables taken straight from block ids; the KV pools are
filled with random values first so attention reads real numbers, never NaNs or denormals) and
reads the runner's per-iteration subtask seconds. Each point: warm-up runs, then the median of
``repetitions`` (>= 5) runs.

Profile JSON (``schema = "apexlib.profile/1"``), every time in seconds for the WHOLE MODEL (all
layers) of one iteration::

    {"schema", "label", "units",
     "provenance": {date_utc, git_commit, apexlib_version, device, device_name, cpu_model, cpu_count,
                    cpu_affinity, simd, torch, cuda, torch_threads, cpu_attention_threads,
                    cpu_attention_cpus, cpu_attention_isa, repetitions, warmup, quick, command},
     "model": {path, name, dtype, block_size, + the ModelConfig fields}, "model_shape": ModelShape,
     "tables": {
       "linear": {"num_tokens": [...], "seconds": [...]},            # runner "linear": all layers' pre+post
       "sample": {"num_rows": [...], "seconds": [...]},              # runner "sample": LM head + sampling
       "gpu_prefill_attention": {"prompt_length": [...], "seconds": [...]},   # one prompt, from position 0
       "gpu_decode_attention": {"batch": [...], "context_length": [...], "seconds": [[batch][context]],
                                "fit": {per_kv_token, per_sequence, constant}, "model": "grid"|"fit",
                                "holdout_relative_error": {"grid": .., "fit": ..}},
       "cpu_decode_attention": (same; the runner's "cpu_attention": K/V append + the compiled kernel),
       "transfer": {"d2h": {"bytes": [...], "seconds": [...]}, "h2d": {...}, "method": str,
                    "qkv_copies_in_runner": bool},
       "launch_overhead": {"seconds": c, "per_sequence_seconds": d, "method": str},
       "hybrid_calibration": {"modes": {mode: {device_slowdown, cpu_slowdown, per_job_seconds,
                              serial_fraction, median_relative_error, points}}, "points_from_grid",
                              "points_from_engine_runs", "method"},   # see _fit_hybrid / _calibration_runs
       "engine_step_overhead": {"seconds", "per_sequence_seconds", "steps", "median_seconds", "method"}},
     "accuracy": (optional) the --check report}

The hybrid calibration is fitted twice: on the grid's mixed iterations, then (with that preliminary
profile driving the ``neo`` and ``apex`` policies through a calibration workload on a real engine) on
the grid's and the engine runs' iterations together.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import os
import random
import re
import statistics
import sys
import time
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apexlib.costs import (
    PROFILE_SCHEMA,
    CostModel,
    ModelShape,
    TableCostModel,
    predict_iteration,
    shape_from_plan,
)
from apexlib.costs.table import DecodeFit, Grid

logger = logging.getLogger(__name__)

FULL_GRID = {
    "linear_tokens": (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048),
    "prefill_lengths": (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048),
    "decode_batches": (1, 2, 4, 8, 16, 32, 64, 128),
    "decode_contexts": (16, 64, 256, 1024, 2048),
    "transfer_blocks": (1, 4, 16, 64, 256, 1024),
    "hybrid_gpu_batches": (1, 2, 8, 32),
    "hybrid_cpu_batches": (2, 8, 16, 32),
    "hybrid_contexts": (64, 256, 512),
}
QUICK_GRID = {
    "linear_tokens": (1, 2, 4, 8, 16, 32, 64, 128, 256),
    "prefill_lengths": (8, 32, 128, 256),
    "decode_batches": (1, 4, 16),
    "decode_contexts": (16, 128, 512),
    "transfer_blocks": (1, 16, 128),
    "hybrid_gpu_batches": (1, 4, 16),
    "hybrid_cpu_batches": (2, 8, 16),
    "hybrid_contexts": (64, 256),
}


@dataclass(frozen=True)
class ProfileSettings:
    model: str  # checkpoint directory or a tiny preset name
    device: str = "cpu"
    dtype: str = "auto"
    block_size: int = 16
    quick: bool = False
    repetitions: int = 5
    warmup: int = 2
    seed: int = 0
    progress: bool = True
    command: str = ""
    #: entries replacing those of the quick / full grid (keys of QUICK_GRID), e.g. a smaller hybrid grid
    grid: Mapping[str, Sequence[int]] | None = None
    #: requests of each engine calibration run (None: CALIBRATION_REQUESTS); 0: no calibration runs
    #: (the hybrid fit then uses the grid's iterations only and there is no engine_step_overhead table)
    calibration_requests: int | None = None

    def __post_init__(self) -> None:
        if self.repetitions < 1 or self.warmup < 0:
            raise ValueError(f"repetitions must be >= 1 and warmup >= 0, got {self.repetitions}, {self.warmup}")
        if self.calibration_requests is not None and self.calibration_requests < 0:
            raise ValueError(f"calibration_requests must be >= 0, got {self.calibration_requests}")
        if self.grid is not None:
            unknown = sorted(set(self.grid) - set(QUICK_GRID))
            if unknown:
                raise ValueError(f"grid has unknown entr(ies) {unknown}; known: {sorted(QUICK_GRID)}")
            for name, values in self.grid.items():
                if not values or any(not isinstance(v, int) or v < 1 for v in values):
                    raise ValueError(f"grid[{name!r}] must be positive ints, got {values!r}")
            object.__setattr__(self, "grid", types.MappingProxyType({k: tuple(v) for k, v in self.grid.items()}))


def resolve_model(model: str) -> str:
    """A checkpoint directory, or a tiny preset name built into the tiny cache."""
    if Path(model).expanduser().is_dir():
        return str(Path(model).expanduser())
    from apexlib.model.tiny import TINY_PRESETS, tiny_checkpoint

    if model in TINY_PRESETS:
        return str(tiny_checkpoint(model))
    raise FileNotFoundError(f"--model {model!r} is neither a checkpoint directory nor a tiny preset "
                            f"({sorted(TINY_PRESETS)})")


def cpu_short_name(cpu_model: str, simd: Iterable[str] = ()) -> str:
    """A file-name-friendly CPU label: 'xeon-spr' for a Sapphire Rapids Xeon (AMX), else slugged."""
    lowered = cpu_model.lower()
    if "xeon" in lowered and "amx_tile" in set(simd):
        return "xeon-spr"
    slug = re.sub(r"\(r\)|\(tm\)|cpu|processor|@.*", " ", lowered)
    slug = re.sub(r"[^a-z0-9]+", "-", slug).strip("-")
    return slug or "cpu"


def _median_seconds(samples: list[dict[str, float]]) -> dict[str, float]:
    keys = set().union(*samples)
    return {k: statistics.median(s.get(k, 0.0) for s in samples) for k in sorted(keys)}


class _Bench:
    """Builds plans over an engine's pools and runs them through its runner."""

    def __init__(self, engine: Any, settings: ProfileSettings) -> None:
        import torch

        from apexlib.core.request import SamplingParams

        self.engine = engine
        self.settings = settings
        self.runner = engine.runner
        self.block_size = engine.config.cache.block_size
        self.params = SamplingParams(max_tokens=1 << 20, temperature=0.0, ignore_eos=True)
        self.iteration = 0
        self.rng = random.Random(settings.seed)
        # Real numbers in every slot (uninitialised memory may hold NaN/denormals), drawn on the engine's
        # device one layer at a time: a CPU generator takes ~1 min per 2G values (a 7B shape's 4 GiB pool)
        device = torch.device(engine.config.device)
        generator = torch.Generator(device=device).manual_seed(settings.seed)
        for storage in (engine.gpu_storage, engine.cpu_storage):
            if storage is not None:
                for layer in storage.kv:
                    values = torch.randn(layer.shape, generator=generator, dtype=torch.float32, device=device)
                    layer.copy_(values.mul_(0.5).to(layer.dtype))

    def _table(self, tier, base: int, num_tokens: int) -> tuple[int, ...]:
        from apexlib.core.plan import Tier

        pool = self.engine.config.cache.num_gpu_blocks if tier is Tier.GPU else self.engine.config.cache.num_cpu_blocks
        count = -(-num_tokens // self.block_size)
        return tuple((base + j) % pool for j in range(count))

    def decodes(self, batch: int, context: int, tier, prefix: str = "d"):
        from apexlib.core.plan import ScheduledSequence

        blocks_per = -(-context // self.block_size)
        token = 5
        return tuple(ScheduledSequence(f"{prefix}{i}", (token,), context - 1, self._table(tier, i * blocks_per, context),
                                       tier, True, self.params, 1) for i in range(batch))

    def prefill(self, length: int, tier, index: int = 0):
        from apexlib.core.plan import ScheduledSequence

        tokens = tuple(self.rng.randrange(4, self.engine.config.model.vocab_size) for _ in range(length))
        return ScheduledSequence(f"p{index}", tokens, 0, self._table(tier, index * (-(-length // self.block_size)),
                                                                      length), tier, True, self.params, 0)

    def plan(self, **fields):
        from apexlib.core.plan import IterationPlan

        self.iteration += 1
        fields.setdefault("prefills", ())
        fields.setdefault("gpu_decodes", ())
        return IterationPlan(iteration=self.iteration, **fields)

    def measure(self, plan) -> dict[str, float]:
        samples = []
        for index in range(self.settings.warmup + self.settings.repetitions):
            seconds = self.runner.execute(plan).subtask_seconds
            if index >= self.settings.warmup:
                samples.append(seconds)
        return _median_seconds(samples)


def _progress(total: int, enabled: bool, description: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, disable=not enabled, leave=False, file=sys.stderr)


def _decode_table(batches: Sequence[int], contexts: Sequence[int], seconds: list[list[float]]) -> dict[str, Any]:
    """The grid plus a least-squares fit, and which represents held-out points better.

    Hold-out: every interior grid point is predicted from the grid without its row/column (bilinear
    over the neighbours) and from a fit without that point; the median relative error decides.
    """
    table: dict[str, Any] = {"batch": list(batches), "context_length": list(contexts), "seconds": seconds}
    points = [(b * c, b, seconds[i][j]) for i, b in enumerate(batches) for j, c in enumerate(contexts)]
    fit = DecodeFit.fit(points)
    table["fit"] = fit.to_dict()
    grid_errors, fit_errors = [], []
    for i in range(1, len(batches) - 1):
        for j in range(1, len(contexts) - 1):
            truth = seconds[i][j]
            if truth <= 0:
                continue
            rows = [r for r in range(len(batches)) if r != i]
            cols = [c for c in range(len(contexts)) if c != j]
            held = Grid([batches[r] for r in rows], [contexts[c] for c in cols],
                        [[seconds[r][c] for c in cols] for r in rows])
            grid_errors.append(abs(held(batches[i], contexts[j])[0] - truth) / truth)
            others = [p for k, p in enumerate(points) if k != i * len(contexts) + j]
            fit_errors.append(abs(DecodeFit.fit(others)(batches[i] * contexts[j], batches[i]) - truth) / truth)
    if grid_errors:
        table["holdout_relative_error"] = {"grid": statistics.median(grid_errors),
                                           "fit": statistics.median(fit_errors)}
        table["model"] = "grid" if statistics.median(grid_errors) <= statistics.median(fit_errors) else "fit"
    else:
        table["model"] = "grid"
    return table


def _fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope)."""
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    var = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0
    return mean_y - slope * mean_x, slope


def build_engine(settings: ProfileSettings, num_blocks: int, max_model_len: int, **overrides: Any):
    from apexlib.engine.args import EngineArgs
    from apexlib.engine.engine import LLMEngine

    arguments = dict(model=resolve_model(settings.model), device=settings.device, dtype=settings.dtype,
                     block_size=settings.block_size, policy="hybrid", num_gpu_blocks=num_blocks,
                     num_cpu_blocks=num_blocks, max_model_len=max_model_len, profile_subtasks=True,
                     seed=settings.seed)
    arguments.update(overrides)
    return LLMEngine(EngineArgs(**arguments))


def provenance(engine: Any, settings: ProfileSettings) -> dict[str, Any]:
    import torch

    from apexlib.attention import cpu as cpu_attention
    from apexlib.envinfo import environment

    env = environment()
    device = engine.config.device
    device_name = (torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda")
                   else f"{env['cpu_model']} (device=cpu)")
    worker = engine.runner.worker
    try:
        isa = cpu_attention.selected_isa()
    except (ImportError, RuntimeError) as error:
        isa = f"unavailable: {error}"
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": env["git_commit"], "apexlib_version": env["apexlib_version"],
        "device": device, "device_name": device_name,
        "cpu_model": env["cpu_model"], "cpu_count": env["cpu_count"], "cpu_affinity": env["cpu_affinity"],
        "simd": env["simd"], "memory_gib": env["memory_gib"], "platform": env["platform"], "python": env["python"],
        "torch": env["torch"], "cuda": env["cuda"], "gpus": env["gpus"], "torch_threads": torch.get_num_threads(),
        "cpu_attention_threads": worker.num_threads if worker else None,
        "cpu_attention_cpus": list(worker.cpu_ids) if worker else None, "cpu_attention_isa": isa,
        "repetitions": settings.repetitions, "warmup": settings.warmup, "quick": settings.quick,
        "statistic": "median of repetitions after warm-up", "command": settings.command,
        "load_average_1min_at_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def profile_model(settings: ProfileSettings) -> dict[str, Any]:
    """Measure every table of the profile on this machine; returns the profile dict (see module doc)."""
    from apexlib.core.config import ModelConfig
    from apexlib.core.plan import OverlapMode, Tier
    from apexlib.runner.kv_storage import copy_blocks

    grid = dict(QUICK_GRID if settings.quick else FULL_GRID)
    grid.update(settings.grid or {})
    model_path = resolve_model(settings.model)
    config = ModelConfig.from_pretrained(model_path)
    limit = config.max_position_embeddings - 1
    grid["prefill_lengths"] = tuple(n for n in grid["prefill_lengths"] if n <= limit)
    grid["decode_contexts"] = tuple(n for n in grid["decode_contexts"] if n <= limit)
    blocks_needed = max(max(grid["decode_batches"]) * -(-max(grid["decode_contexts"]) // settings.block_size),
                        max(grid["linear_tokens"]) * 1, -(-max(grid["prefill_lengths"]) // settings.block_size),
                        2 * max(grid["transfer_blocks"]))
    engine = build_engine(settings, num_blocks=blocks_needed, max_model_len=config.max_position_embeddings)
    try:
        bench = _Bench(engine, settings)
        total = (len(grid["linear_tokens"]) + len(grid["prefill_lengths"])
                 + 2 * len(grid["decode_batches"]) * len(grid["decode_contexts"]) + 2 * len(grid["transfer_blocks"])
                 + 3 * len(grid["hybrid_gpu_batches"]) * len(grid["hybrid_cpu_batches"]) * len(grid["hybrid_contexts"]))
        tables: dict[str, Any] = {}
        residuals: list[tuple[int, float]] = []
        with _progress(total, settings.progress, f"apex profile {Path(model_path).name}") as bar:
            linear, sample = [], []
            for n in grid["linear_tokens"]:  # n decode rows (context 16): linear work of n tokens, n sampled rows
                seconds = bench.measure(bench.plan(gpu_decodes=bench.decodes(n, 16, Tier.GPU)))
                linear.append(seconds.get("linear", 0.0))
                sample.append(seconds.get("sample", 0.0))
                residuals.append((n, seconds["iteration"] - seconds.get("linear", 0.0)
                                  - seconds.get("gpu_attention", 0.0) - seconds.get("sample", 0.0)))
                bar.update()
            tables["linear"] = {"num_tokens": list(grid["linear_tokens"]), "seconds": linear,
                                "method": "runner 'linear' of a decode iteration with num_tokens GPU rows"}
            tables["sample"] = {"num_rows": list(grid["linear_tokens"]), "seconds": sample,
                                "method": "runner 'sample' (LM head + sampling) of the same iterations"}
            prefill = []
            for length in grid["prefill_lengths"]:
                seconds = bench.measure(bench.plan(prefills=(bench.prefill(length, Tier.GPU),)))
                prefill.append(seconds.get("gpu_attention", 0.0))
                bar.update()
            tables["gpu_prefill_attention"] = {
                "prompt_length": list(grid["prefill_lengths"]), "seconds": prefill,
                "method": "runner 'gpu_attention' of one prefill from position 0 (K/V store included); "
                          "several prompts are summed"}
            for name, tier, mode, key in (("gpu_decode_attention", Tier.GPU, OverlapMode.NONE, "gpu_attention"),
                                          ("cpu_decode_attention", Tier.CPU, OverlapMode.ASYNC_OVERLAP,
                                           "cpu_attention")):
                values = []
                for batch in grid["decode_batches"]:
                    row = []
                    for context in grid["decode_contexts"]:
                        sequences = bench.decodes(batch, context, tier)
                        plan = (bench.plan(gpu_decodes=sequences) if tier is Tier.GPU
                                else bench.plan(cpu_decodes=sequences, mode=mode))
                        seconds = bench.measure(plan)
                        row.append(seconds.get(key, 0.0))
                        if tier is Tier.GPU:
                            residuals.append((batch, seconds["iteration"] - seconds.get("linear", 0.0)
                                              - seconds.get("gpu_attention", 0.0) - seconds.get("sample", 0.0)))
                        bar.update()
                    values.append(row)
                tables[name] = _decode_table(grid["decode_batches"], grid["decode_contexts"], values)
            tables["cpu_decode_attention"]["method"] = ("runner 'cpu_attention' (worker job seconds: K/V append + "
                                                        "the compiled kernel) of CPU-tier decode iterations")
            tables["gpu_decode_attention"]["method"] = "runner 'gpu_attention' of GPU-tier decode iterations"
            tables["transfer"] = _measure_transfers(engine, grid["transfer_blocks"], settings, copy_blocks, bar)
            hybrid_samples = _measure_hybrid(bench, grid, bar)
        engine.close()  # the calibration runs build their own engines (one worker thread at a time)
        intercept, slope = _fit_line([r[0] for r in residuals], [r[1] for r in residuals])
        tables["launch_overhead"] = {
            "seconds": max(0.0, intercept), "per_sequence_seconds": max(0.0, slope),
            "method": "least squares of (iteration - linear - gpu_attention - sample) over the GPU decode "
                      "iterations against their sequence count"}
        shape = ModelShape.from_config(config, name=Path(model_path).name)
        tables["hybrid_calibration"] = _fit_hybrid(tables, shape, hybrid_samples)
        preliminary = {"schema": PROFILE_SCHEMA, "model_shape": shape.to_dict(), "tables": tables}
        calibration_samples, step_overhead = [], []
        if settings.calibration_requests != 0:
            calibration_samples, step_overhead = _calibration_runs(settings, model_path, config, preliminary)
            tables["hybrid_calibration"] = _fit_hybrid(tables, shape, hybrid_samples, calibration_samples)
        if step_overhead:
            intercept, slope = _fit_line([n for n, _ in step_overhead], [t for _, t in step_overhead])
            tables["engine_step_overhead"] = {
                "seconds": max(0.0, intercept), "per_sequence_seconds": max(0.0, slope), "steps": len(step_overhead),
                "median_seconds": statistics.median(t for _, t in step_overhead),
                "method": "least squares, against the plan's sequence count, of the gap between consecutive "
                          "LLMEngine.step starts minus scheduling, the runner and the scheduler's update, over the "
                          "calibration runs (bench loop, final-only outputs): what the engine spends per step "
                          "outside the scheduler and the runner"}
        tables["hybrid_calibration"]["points_from_grid"] = len(hybrid_samples)
        tables["hybrid_calibration"]["points_from_engine_runs"] = len(calibration_samples)
        info = provenance(engine, settings)
        date = info["date_utc"][:10]
        where = "device=cuda " + info["device_name"] if engine.config.device.startswith("cuda") else "device=cpu"
        profile = {
            "schema": PROFILE_SCHEMA,
            "label": f"measured on {info['cpu_model']}, {where}, {date}",
            "units": "seconds for the whole model (all layers) of one iteration",
            "provenance": info,
            "model": {"path": model_path, "name": Path(model_path).name, "dtype": engine.config.dtype,
                      "block_size": engine.config.cache.block_size,
                      **{k: v for k, v in vars(config).items() if k not in ("path",)}},
            "model_shape": shape.to_dict(),
            "grid": {k: list(v) for k, v in grid.items()},
            "tables": tables,
        }
        return json.loads(json.dumps(profile, default=str))
    finally:
        engine.close()


def _measure_transfers(engine: Any, block_counts: Sequence[int], settings: ProfileSettings, copy_blocks: Callable,
                       bar) -> dict[str, Any]:
    """Block copies between the engine's tiers (the swap path): d2h = GPU tier -> CPU tier."""
    import torch

    cuda = engine.config.device.startswith("cuda")
    result: dict[str, Any] = {
        "method": "kvcache.storage.copy_blocks between the engine's KV tiers" + (
            " (device <-> pinned host)" if cuda else " (device=cpu: a host memcpy; the runner makes no q/k/v "
                                                     "copies, so those cost 0 and IterationShape gets 0 bytes)"),
        "qkv_copies_in_runner": cuda,
    }
    bytes_per_block = engine.gpu_storage.bytes_per_block
    for direction, (source, destination) in (("d2h", (engine.gpu_storage, engine.cpu_storage)),
                                             ("h2d", (engine.cpu_storage, engine.gpu_storage))):
        sizes, times = [], []
        for count in block_counts:
            pairs = [(i, count + i) for i in range(count)]
            samples = []
            for index in range(settings.warmup + settings.repetitions):
                if cuda:
                    torch.cuda.synchronize()
                started = time.perf_counter()
                copy_blocks(source, destination, pairs)
                if cuda:
                    torch.cuda.synchronize()
                if index >= settings.warmup:
                    samples.append(time.perf_counter() - started)
            sizes.append(count * bytes_per_block)
            times.append(statistics.median(samples))
            bar.update()
        result[direction] = {"bytes": sizes, "seconds": times}
    return result


def _measure_hybrid(bench: _Bench, grid: dict[str, Sequence[int]], bar) -> list[tuple[Any, float]]:
    """Mixed iterations (GPU + CPU decodes) in both hybrid modes: (shape, measured iteration seconds)."""
    from apexlib.core.plan import OverlapMode, Tier
    from apexlib.costs import shape_from_plan

    samples = []
    # the pipeline in both shapes a policy builds: the CPU rows split across the sub-batches, or
    # (NEO's usual choice) sub-batch A = the GPU-tier rows only, B = every CPU-tier row
    variants = ((OverlapMode.ASYNC_OVERLAP, None), (OverlapMode.ASYMMETRIC_PIPELINE, 2),
                (OverlapMode.ASYMMETRIC_PIPELINE, 0))
    for mode, cpu_share in variants:
        for gpu_batch in grid["hybrid_gpu_batches"]:
            for cpu_batch in grid["hybrid_cpu_batches"]:
                for context in grid["hybrid_contexts"]:
                    gpu = bench.decodes(gpu_batch, context, Tier.GPU, prefix="g")
                    cpu = bench.decodes(cpu_batch, context, Tier.CPU, prefix="c")
                    batches = None
                    if cpu_share is not None:
                        first = cpu_batch // cpu_share if cpu_share else 0
                        batches = (tuple(s.request_id for s in gpu + cpu[:first]),
                                   tuple(s.request_id for s in cpu[first:]))
                    plan = bench.plan(gpu_decodes=gpu, cpu_decodes=cpu, mode=mode, pipeline_batches=batches)
                    seconds = bench.measure(plan)
                    samples.append((shape_from_plan(plan), seconds["iteration"]))
                    bar.update()
    return samples


CALIBRATION_REQUESTS = {"quick": 16, "full": 32}


def _calibration_runs(settings: ProfileSettings, model_path: str, config: Any,
                      preliminary: dict[str, Any]) -> tuple[list[tuple[Any, float]], list[tuple[int, float]]]:
    """Real engine runs of the profiled policies: (mixed iterations as (shape, runner seconds),
    per-step engine overhead as (sequences in the plan, seconds)).

    The grid repeats one uniform batch per point; the iterations the policies build differ from it
    in what a grid does not show: contexts that differ within a batch, NEO's and APEX's own batch
    splits, a new plan every step. So ``neo`` and then ``apex`` run a seeded decode-heavy calibration
    workload (prompts uniform 8-96, outputs 32-192 tokens, seed ``settings.seed + 1``; not a
    benchmark preset) through the benchmark loop (``drive_engine``), deciding with the ``preliminary``
    profile (the tables plus a grid-only fit), with a GPU tier of 32 blocks so that most iterations
    are mixed. Their hybrid iterations (no prefill in them; the first two of each run dropped as
    warm-up) join the grid's samples in the final fit, with the same total weight as the grid's. The
    engine's own per-step cost beyond the scheduler and the runner (output building, the driving
    loop) is the gap between consecutive steps minus scheduling, execution and the scheduler's update
    (``LLMEngine.step_log``). ``config`` is the ``ModelConfig`` of ``model_path``."""
    import tempfile

    from apexlib.bench.runner import drive_engine, prepare_workload, special_token_ids
    from apexlib.core.plan import OverlapMode
    from apexlib.engine.args import EngineArgs
    from apexlib.engine.engine import LLMEngine
    from apexlib.workloads import Uniform, make_workload

    count = settings.calibration_requests or CALIBRATION_REQUESTS["quick" if settings.quick else "full"]
    limit = min(config.max_position_embeddings, 512)
    workload = make_workload("profile-calibration", count, Uniform(8, min(96, limit // 4)),
                             Uniform(32, min(192, limit // 2)), seed=settings.seed + 1, max_model_len=limit)
    workload = prepare_workload(workload, config.vocab_size, special_token_ids(model_path, config.vocab_size),
                                settings.seed + 1)
    hybrid: list[tuple[Any, float]] = []
    overhead: list[tuple[int, float]] = []
    with tempfile.TemporaryDirectory() as scratch:
        profile_path = Path(scratch) / "preliminary.json"
        profile_path.write_text(json.dumps(preliminary))
        for policy in ("neo", "apex"):
            engine = LLMEngine(EngineArgs(
                model=model_path, device=settings.device, dtype=settings.dtype, block_size=settings.block_size,
                policy=policy, cost_model=str(profile_path), num_gpu_blocks=max(32, -(-limit // settings.block_size)),
                # a host tier for the whole workload, no larger (pinned memory: 4 GiB for a 7B shape, not 32)
                num_cpu_blocks=count * -(-limit // settings.block_size), max_model_len=limit, profile_subtasks=True,
                seed=settings.seed))
            try:
                engine.step_log = []
                drive_engine(engine, workload, "offline", progress=False)
                records = [r for r in engine.step_log if r.plan.sequences][2:]
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


def _fit_hybrid(tables: dict[str, Any], shape: ModelShape, samples: list[tuple[Any, float]],
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
                    model._hybrid[mode] = adjustment
                    bases = [predict_iteration(model, p).total for p, _ in points]
                    numerator = sum(w * n * (m - b) / m**2
                                    for (_, m), b, n, w in zip(points, bases, jobs, weights, strict=True))
                    denominator = sum(w * n * n / m**2 for (_, m), n, w in zip(points, jobs, weights, strict=True))
                    adjustment = dataclasses.replace(adjustment, per_job_seconds=max(0.0, numerator / denominator))
                    model._hybrid[mode] = adjustment  # the pipeline's job cost sits inside a max(): re-evaluate
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


def write_profile(profile: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile, indent=1, sort_keys=False) + "\n")
    return path


def default_profile_path(profile: dict[str, Any]) -> Path:
    info = profile["provenance"]
    device = "cpu-" + cpu_short_name(info["cpu_model"], info.get("simd", ())) if info["device"] == "cpu" else \
        re.sub(r"[^a-z0-9]+", "-", info["device_name"].lower()).strip("-")
    name = profile["model"]["name"].split("-seed")[0]
    prefix = "tiny-" if "-seed" in profile["model"]["name"] else ""
    return Path("data/profiles") / f"{device}-{prefix}{name}.json"


# ----------------------------------------------------------------------------------------------
# accuracy
# ----------------------------------------------------------------------------------------------
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
    :func:`default_workload`); all requests are added at once. Each step runs schedule -> predict ->
    execute -> update; the measured time is the runner's ``iteration`` seconds (the scheduler is not
    in it), the prediction is ``predict_iteration(cost_model, shape_from_plan(plan))`` and its own
    cost (shape + prediction) is timed. Returns ``{"by_mode": {mode: stats}, "all": stats, "rows": [...]}``
    with median / p90 relative error and the prediction overhead as a fraction of the iteration.
    """
    from apexlib.core.clock import clock
    from apexlib.core.request import SamplingParams
    from apexlib.engine.args import EngineArgs
    from apexlib.engine.engine import LLMEngine

    owned = isinstance(engine_or_args, EngineArgs)
    engine = LLMEngine(engine_or_args) if owned else engine_or_args
    try:
        if not engine.runner.profile:
            raise ValueError("accuracy_report needs an engine built with profile_subtasks=True")
        model = engine.config.model
        shape = ModelShape.from_config(model)
        cuda = engine.config.device.startswith("cuda")
        to_cpu, back = shape.cpu_token_transfer_bytes(engine.config.dtype)
        bytes_per_token = to_cpu + back if cuda else 0  # device=cpu: the runner copies nothing
        fraction = to_cpu / (to_cpu + back)
        bytes_per_block = engine.gpu_storage.bytes_per_block
        rng = random.Random(seed)
        for prompt_length, output_length in (workload or default_workload(seed=seed)):
            tokens = [rng.randrange(4, model.vocab_size) for _ in range(prompt_length)]
            engine.add_request(None, {"prompt_token_ids": tokens},
                               SamplingParams(max_tokens=output_length, temperature=0.0, ignore_eos=True))
        rows = []
        while engine.has_unfinished_requests():
            plan = engine.scheduler.schedule(clock())
            started = time.perf_counter()
            iteration_shape = shape_from_plan(plan, bytes_per_token, bytes_per_block, fraction)
            predicted = predict_iteration(cost_model, iteration_shape)
            predict_seconds = time.perf_counter() - started
            output = engine.runner.execute(plan)
            engine.scheduler.update_from_output(plan, output, clock())
            if not plan.sequences:
                continue
            measured = output.subtask_seconds
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
                "engine": {"policy": engine.config.scheduler.policy, "hybrid_mode": engine.config.scheduler.hybrid_mode,
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

    model_path = resolve_model(settings.model)
    config = ModelConfig.from_pretrained(model_path)
    report: dict[str, Any] = {"runs": {}}
    for mode in ("none", "async_overlap", "asymmetric_pipeline"):
        args = EngineArgs(model=model_path, device=settings.device, dtype=settings.dtype,
                          block_size=settings.block_size, policy="gpu_only" if mode == "none" else "hybrid",
                          hybrid_mode="async_overlap" if mode == "none" else mode, num_gpu_blocks=num_gpu_blocks,
                          num_cpu_blocks=4096,  # every run with the CPU worker: the profile's thread layout
                          max_model_len=min(config.max_position_embeddings, 1024), profile_subtasks=True,
                          seed=settings.seed)
        load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        result = accuracy_report(args, cost_model, workload, seed=settings.seed)
        report["runs"][mode] = {k: v for k, v in result.items() if k != "rows"}
        report["runs"][mode]["load_average_1min"] = {  # other processes on the cores distort the measurement
            "before": load_before, "after": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
        report["runs"][mode]["rows"] = result["rows"]
    all_rows = [r for run in report["runs"].values() for r in run["rows"]]
    modes = sorted({r["mode"] for r in all_rows})
    report["by_mode"] = {m: _relative_errors([r for r in all_rows if r["mode"] == m]) for m in modes}
    report["all"] = _relative_errors(all_rows)
    return report
