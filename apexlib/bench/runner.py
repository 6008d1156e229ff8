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
:class:`~apexlib.bench.metrics.RequestTiming` (times in seconds since the run's start) and the run a
:class:`~apexlib.bench.metrics.BenchmarkSummary`.

A :class:`BenchmarkResult` holds one row per request plus one summary row (``row_type`` says
which); every row carries the provenance columns (:data:`PROVENANCE_COLUMNS`). ``write_results``
writes ``rows.csv`` (and ``rows.parquet`` when pyarrow is installed) and ``meta.json`` into
``<results dir>/<experiment>/``.

``apexlib.bench.vllm_runner`` feeds the same workload to vLLM and returns the same kind of result.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import math
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apexlib.bench.metrics import BenchmarkSummary, RequestTiming, summarize
from apexlib.bench.workloads import PRESETS, Workload, get_preset
from apexlib.config import EngineConfig

logger = logging.getLogger(__name__)

__all__ = [
    "MODES",
    "PROVENANCE_COLUMNS",
    "RESULTS_DIR",
    "BenchmarkResult",
    "BenchmarkSettings",
    "config_hash",
    "default_model_path",
    "load_workload",
    "prepare_workload",
    "resolve_max_model_len",
    "resolve_mode",
    "build_provenance",
    "resolved_settings",
    "drive_engine",
    "finish_result",
    "run_benchmark",
    "special_token_ids",
    "write_results",
]

#: ``data/results/`` of this checkout (the editable install the project uses).
RESULTS_DIR = Path(__file__).resolve().parents[2] / "data" / "results"
MODES = ("offline", "online")

#: Columns every row (request or summary) carries.
PROVENANCE_COLUMNS = (
    "experiment", "run_id", "executor", "engine", "engine_version", "date_utc", "git_commit", "apexlib_version",
    "device", "gpu_names", "cpu_model", "cpu_count", "torch_version", "cuda_version",
    "model_path", "model_config_sha256", "dtype", "block_size", "num_gpu_blocks", "num_cpu_blocks",
    "max_num_seqs", "max_num_batched_tokens", "max_model_len", "policy",
    "workload", "workload_seed", "token_seed", "num_requests", "mode", "arrival", "rate",
    "warmup_requests", "engine_iterations", "engine_preemptions", "engine_mode_counts",
)


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


def config_hash(model_path: str | Path) -> str:
    """SHA-256 of the checkpoint's ``config.json`` bytes (first 16 hex digits)."""
    return hashlib.sha256((Path(model_path) / "config.json").read_bytes()).hexdigest()[:16]


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


def _arrival_of(workload: Workload) -> tuple[str, float | None]:
    metadata = workload.metadata
    return str(metadata.get("arrival", "unknown")), metadata.get("rate")


def _utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _tokens_digest(token_ids: Sequence[int]) -> str:
    return hashlib.sha1(",".join(map(str, token_ids)).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RequestRecord:
    """What a run measured for one request (seconds since the run's start)."""

    request_id: str
    prompt_len: int
    arrival_time: float
    first_scheduled_time: float | None
    first_token_time: float
    finish_time: float
    token_times: tuple[float, ...]
    output_token_ids: tuple[int, ...]
    num_preemptions: int | None = None

    def timing(self) -> RequestTiming:
        return RequestTiming(request_id=self.request_id, prompt_len=self.prompt_len,
                             output_len=len(self.output_token_ids), arrival_time=self.arrival_time,
                             first_token_time=self.first_token_time, finish_time=self.finish_time,
                             token_times=self.token_times)


@dataclass(frozen=True)
class BenchmarkResult:
    """One run: provenance, per-request records, the summary; ``rows`` is the tidy table."""

    experiment: str
    provenance: Mapping[str, Any]
    records: tuple[RequestRecord, ...]
    summary: BenchmarkSummary
    wall_time_s: float
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def run_id(self) -> str:
        return str(self.provenance["run_id"])

    @property
    def timings(self) -> tuple[RequestTiming, ...]:
        return tuple(record.timing() for record in self.records)

    @property
    def output_token_ids(self) -> dict[str, tuple[int, ...]]:
        return {record.request_id: record.output_token_ids for record in self.records}

    def request_rows(self) -> list[dict[str, Any]]:
        rows = []
        for record in self.records:
            timing = record.timing()
            row: dict[str, Any] = {"row_type": "request", **self.provenance, **timing.to_dict()}
            row["first_scheduled_time"] = (math.nan if record.first_scheduled_time is None
                                           else record.first_scheduled_time)
            row["queue_time_s"] = (math.nan if record.first_scheduled_time is None
                                   else record.first_scheduled_time - record.arrival_time)
            itls = timing.itls
            row["itl_mean_s"] = sum(itls) / len(itls) if itls else math.nan
            row["num_preemptions"] = record.num_preemptions
            row["output_tokens_sha1"] = _tokens_digest(record.output_token_ids)
            rows.append(row)
        return rows

    def summary_row(self) -> dict[str, Any]:
        row: dict[str, Any] = {"row_type": "summary", **self.provenance, "request_id": None}
        row.update(self.summary.to_dict())
        row["wall_time_s"] = self.wall_time_s
        return row

    @property
    def rows(self) -> list[dict[str, Any]]:
        """One row per request, then the summary row."""
        return [*self.request_rows(), self.summary_row()]

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame(self.rows)

    def write(self, results_dir: str | Path | None = None) -> Path:
        """``write_results([self], ...)`` into ``<results_dir>/<experiment>/``."""
        return write_results([self], results_dir, self.experiment)


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return str(value)


def write_results(results: Sequence[BenchmarkResult], results_dir: str | Path | None = None,
                  experiment: str | None = None) -> Path:
    """Write the rows of ``results`` to ``<results_dir or data/results>/<experiment>/``.

    Files: ``rows.csv``, ``rows.parquet`` (when pyarrow is importable) and ``meta.json`` (the
    experiment, the runs' provenance, settings and summaries). Existing files are replaced.
    """
    if not results:
        raise ValueError("write_results needs at least one BenchmarkResult")
    import pandas as pd

    experiment = experiment or results[0].experiment
    directory = Path(results_dir if results_dir is not None else RESULTS_DIR) / experiment
    directory.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame([row for result in results for row in result.rows])
    frame.to_csv(directory / "rows.csv", index=False)
    files = ["rows.csv"]
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        logger.info("pyarrow not installed: writing CSV only")
    else:
        frame.to_parquet(directory / "rows.parquet", index=False)
        files.append("rows.parquet")
    meta = {
        "experiment": experiment,
        "written_utc": _utc_now(),
        "files": files,
        "num_rows": len(frame),
        "runs": [{"provenance": dict(result.provenance), "extra": dict(result.extra),
                  "summary": result.summary.to_dict(), "wall_time_s": result.wall_time_s} for result in results],
    }
    (directory / "meta.json").write_text(json.dumps(meta, indent=2, default=_json_default) + "\n", encoding="utf-8")
    logger.info("wrote %d rows of %d run(s) to %s", len(frame), len(results), directory)
    return directory


# --------------------------------------------------------------------------------------------------
# The run


def _sampling_params(output_len: int):
    from apexlib.request import SamplingParams

    return SamplingParams(max_tokens=int(output_len), temperature=0.0, ignore_eos=True, output_kind="final_only")


def _environment_provenance() -> dict[str, Any]:
    from apexlib.envinfo import environment

    info = environment()
    return {
        "git_commit": info["git_commit"],
        "apexlib_version": info["apexlib_version"],
        "gpu_names": ";".join(gpu["name"] for gpu in info["gpus"]) or None,
        "cpu_model": info["cpu_model"],
        "cpu_count": info["cpu_affinity"],
        "torch_version": info["torch"],
        "cuda_version": info["cuda"],
    }


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

    from apexlib.engine.clock import clock

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


def default_experiment(workload: Workload, settings: BenchmarkSettings, mode: str, engine: str = "apexlib") -> str:
    arrival, rate = _arrival_of(workload)
    load = "offline" if mode == "offline" else f"{arrival}-{rate:g}" if isinstance(rate, (int, float)) else mode
    return f"bench-{engine}-{workload.name}-{settings.policy}-{load}"


def run_benchmark(workload: Workload, settings: BenchmarkSettings | None = None, *, mode: str = "auto",
                  experiment: str | None = None, progress: bool = True, engine=None) -> BenchmarkResult:
    """Run ``workload`` on apexlib's ``LLMEngine`` and return its :class:`BenchmarkResult`.

    ``engine``: an already built ``LLMEngine`` to reuse (its own settings then apply; ``settings`` only
    supplies the bench options); otherwise one is built from ``settings``.
    """
    from apexlib.config import ModelConfig
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

    provenance = build_provenance(workload, settings, mode, experiment, engine="apexlib", engine_version=None,
                                  resolved=resolved_settings(config), stats=stats)
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


ENVIRONMENT_COLUMNS = ("git_commit", "apexlib_version", "gpu_names", "cpu_model", "cpu_count", "torch_version",
                       "cuda_version")


def build_provenance(workload: Workload, settings: BenchmarkSettings, mode: str, experiment: str | None, *,
                     engine: str, engine_version: str | None, resolved: Mapping[str, Any],
                     stats: Mapping[str, Any], environment: Mapping[str, Any] | None = None,
                     executor: str = "engine", model_config_sha256: str | None = None) -> dict[str, Any]:
    """The provenance columns of a run.

    ``resolved``: the engine settings as the engine resolved them (device, model_path, dtype,
    block_size, num_gpu_blocks, num_cpu_blocks, max_num_seqs, max_num_batched_tokens, max_model_len,
    policy). ``stats``: iterations, preemptions, mode_counts of the timed run. ``environment``
    overrides entries of this process's environment facts (a subprocess engine's torch version); when it
    gives every :data:`ENVIRONMENT_COLUMNS` entry (the simulator's simulated hardware), this process's
    facts are not read at all (no torch import). ``model_config_sha256`` replaces the hash of the
    checkpoint's config.json (a model without a checkpoint).
    """
    arrival, rate = _arrival_of(workload)
    environment = dict(environment or {})
    facts = {} if set(ENVIRONMENT_COLUMNS) <= set(environment) else _environment_provenance()
    facts.update(environment)
    provenance: dict[str, Any] = {
        "experiment": experiment or default_experiment(workload, settings, mode, engine),
        "run_id": "",
        "executor": executor,
        "engine": engine,
        "engine_version": engine_version or facts["apexlib_version"],
        "date_utc": _utc_now(),
        **facts,
        **resolved,
        "model_config_sha256": model_config_sha256 or config_hash(resolved["model_path"]),
        "workload": workload.name,
        "workload_seed": workload.seed,
        "token_seed": settings.token_seed,
        "num_requests": len(workload),
        "mode": mode,
        "arrival": "offline" if mode == "offline" else arrival,
        "rate": None if mode == "offline" else rate,
        "warmup_requests": min(settings.warmup_requests, len(workload)),
        "engine_iterations": stats.get("iterations"),
        "engine_preemptions": stats.get("preemptions"),
        "engine_mode_counts": json.dumps(stats.get("mode_counts"), sort_keys=True),
    }
    provenance["run_id"] = _run_id(provenance)
    return provenance


def _run_id(provenance: Mapping[str, Any]) -> str:
    parts = [provenance["engine"], provenance["workload"], provenance["policy"], provenance["mode"]]
    if provenance.get("rate") is not None:
        parts.append(f"r{provenance['rate']:g}")
    if provenance.get("num_gpu_blocks") is not None:
        parts.append(f"b{provenance['num_gpu_blocks']}")
    return "-".join(str(part) for part in parts)


def finish_result(provenance: Mapping[str, Any], records: Sequence[RequestRecord], wall_time: float,
                  extra: Mapping[str, Any] | None = None) -> BenchmarkResult:
    """Check the provenance columns, summarize the records and build the result."""
    missing = [column for column in PROVENANCE_COLUMNS if column not in provenance]
    if missing:
        raise ValueError(f"provenance lacks column(s) {missing}")
    records = tuple(records)
    summary = summarize([record.timing() for record in records])
    ordered = {column: provenance[column] for column in PROVENANCE_COLUMNS}
    logger.info("%s: %d requests, %.1f output tok/s, TTFT median %.1f ms, TPOT median %.2f ms",
                ordered["run_id"], summary.completed, summary.output_throughput, summary.ttft.median * 1e3,
                summary.tpot.median * 1e3)
    return BenchmarkResult(experiment=str(ordered["experiment"]), provenance=ordered, records=records,
                           summary=summary, wall_time_s=wall_time, extra=dict(extra or {}))
