"""Measure every subtask of an iteration on this hardware, through the real engine and runner.

Size: one concern, the measured grid and the tables fitted from it (the calibration and the accuracy
report are :mod:`apexlib.profiling.calibrate` and :mod:`apexlib.profiling.accuracy`).

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
                              "points_from_engine_runs", "method"},   # see apexlib.profiling.calibrate
       "engine_step_overhead": {"seconds", "per_sequence_seconds", "steps", "median_seconds", "method"}},
     "accuracy": (optional) the --check report (:mod:`apexlib.profiling.accuracy`)}

The hybrid calibration (:mod:`apexlib.profiling.calibrate`) is fitted twice: on the grid's mixed iterations, then (with that preliminary
profile driving the ``neo`` and ``apex`` policies through a calibration workload on a real engine) on
the grid's and the engine runs' iterations together.
"""

from __future__ import annotations

import datetime
import json
import logging
import random
import re
import statistics
import sys
import time
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apexlib.core.host import cpu_short_name, load_average_1min
from apexlib.costs import (
    PROFILE_SCHEMA,
    ModelShape,
    shape_from_plan,
)
from apexlib.costs.table import DecodeFit, Grid
from apexlib.model.catalog import cache_name_label, model_label, model_title, resolve_checkpoint
from apexlib.profiling.calibrate import calibration_runs, fit_hybrid

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

    arguments = dict(model=resolve_checkpoint(settings.model), device=settings.device, dtype=settings.dtype,
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
        "load_average_1min_at_end": load_average_1min(),
    }


def profile_model(settings: ProfileSettings) -> dict[str, Any]:
    """Measure every table of the profile on this machine; returns the profile dict (see module doc)."""
    from apexlib.core.config import ModelConfig
    from apexlib.core.plan import OverlapMode, Tier
    from apexlib.runner.kv_storage import copy_blocks

    grid = dict(QUICK_GRID if settings.quick else FULL_GRID)
    grid.update(settings.grid or {})
    model_path = resolve_checkpoint(settings.model)
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
        tables["hybrid_calibration"] = fit_hybrid(tables, shape, hybrid_samples)
        preliminary = {"schema": PROFILE_SCHEMA, "model_shape": shape.to_dict(), "tables": tables}
        calibration_samples, step_overhead = [], []
        if settings.calibration_requests != 0:
            calibration_samples, step_overhead = calibration_runs(settings, model_path, config, preliminary)
            tables["hybrid_calibration"] = fit_hybrid(tables, shape, hybrid_samples, calibration_samples)
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
            "model": {"path": model_path, "name": model_label(model_path), "title": model_title(model_path),
                      "dtype": engine.config.dtype,
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
        "method": "runner.kv_storage.copy_blocks between the engine's KV tiers" + (
            " (device <-> host tier, staged through a bounded pinned buffer)" if cuda else " (device=cpu: a host memcpy; the runner makes no q/k/v "
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


def write_profile(profile: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile, indent=1, sort_keys=False) + "\n")
    return path


def default_profile_path(profile: dict[str, Any]) -> Path:
    info = profile["provenance"]
    device = "cpu-" + cpu_short_name(info["cpu_model"], info.get("simd", ())) if info["device"] == "cpu" else \
        re.sub(r"[^a-z0-9]+", "-", info["device_name"].lower()).strip("-")
    name = profile["model"]["name"]  # a label, or (profiles written before labels) a cache directory's name
    label = (cache_name_label(name) or (name,))[0]
    return Path("data/profiles") / f"{device}-{label}.json"


# ----------------------------------------------------------------------------------------------
# accuracy
# ----------------------------------------------------------------------------------------------
