"""What a run measured and where it came from: per-request records, a result with its tidy rows, the
provenance columns every row carries, and writing them. Shared by the real engine's runner, the
simulator, the vLLM baseline and the HTTP client; torch-free.

A :class:`BenchmarkResult` holds one row per request plus one summary row (``row_type`` says which);
every row carries the provenance columns (:data:`PROVENANCE_COLUMNS`). ``write_results`` writes
``rows.csv`` (and ``rows.parquet`` when pyarrow is installed) and ``meta.json`` into
``<results dir>/<experiment>/``.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apexlib.core.config import EngineConfig
from apexlib.core.metrics import SLO, BenchmarkSummary, RequestTiming, summarize
from apexlib.workloads import Workload

logger = logging.getLogger(__name__)

#: ``data/results/`` of this checkout (the editable install the project uses).
RESULTS_DIR = Path(__file__).resolve().parents[2] / "data" / "results"
#: Columns every row (request or summary) carries.
PROVENANCE_COLUMNS = (
    "experiment", "run_id", "executor", "engine", "engine_version", "date_utc", "git_commit", "apexlib_version",
    "device", "gpu_names", "cpu_model", "cpu_count", "torch_version", "cuda_version",
    "model_path", "model_config_sha256", "dtype", "block_size", "num_gpu_blocks", "num_cpu_blocks",
    "max_num_seqs", "max_num_batched_tokens", "max_model_len", "policy",
    "workload", "workload_seed", "token_seed", "num_requests", "mode", "arrival", "rate",
    "warmup_requests", "engine_iterations", "engine_preemptions", "engine_mode_counts",
)


def config_hash(model_path: str | Path) -> str:
    """SHA-256 of the checkpoint's ``config.json`` bytes (first 16 hex digits)."""
    return hashlib.sha256((Path(model_path) / "config.json").read_bytes()).hexdigest()[:16]


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

    def with_slo(self, slo: SLO) -> BenchmarkResult:
        """This run with its summary recomputed under ``slo`` (an ``SLO``): the same metrics plus
        ``good_completed`` and ``request_goodput``, vLLM's goodput."""
        summary = summarize([record.timing() for record in self.records], slo=slo)
        return dataclasses.replace(self, summary=summary)

    def summary_row(self) -> dict[str, Any]:
        row: dict[str, Any] = {"row_type": "summary", **self.provenance, "request_id": None}
        row.update(self.summary.to_dict())
        row["wall_time_s"] = self.wall_time_s
        return row

    def labelled_summary(self, **labels: Any) -> dict[str, Any]:
        """The summary row after ``labels`` (a figure's own columns first; the row's win on a clash)."""
        return {**labels, **self.summary_row()}

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


def default_experiment(workload: Workload, policy: str, mode: str, engine: str = "apexlib") -> str:
    arrival, rate = _arrival_of(workload)
    load = "offline" if mode == "offline" else f"{arrival}-{rate:g}" if isinstance(rate, (int, float)) else mode
    return f"bench-{engine}-{workload.name}-{policy}-{load}"


ENVIRONMENT_COLUMNS = ("git_commit", "apexlib_version", "gpu_names", "cpu_model", "cpu_count", "torch_version",
                       "cuda_version")


def build_provenance(workload: Workload, mode: str, experiment: str | None, *, engine: str,
                     engine_version: str | None, resolved: Mapping[str, Any], stats: Mapping[str, Any],
                     environment: Mapping[str, Any], token_seed: int, warmup_requests: int,
                     executor: str = "engine", model_config_sha256: str | None = None) -> dict[str, Any]:
    """The provenance columns of a run.

    ``resolved``: the engine settings as the engine resolved them (device, model_path, dtype,
    block_size, num_gpu_blocks, num_cpu_blocks, max_num_seqs, max_num_batched_tokens, max_model_len,
    policy). ``stats``: iterations, preemptions, mode_counts of the timed run. ``environment``: every
    :data:`ENVIRONMENT_COLUMNS` entry (this process's facts from ``apexlib.envinfo``, or the simulated
    hardware's). ``model_config_sha256`` replaces the hash of the checkpoint's config.json (a model
    without a checkpoint).
    """
    arrival, rate = _arrival_of(workload)
    missing = [column for column in ENVIRONMENT_COLUMNS if column not in environment]
    if missing:
        raise ValueError(f"environment lacks {missing}")
    facts = {column: environment[column] for column in ENVIRONMENT_COLUMNS}
    provenance: dict[str, Any] = {
        "experiment": experiment or default_experiment(workload, str(resolved["policy"]), mode, engine),
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
        "token_seed": token_seed,
        "num_requests": len(workload),
        "mode": mode,
        "arrival": "offline" if mode == "offline" else arrival,
        "rate": None if mode == "offline" else rate,
        "warmup_requests": min(warmup_requests, len(workload)),
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
