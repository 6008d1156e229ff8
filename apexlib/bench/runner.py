"""Run a workload on the real engine and turn it into tidy rows with full provenance.

One *run* is (engine settings x policy) x workload x arrival mode:

* ``offline``: every request is added at the start (its arrival time is the run's start), then the
  engine steps until all are done (vLLM ``benchmark_throughput.py``).
* ``online``: request ``i`` is added once the engine clock passes ``start + arrival_time[i]``, with
  that scheduled time passed as ``arrival_time`` so TTFT counts the queueing from the arrival, not
  from when the loop noticed it. When the engine has nothing to do the loop sleeps until the next
  arrival (vLLM ``benchmark_serving.py``).

Prompts are token ids from :meth:`Workload.with_token_ids` (the checkpoint's special ids excluded) and
every request uses ``SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)``, so the
output lengths are exactly the workload's. Each completed request becomes a
:class:`~apexlib.core.metrics.RequestTiming` (times in seconds since the run's start) and the run a
:class:`~apexlib.core.metrics.BenchmarkSummary`.

A :class:`BenchmarkResult` holds one row per request plus one summary row (``row_type`` says
which); every row carries the provenance columns (:data:`PROVENANCE_COLUMNS`). ``write_results``
writes ``rows.csv`` (and ``rows.parquet`` when pyarrow is installed) and ``meta.json`` into
``<results dir>/<experiment>/``.

``apexlib.bench.vllm_runner`` feeds the same workload to vLLM and returns the same kind of result.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apexlib.core.config import EngineConfig
from apexlib.core.results import BenchmarkResult, RequestRecord, build_provenance, finish_result
from apexlib.envinfo import provenance_facts
from apexlib.workloads import PRESETS, Workload, get_preset

logger = logging.getLogger(__name__)

__all__ = [
    "MODES",
    "BenchmarkSettings",
    "default_model_path",
    "load_workload",
    "prepare_workload",
    "resolve_max_model_len",
    "resolve_mode",
    "resolved_settings",
    "drive_engine",
    "run_benchmark",
    "special_token_ids",
]

MODES = ("offline", "online")



@dataclass(frozen=True)
class BenchmarkSettings:
    """Engine settings of one run (``apexlib.engine.args.EngineArgs`` names) plus the bench's own.

    ``model=None`` means the embedded tiny ``demo`` checkpoint (:func:`default_model_path`).
    ``max_model_len=None`` takes the workload's stated limit (its preset's ``max_model_len``) capped by
    the checkpoint, lowered to the workload's longest request when the KV budget is smaller.
    ``warmup_requests`` requests (copies of the workload's first ones, at most 8 output tokens) run
    before the timed run and are not counted.
    """

    model: str | None = None
    policy: str = "gpu_only"
    device: str = "auto"
    dtype: str = "auto"
    block_size: int = 16
    num_gpu_blocks: int | None = None
    num_cpu_blocks: int | None = None
    gpu_kv_gib: float | None = None
    cpu_kv_gib: float | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    enable_chunked_prefill: bool = True
    seed: int = 0
    token_seed: int = 0
    warmup_requests: int = 2
    # neo/apex: a profile JSON, "roofline:<hardware>" or "zero" (EngineArgs.cost_model).
    cost_model: str | None = None

    def __post_init__(self) -> None:
        if self.warmup_requests < 0:
            raise ValueError(f"warmup_requests must be >= 0, got {self.warmup_requests}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def default_model_path() -> str:
    """The embedded tiny ``demo`` checkpoint (built once into the tiny cache)."""
    from apexlib.model.tiny import tiny_checkpoint

    path = str(tiny_checkpoint("demo"))
    logger.info("no model given: using the embedded tiny 'demo' checkpoint at %s", path)
    return path


def special_token_ids(model_path: str | Path, vocab_size: int) -> tuple[int, ...]:
    """Ids a benchmark prompt must not contain: the tokenizer's special tokens and bos/eos/pad.

    Read from ``tokenizer.json`` (``added_tokens`` marked special) and ``config.json``; without a
    tokenizer, LLaMA's ``(0, 1, 2)`` plus the config's ids.
    """
    directory = Path(model_path)
    ids: set[int] = set()
    tokenizer_file = directory / "tokenizer.json"
    if tokenizer_file.is_file():
        tokenizer = json.loads(tokenizer_file.read_text(encoding="utf-8"))
        ids.update(int(token["id"]) for token in tokenizer.get("added_tokens", []) if token.get("special"))
    else:
        ids.update((0, 1, 2))
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = config.get(key)
        for token in value if isinstance(value, list) else [value]:
            if isinstance(token, int):
                ids.add(token)
    return tuple(sorted(token for token in ids if 0 <= token < vocab_size))


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


def prepare_workload(workload: Workload, vocab_size: int, reserved_ids: Sequence[int], token_seed: int) -> Workload:
    """The workload with prompt token ids: kept when every request already has them, else drawn."""
    if workload.requests and all(request.prompt_token_ids is not None for request in workload.requests):
        for request in workload.requests:
            bad = [token for token in request.prompt_token_ids if token >= vocab_size]
            if bad:
                raise ValueError(f"request {request.request_id}: prompt token id {bad[0]} is outside the "
                                 f"vocabulary [0, {vocab_size})")
        return workload
    return workload.with_token_ids(vocab_size, seed=token_seed, reserved_ids=reserved_ids)


def resolve_mode(workload: Workload, mode: str = "auto") -> str:
    """``auto``: ``online`` when some request arrives after t = 0, else ``offline``."""
    if mode == "auto":
        return "online" if any(request.arrival_time > 0 for request in workload.requests) else "offline"
    if mode not in MODES:
        raise ValueError(f"mode must be 'auto' or one of {MODES}, got {mode!r}")
    return mode


def resolve_max_model_len(settings: BenchmarkSettings, workload: Workload, checkpoint_max: int) -> int:
    """See :class:`BenchmarkSettings`; raises when the workload's longest request cannot fit."""
    longest = workload.max_total_len
    if settings.max_model_len is not None:
        limit = settings.max_model_len
    else:
        stated = workload.metadata.get("max_model_len")
        limit = min(int(stated), checkpoint_max) if isinstance(stated, int) else checkpoint_max
        limit = max(limit, min(longest, checkpoint_max))
        if settings.num_gpu_blocks is not None and settings.num_gpu_blocks * settings.block_size < limit:
            limit = max(longest, 2)
            logger.info("KV budget of %d blocks x %d tokens is below the workload's max_model_len; using the "
                        "longest request's length %d as max_model_len", settings.num_gpu_blocks,
                        settings.block_size, limit)
    if longest > limit:
        raise ValueError(f"workload {workload.name!r} has a request of {longest} tokens (prompt + output), above "
                         f"max_model_len {limit}")
    return limit


# --------------------------------------------------------------------------------------------------
# The run


def _sampling_params(output_len: int):
    from apexlib.core.request import SamplingParams

    return SamplingParams(max_tokens=int(output_len), temperature=0.0, ignore_eos=True, output_kind="final_only")


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
                           _sampling_params(min(request.output_len, 8)))
    while engine.has_unfinished_requests():
        engine.step()
    logger.info("warm-up: %d request(s) in %.2f s (not counted)", count, time.perf_counter() - started)


