"""Run a workload on the real engine and turn it into tidy rows with full provenance.

One *run* is (engine settings x policy) x workload x arrival mode. The loop is
:func:`apexlib.engine.drive.drive` on the wall clock (the simulator runs the same loop on a virtual
one). Prompts are token ids from :func:`apexlib.workloads.prepare_workload` (the checkpoint's special
ids excluded); the result is an :class:`apexlib.core.results.BenchmarkResult`.
``apexlib.bench.vllm_baseline`` feeds the same workload to vLLM and returns the same kind of result.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from apexlib.core.models import special_token_ids
from apexlib.core.results import BenchmarkResult, build_provenance, finish_result, resolved_settings
from apexlib.engine.drive import WallClock, benchmark_sampling_params, drive
from apexlib.engine.settings import BenchmarkSettings, resolve_max_model_len, resolve_mode
from apexlib.envinfo import provenance_facts
from apexlib.workloads import PRESETS, Workload, get_preset, prepare_workload

logger = logging.getLogger(__name__)

__all__ = ["build_engine", "load_workload", "run_benchmark"]


def load_workload(name_or_path: str, *, num_requests: int | None = None, rate: float | None = None,
                  arrival: str = "poisson", seed: int | None = None) -> Workload:
    """A preset of :data:`workloads.PRESETS` (with overrides) or a workload JSONL file.

    ``rate`` (requests/s) turns a preset's arrivals into ``arrival`` (``poisson`` or ``fixed``);
    ``rate=None`` keeps the preset's own arrival process. A file is used as written: ``num_requests``
    keeps its first requests; ``rate`` and ``seed`` do not apply to it.
    """
    if name_or_path in PRESETS:
        overrides: dict[str, Any] = {}
        if num_requests is not None:
            overrides["num_requests"] = num_requests
        if seed is not None:
            overrides["seed"] = seed
        if rate is not None:
            overrides.update(arrival=arrival, rate=rate)
        return get_preset(name_or_path, **overrides)
    path = Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"workload {name_or_path!r} is neither a preset ({sorted(PRESETS)}) nor a file")
    if rate is not None or seed is not None:
        raise ValueError(f"--rate/--seed apply to presets only; {path} is used as written")
    workload = Workload.from_jsonl(path)
    if num_requests is not None:
        if num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {num_requests}")
        workload = dataclasses.replace(workload, requests=workload.requests[:num_requests])
    return workload


def _stats_delta(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    modes_before = before.get("mode_counts", {})
    modes = {mode: count - modes_before.get(mode, 0) for mode, count in after.get("mode_counts", {}).items()}
    return {
        "iterations": after["iterations"] - before["iterations"],
        "preemptions": after["preemptions"] - before["preemptions"],
        "mode_counts": {mode: count for mode, count in modes.items() if count},
    }


def _warm_up(engine, workload: Workload, count: int) -> None:
    if count == 0:
        return
    started = time.perf_counter()
    for index, request in enumerate(workload.requests[:count]):
        engine.add_request(f"warmup-{index}", {"prompt_token_ids": list(request.prompt_token_ids)},
                           benchmark_sampling_params(min(request.output_len, 8)))
    while engine.has_unfinished_requests():
        engine.step()
    logger.info("warm-up: %d request(s) in %.2f s (not counted)", count, time.perf_counter() - started)


def build_engine(settings: BenchmarkSettings, workload: Workload):
    """An ``LLMEngine`` of ``settings.engine`` with the ``max_model_len`` the workload needs
    (:func:`apexlib.engine.settings.resolve_max_model_len`)."""
    from apexlib.core.config import ModelConfig
    from apexlib.engine.engine import LLMEngine
    from apexlib.model.catalog import resolve_checkpoint

    model_config = ModelConfig.from_pretrained(resolve_checkpoint(settings.engine.model))
    limit = resolve_max_model_len(settings.engine, workload, model_config.max_position_embeddings)
    return LLMEngine(dataclasses.replace(settings.engine, max_model_len=limit))


def run_benchmark(workload: Workload, settings: BenchmarkSettings | None = None, *, mode: str = "auto",
                  experiment: str | None = None, progress: bool = True, engine=None) -> BenchmarkResult:
    """Run ``workload`` on apexlib's ``LLMEngine`` and return its :class:`BenchmarkResult`.

    ``engine``: an already built ``LLMEngine`` to reuse (its own settings then apply; ``settings`` only
    supplies the bench options; the caller closes it); otherwise one is built from ``settings``
    (:func:`build_engine`) and closed before this returns, so that a loop over runs never holds two
    engines' weights and KV pools at once.
    """
    settings = settings or BenchmarkSettings.create()
    mode = resolve_mode(workload, mode)
    if engine is None:
        with build_engine(settings, workload) as owned:
            return run_benchmark(workload, settings, mode=mode, experiment=experiment, progress=progress,
                                 engine=owned)
    config = engine.config
    model_config = config.model
    reserved = special_token_ids(model_config.path, model_config.vocab_size)
    workload = prepare_workload(workload, model_config.vocab_size, reserved, settings.token_seed)
    if workload.max_total_len > config.scheduler.max_model_len:
        raise ValueError(f"workload {workload.name!r} has a request of {workload.max_total_len} tokens, above the "
                         f"engine's max_model_len {config.scheduler.max_model_len}")

    _warm_up(engine, workload, min(settings.warmup_requests, len(workload)))
    stats_before = engine.stats.snapshot()
    logger.info("running %s: %d requests, %s, policy %s", workload.name, len(workload), mode,
                config.scheduler.policy)
    records, wall_time = drive(engine, workload, mode, WallClock(), progress=progress)
    stats = _stats_delta(stats_before, engine.stats.snapshot())

    provenance = build_provenance(workload, mode, experiment, engine="apexlib", engine_version=None,
                                  resolved=resolved_settings(config), stats=stats, environment=provenance_facts(),
                                  token_seed=settings.token_seed, warmup_requests=settings.warmup_requests)
    return finish_result(provenance, records, wall_time, extra={"settings": settings.to_dict(), "stats": stats})