def drive_engine(engine, workload: Workload, mode: str, progress: bool = True) -> tuple[list[RequestRecord], float]:
    """Feed ``workload`` to an ``LLMEngine`` (offline or online) and step it until every request is done.

    Returns the records (times relative to the start) and the wall time of the run.
    """
    from tqdm.auto import tqdm

    from apexlib.core.clock import clock

    by_id = {request.request_id: request for request in workload.requests}
    pending = deque(sorted(workload.requests, key=lambda request: request.arrival_time))
    finished: dict[str, Any] = {}
    start = clock()

    def add(request) -> None:
        arrival = start if mode == "offline" else start + request.arrival_time
        engine.add_request(request.request_id, {"prompt_token_ids": list(request.prompt_token_ids)},
                           _sampling_params(request.output_len), arrival_time=arrival)

    with tqdm(total=len(workload), desc=f"{workload.name} ({mode})", unit="req", disable=not progress,
              leave=False) as bar:
        if mode == "offline":
            while pending:
                add(pending.popleft())
        while pending or engine.has_unfinished_requests():
            now = clock()
            while pending and start + pending[0].arrival_time <= now:
                add(pending.popleft())
            if not engine.has_unfinished_requests():
                time.sleep(max(0.0, start + pending[0].arrival_time - clock()))
                continue
            for output in engine.step():
                if output.finished and output.request_id in by_id:
                    finished[output.request_id] = output
                    bar.update(1)
    wall_time = clock() - start

    records = []
    for request in workload.requests:
        output = finished[request.request_id]
        metrics = output.metrics
        token_ids = tuple(output.outputs[0].token_ids)
        if len(token_ids) != request.output_len:
            raise RuntimeError(f"request {request.request_id}: produced {len(token_ids)} tokens, the workload "
                               f"asked for exactly {request.output_len} (finish reason "
                               f"{output.outputs[0].finish_reason})")
        records.append(RequestRecord(
            request_id=request.request_id,
            prompt_len=request.prompt_len,
            arrival_time=metrics.arrival_time - start,
            first_scheduled_time=None if metrics.first_scheduled_time is None else metrics.first_scheduled_time - start,
            first_token_time=metrics.first_token_time - start,
            finish_time=metrics.finished_time - start,
            token_times=tuple(t - start for t in metrics.token_times),
            output_token_ids=token_ids,
            num_preemptions=metrics.num_preemptions,
        ))
    return records, wall_time


def run_benchmark(workload: Workload, settings: BenchmarkSettings | None = None, *, mode: str = "auto",
                  experiment: str | None = None, progress: bool = True, engine=None) -> BenchmarkResult:
    """Run ``workload`` on apexlib's ``LLMEngine`` and return its :class:`BenchmarkResult`.

    ``engine``: an already built ``LLMEngine`` to reuse (its own settings then apply; ``settings`` only
    supplies the bench options); otherwise one is built from ``settings``.
    """
    from apexlib.core.config import ModelConfig
    from apexlib.engine.engine import LLMEngine

    settings = settings or BenchmarkSettings()
    mode = resolve_mode(workload, mode)
    if engine is None:
        model_path = settings.model or default_model_path()
        model_config = ModelConfig.from_pretrained(model_path)
        max_model_len = resolve_max_model_len(settings, workload, model_config.max_position_embeddings)
        engine = LLMEngine.from_engine_args(
            model=model_path, dtype=settings.dtype, device=settings.device, block_size=settings.block_size,
            num_gpu_blocks=settings.num_gpu_blocks, num_cpu_blocks=settings.num_cpu_blocks,
            gpu_kv_gib=settings.gpu_kv_gib, cpu_kv_gib=settings.cpu_kv_gib, policy=settings.policy,
            max_model_len=max_model_len, max_num_seqs=settings.max_num_seqs,
            max_num_batched_tokens=settings.max_num_batched_tokens,
            enable_chunked_prefill=settings.enable_chunked_prefill, seed=settings.seed,
            cost_model=settings.cost_model)
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
    records, wall_time = drive_engine(engine, workload, mode, progress=progress)
    stats = _stats_delta(stats_before, engine.stats.snapshot())

    provenance = build_provenance(workload, mode, experiment, engine="apexlib", engine_version=None,
                                  resolved=resolved_settings(config), stats=stats, environment=provenance_facts(),
                                  token_seed=settings.token_seed, warmup_requests=settings.warmup_requests)
    return finish_result(provenance, records, wall_time, extra={"settings": settings.to_dict(), "stats": stats})


def resolved_settings(config: EngineConfig, device: str | None = None) -> dict[str, Any]:
    """The engine settings as an ``EngineConfig`` resolved them (the ``resolved`` of :func:`build_provenance`)."""
    return {
        "device": device or config.device,
        "model_path": config.model.path,
        "dtype": config.dtype,
        "block_size": config.cache.block_size,
        "num_gpu_blocks": config.cache.num_gpu_blocks,
        "num_cpu_blocks": config.cache.num_cpu_blocks,
        "max_num_seqs": config.scheduler.max_num_seqs,
        "max_num_batched_tokens": config.scheduler.max_num_batched_tokens,
        "max_model_len": config.scheduler.max_model_len,
        "policy": config.scheduler.policy,
    }


