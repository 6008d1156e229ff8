"""The simulator: the engine's own ``Scheduler`` and policies on a virtual clock. Torch-free.

Size: one concern, the virtual executor: its engine, its per-iteration trace, its result type and the
provenance that names the simulated machine.

One scheduler, two executors: the real engine executes each ``IterationPlan``
with the model runner; the simulator executes it with a :class:`~apexlib.costs.CostModel`:

1. ``plan = scheduler.schedule(now)`` (the same code the engine runs, with a ``SchedulerConfig`` and
   ``CacheConfig`` resolved by the same ``EngineArgs.create_engine_config``, and the same policy, built
   by ``build_control_plane`` with the same cost model, so the policies decide on the same predictions);
2. ``predicted = predict_iteration(cost_model, shape_from_plan(plan, ...))``: the composition of the
   subtasks per execution mode that mirrors the runner (GPU stream, CPU worker, PCIe copies);
3. the virtual clock advances by ``predicted.total`` and a ``RunnerOutput`` with one fixed, non-EOS
   token per sampling sequence goes back through ``scheduler.update_from_output(plan, output, now)``.

Token times are the virtual times at which iterations end. Requests are fed as the real bench runner
feeds the engine (``apexlib.engine.drive.drive``, on a virtual clock): offline, all at t = 0; online, each once
the virtual clock passes its arrival (the clock jumps to the next arrival when nothing runs). Every
request runs with ``SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)``, so the
output lengths are exactly the workload's.

The result is a :class:`SimulationResult`: a ``BenchmarkResult`` (the same rows and metrics as the real
runner, plus the ``executor`` = ``"simulator"`` and ``cost_model*`` provenance columns) that also
carries the per-iteration trace (:class:`IterationTrace`: mode, predicted subtask times, batch
composition) for ablation plots.

:func:`apexlib.bench.fidelity.fidelity` runs a workload through both executors (real engine with
device=cpu, and the simulator with a measured profile) and reports the relative errors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apexlib.core.config import DTYPE_BYTES, GIB, EngineConfig, ModelConfig
from apexlib.core.models import SHAPE_PATH_PREFIX, resolve_model_config, special_token_ids
from apexlib.core.plan import RunnerOutput
from apexlib.core.request import Request, RequestOutput, SamplingParams, request_output
from apexlib.core.results import (
    PROVENANCE_COLUMNS,
    BenchmarkResult,
    build_provenance,
    finish_result,
    resolved_settings,
)
from apexlib.costs import (
    CostModel,
    ModelShape,
    TableCostModel,
    predict_iteration,
    shape_from_plan,
)
from apexlib.engine.args import activation_reserve_bytes
from apexlib.engine.assemble import build_control_plane
from apexlib.engine.drive import VirtualClock, drive
from apexlib.engine.prompts import prompt_token_ids
from apexlib.engine.scheduler import Scheduler
from apexlib.engine.settings import BenchmarkSettings, resolve_max_model_len, resolve_mode
from apexlib.version import __version__
from apexlib.workloads import Workload, prepare_workload

logger = logging.getLogger(__name__)

__all__ = [
    "DEVICE_KINDS",
    "EXECUTOR",
    "ITERATION_COLUMNS",
    "IterationTrace",
    "SimulationResult",
    "simulate",
]

EXECUTOR = "simulator"
DEVICE_KINDS = ("cuda", "cpu")
#: Consecutive empty iterations (no arrival pending) after which the run is declared stuck.
_MAX_EMPTY_ITERATIONS = 1000


def _has_checkpoint(model_config: ModelConfig) -> bool:
    return (Path(model_config.path) / "config.json").is_file()


def _model_config_sha256(model_config: ModelConfig) -> str:
    """The real runner's ``config_hash`` for a checkpoint; for a shape, the hash of the config's fields."""
    if _has_checkpoint(model_config):
        return hashlib.sha256((Path(model_config.path) / "config.json").read_bytes()).hexdigest()[:16]
    text = json.dumps(dataclasses.asdict(model_config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _reserved_token_ids(model_config: ModelConfig) -> tuple[int, ...]:
    if _has_checkpoint(model_config):
        return special_token_ids(model_config.path, model_config.vocab_size)
    ids = {0, 1, 2, 3} if model_config.path == SHAPE_PATH_PREFIX + "tiny-demo" else {0, 1, 2}
    if model_config.bos_token_id is not None:
        ids.add(model_config.bos_token_id)
    ids.update(model_config.eos_token_ids)
    return tuple(sorted(token for token in ids if 0 <= token < model_config.vocab_size))


def _weight_bytes(model_config: ModelConfig, dtype: str) -> int:
    shape = ModelShape.from_config(model_config)
    embeddings = model_config.vocab_size * model_config.hidden_size * (1 if model_config.tie_word_embeddings else 2)
    norms = (2 * model_config.num_layers + 1) * model_config.hidden_size
    return (shape.layer_parameters * shape.num_layers + embeddings + norms) * DTYPE_BYTES[dtype]


def _free_device_bytes(cost_model: CostModel, model_config: ModelConfig, dtype: str,
                       max_num_batched_tokens: int | None) -> int:
    """What the engine would measure after loading the weights on the cost model's GPU (roofline only)."""
    spec = getattr(cost_model, "spec", None)
    if spec is None:
        raise ValueError("device='cuda' with neither num_gpu_blocks nor gpu_kv_gib needs a roofline cost model "
                         "(its HardwareSpec gives the GPU memory); pass num_gpu_blocks or gpu_kv_gib")
    free = spec.memory_gib * GIB - _weight_bytes(model_config, dtype) \
        - activation_reserve_bytes(model_config, max_num_batched_tokens)
    if free <= 0:
        raise ValueError(f"{model_config.path} ({dtype}) does not fit in {spec.name}'s {spec.memory_gib} GiB "
                         f"with the activation reserve")
    return int(free)


# ----------------------------------------------------------------------------------------------
# the per-iteration trace
# ----------------------------------------------------------------------------------------------
#: Columns of :class:`IterationTrace`. Times in seconds on the virtual clock; ``predicted_*`` are the
#: executor's subtask predictions for the plan (``predict_iteration``; ``duration`` is their total);
#: ``policy_predicted_total`` is the policy's own prediction when it made one (neo/apex), NaN otherwise;
#: ``scheduler_seconds`` the control plane's time added around it (``simulate(scheduler_overhead=...)``).
ITERATION_COLUMNS = (
    "iteration", "start", "duration", "mode", "num_prefills", "num_prefill_tokens", "num_gpu_decodes",
    "num_cpu_decodes", "gpu_decode_kv_tokens", "cpu_decode_kv_tokens", "num_swap_out_blocks", "num_swap_in_blocks",
    "num_running", "num_waiting", "predicted_linear", "predicted_gpu_attention", "predicted_cpu_attention",
    "predicted_transfer", "predicted_overhead", "policy_predicted_total", "scheduler_seconds",
)


@dataclass
class IterationTrace:
    """Per-iteration records, stored by column (cheap for hundreds of thousands of iterations)."""

    columns: dict[str, list[Any]] = field(default_factory=lambda: {name: [] for name in ITERATION_COLUMNS})

    def __len__(self) -> int:
        return len(self.columns["iteration"])

    def records(self) -> list[dict[str, Any]]:
        """One dict per iteration."""
        names = list(self.columns)
        return [dict(zip(names, values, strict=True)) for values in zip(*self.columns.values(), strict=True)]

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame(self.columns)

    def write(self, directory: str | Path, name: str = "iterations") -> Path:
        """``<directory>/<name>.csv`` (and ``.parquet`` when pyarrow is importable)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        frame = self.to_dataframe()
        path = directory / f"{name}.csv"
        frame.to_csv(path, index=False)
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            pass
        else:
            frame.to_parquet(directory / f"{name}.parquet", index=False)
        return path


@dataclass(frozen=True)
class SimulationResult(BenchmarkResult):
    """A ``BenchmarkResult`` of the simulator plus its per-iteration trace (not written into ``rows``)."""

    iterations: IterationTrace = field(default_factory=IterationTrace, compare=False, repr=False)


# ----------------------------------------------------------------------------------------------
# the executor
# ----------------------------------------------------------------------------------------------
class _VirtualExecutor:
    """Executes plans on a virtual clock: the cost model's predicted total per iteration."""

    def __init__(self, cost_model: CostModel, transfer_bytes_per_cpu_token: int, kv_bytes_per_block: int,
                 transfer_to_cpu_fraction: float, token_id: int, trace: IterationTrace | None) -> None:
        self.cost_model = cost_model
        self.transfer_bytes_per_cpu_token = transfer_bytes_per_cpu_token
        self.kv_bytes_per_block = kv_bytes_per_block
        self.transfer_to_cpu_fraction = transfer_to_cpu_fraction
        self.token_id = token_id
        self.trace = trace

    def execute(self, plan, start: float, scheduler: Scheduler) -> tuple[RunnerOutput, float]:
        """Returns the output and the iteration's predicted duration."""
        shape = shape_from_plan(plan, self.transfer_bytes_per_cpu_token, self.kv_bytes_per_block,
                                self.transfer_to_cpu_fraction)
        predicted = predict_iteration(self.cost_model, shape)
        token = self.token_id
        output = RunnerOutput(sampled_token_ids={s.request_id: token for s in plan.sequences if s.sample})
        if self.trace is not None:
            c = self.trace.columns
            c["iteration"].append(len(c["iteration"]))
            c["start"].append(start)
            c["duration"].append(predicted.total)
            c["mode"].append(shape.mode.value)
            c["num_prefills"].append(len(shape.prefill_lengths))
            c["num_prefill_tokens"].append(sum(shape.prefill_lengths))
            c["num_gpu_decodes"].append(shape.num_gpu_decodes)
            c["num_cpu_decodes"].append(shape.num_cpu_decodes)
            c["gpu_decode_kv_tokens"].append(shape.gpu_decode_kv_tokens)
            c["cpu_decode_kv_tokens"].append(shape.cpu_decode_kv_tokens)
            c["num_swap_out_blocks"].append(len(plan.swap_out))
            c["num_swap_in_blocks"].append(len(plan.swap_in))
            c["num_running"].append(len(scheduler.running))
            c["num_waiting"].append(len(scheduler.waiting))
            c["predicted_linear"].append(predicted.linear)
            c["predicted_gpu_attention"].append(predicted.gpu_attention)
            c["predicted_cpu_attention"].append(predicted.cpu_attention)
            c["predicted_transfer"].append(predicted.transfer)
            c["predicted_overhead"].append(predicted.overhead)
            c["policy_predicted_total"].append(plan.predicted.total if plan.predicted is not None else math.nan)
        return output, predicted.total


def _sampled_token_id(model_config: ModelConfig, reserved: Iterable[int]) -> int:
    """The token every simulated sampling returns: the smallest id that is neither special nor EOS."""
    excluded = set(reserved) | set(model_config.eos_token_ids)
    return next(token for token in range(model_config.vocab_size) if token not in excluded)


def _describe_cost_model(cost_model: CostModel) -> dict[str, Any]:
    """Provenance columns naming where the simulated times come from."""
    return {
        "cost_model": type(cost_model).__name__,
        "cost_model_hardware": str(cost_model.hardware),
        "cost_model_source": str(cost_model.source),
    }


def _simulated_host(cost_model: CostModel) -> tuple[str | None, int | None]:
    """(CPU model, CPU count) of the simulated machine's host, where the cost model says."""
    spec = getattr(cost_model, "spec", None)
    if spec is not None:
        return spec.cpu_name, spec.cpu_cores
    if isinstance(cost_model, TableCostModel):
        provenance = cost_model.profile.get("provenance", {})
        return provenance.get("cpu_model"), provenance.get("cpu_affinity") or provenance.get("cpu_count")
    return None, None


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in text.lower()).strip("-").replace("--", "-")[:40]


def _provenance(workload: Workload, settings: BenchmarkSettings, mode: str, experiment: str | None, *,
                resolved: Mapping[str, Any], stats: Mapping[str, Any], cost_model: CostModel,
                model_config: ModelConfig) -> dict[str, Any]:
    """The real runner's provenance (``build_provenance``) for a simulated run: the simulated hardware in
    place of this process's, ``executor="simulator"``, and the cost model's columns."""
    from apexlib.core.host import git_commit

    host_cpu, host_count = _simulated_host(cost_model)
    device = resolved["device"]
    hardware = _slug(str(cost_model.hardware))
    environment = {"git_commit": git_commit(), "apexlib_version": __version__,
                   "gpu_names": str(cost_model.hardware) if device == "cuda" else None, "cpu_model": host_cpu,
                   "cpu_count": host_count, "torch_version": None, "cuda_version": None}
    rate = workload.metadata.get("rate")
    arrival = str(workload.metadata.get("arrival", "unknown"))
    load = "offline" if mode == "offline" else f"{arrival}-{rate:g}" if isinstance(rate, (int, float)) else mode
    provenance = build_provenance(
        workload, mode, experiment or f"sim-{workload.name}-{resolved['policy']}-{load}-{hardware}", engine="apexlib",
        engine_version=__version__, resolved=resolved, stats=stats, environment=environment,
        token_seed=settings.token_seed, warmup_requests=0, executor=EXECUTOR,
        model_config_sha256=_model_config_sha256(model_config))
    provenance.update(_describe_cost_model(cost_model))
    parts = ["sim", workload.name, resolved["policy"], mode]
    if provenance["rate"] is not None:
        parts.append(f"r{provenance['rate']:g}")
    if resolved.get("num_gpu_blocks") is not None:
        parts.append(f"b{resolved['num_gpu_blocks']}")
    parts.append(hardware)
    provenance["run_id"] = "-".join(str(part) for part in parts)
    return provenance


class VirtualEngine:
    """The simulator's engine: the scheduler's plans executed by the cost model on a virtual clock.

    It has the ``LLMEngine`` methods :func:`apexlib.engine.drive.drive` needs (``add_request``, ``step``,
    ``has_unfinished_requests``). A step: ``schedule(now)`` -> the plan's predicted duration -> the
    scheduler's ``update_from_output`` with one fixed, non-EOS token per sampling sequence, the clock
    advancing by the prediction (plus ``scheduler_overhead``: seconds, or ``"measured"``: this process's
    wall time in ``schedule`` and ``update_from_output``) and the engine's per-step overhead where the
    cost model has one. An empty iteration jumps to the next arrival; a run of
    ``_MAX_EMPTY_ITERATIONS`` with none pending is declared stuck.
    """

    def __init__(self, config: EngineConfig, scheduler: Scheduler, executor: _VirtualExecutor,
                 clock: VirtualClock, scheduler_overhead: float | str = 0.0) -> None:
        self.config = config
        self.scheduler = scheduler
        self.executor = executor
        self.clock = clock
        self._measured = scheduler_overhead == "measured"
        self._fixed = 0.0 if self._measured else float(scheduler_overhead)
        self._step_overhead = executor.cost_model.engine_step_overhead
        self._empty_in_a_row = 0

    def add_request(self, request_id: str | None, prompt: Any, sampling_params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> str:
        token_ids, text = prompt_token_ids(prompt, self.config.model, self.config.scheduler.max_model_len)
        request_id = str(request_id if request_id is not None else len(self.scheduler.requests))
        self.scheduler.add_request(Request(
            request_id=request_id, prompt_token_ids=token_ids,
            sampling_params=sampling_params if sampling_params is not None else SamplingParams(),
            arrival_time=self.clock.time if arrival_time is None else arrival_time, prompt=text,
            eos_token_ids=self.config.model.eos_token_ids))
        return request_id

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> list[RequestOutput]:
        scheduler, timer = self.scheduler, time.perf_counter
        now = iteration_started = self.clock.time
        if self._measured:
            started = timer()
            plan = scheduler.schedule(now)
            now += timer() - started
        else:
            plan = scheduler.schedule(now)
            now += self._fixed
        output, duration = self.executor.execute(plan, now, scheduler)
        now += duration
        if self._measured:
            started = timer()
            updated = scheduler.update_from_output(plan, output, now)
            now += timer() - started
        else:
            updated = scheduler.update_from_output(plan, output, now)
        if plan.sequences:
            now += self._step_overhead(len(plan.sequences))  # the engine's outputs and loop (measured profiles)
        if self.executor.trace is not None:
            self.executor.trace.columns["scheduler_seconds"].append(now - iteration_started - duration)
        if plan.is_empty:
            self._empty_in_a_row += 1
            if self.clock.next_arrival is not None:
                now = max(now, float(self.clock.next_arrival))
            elif self._empty_in_a_row >= _MAX_EMPTY_ITERATIONS:
                stuck = list(scheduler.requests)[:8]
                raise RuntimeError(f"simulation stuck: {self._empty_in_a_row} empty iterations with requests "
                                   f"{stuck} unfinished (KV budget too small for them?)")
        else:
            self._empty_in_a_row = 0
        self.clock.time = now
        outputs = [request_output(request) for request in updated
                   if request.sampling_params.output_kind == "cumulative" or request.is_finished]
        outputs.extend(request_output(request) for request in scheduler.take_finished_elsewhere())
        return outputs


def simulation_settings(settings: BenchmarkSettings | None, engine_args: dict[str, Any]) -> BenchmarkSettings:
    """``settings``, or the settings built from ``simulate``'s keyword shortcut (a simulated GPU by default)."""
    if settings is None:
        model = engine_args.get("model")
        if isinstance(model, ModelConfig):
            engine_args["model"] = model.path
        engine_args.setdefault("device", "cuda")
        engine_args.setdefault("dtype", "float16")
        return BenchmarkSettings.create(warmup_requests=0, **engine_args)
    if engine_args:
        raise TypeError(f"simulate takes settings or keywords, not both (got settings and {sorted(engine_args)})")
    return settings


def simulated_engine_config(workload: Workload, settings: BenchmarkSettings, cost_model: CostModel) -> EngineConfig:
    """The ``EngineConfig`` a simulated run of ``workload`` resolves (KV tiers, limits), as the engine would."""
    device = "cpu" if settings.engine.device == "cpu" else "cuda"
    model_config = resolve_model_config(settings.engine.model)
    limit = resolve_max_model_len(settings.engine, workload, model_config.max_position_embeddings)
    args = dataclasses.replace(settings.engine, model=model_config.path, device=device, max_model_len=limit)
    resolved_dtype = args.resolve_dtype(model_config, device)
    free_bytes = None
    if device == "cuda" and args.num_gpu_blocks is None and args.gpu_kv_gib is None:
        free_bytes = _free_device_bytes(cost_model, model_config, resolved_dtype, args.max_num_batched_tokens)
    return args.create_engine_config(model_config, device, resolved_dtype, free_bytes)


def simulate(workload: Workload, settings: BenchmarkSettings | None = None, *, cost_model: CostModel,
             mode: str = "auto", experiment: str | None = None, scheduler_overhead: float | str = 0.0,
             record_iterations: bool = True, **engine_args: Any) -> SimulationResult:
    """Run ``workload`` through the engine's scheduler and policy on a virtual clock timed by ``cost_model``.

    ``settings``: a run's :class:`~apexlib.engine.settings.BenchmarkSettings`, the same type the real
    engine's benchmark takes; or, as a shortcut, its fields as keywords (every ``EngineArgs`` field plus
    ``token_seed``), where ``device`` defaults to ``"cuda"`` and ``dtype`` to ``"float16"`` (a simulated
    GPU). ``model`` (``settings.engine.model``): a ``ModelConfig``, a shape name (:data:`MODEL_SHAPES`:
    ``llama-2-7b``, ``llama-3.1-8b``, ``tiny-demo``) or a checkpoint directory (its ``config.json``).
    KV budgets and limits have the engine's names and defaults; with ``device="cuda"`` and no GPU budget
    the GPU tier is sized like the engine does, from the roofline spec's memory minus the weights and the
    activation reserve. ``device="cpu"`` copies nothing between tiers (the runner's device=cpu): zero
    transfer bytes. ``policy_options``: the policy's options (``apexlib.policies.options``).

    ``scheduler_overhead``: the control plane's own time per iteration, which the cost model leaves out
    (a profile times the runner only): seconds added to every iteration (default 0: deterministic), or
    ``"measured"``: the wall time this process spends in ``schedule()`` and ``update_from_output()``,
    added where the engine spends it (before the forward and after it), i.e. the real scheduler's cost
    on this machine (not deterministic; use it to compare with the real engine on this machine).

    Returns a :class:`SimulationResult` (``.rows``: the real runner's columns plus ``executor`` and
    ``cost_model*``; ``.iterations``: the per-iteration trace unless ``record_iterations=False``).
    """
    started = time.perf_counter()
    settings = simulation_settings(settings, engine_args)
    if not (scheduler_overhead == "measured" or (isinstance(scheduler_overhead, (int, float))
                                                 and scheduler_overhead >= 0)):
        raise ValueError(f"scheduler_overhead must be seconds >= 0 or 'measured', got {scheduler_overhead!r}")
    device = "cpu" if settings.engine.device == "cpu" else "cuda"
    model_config = resolve_model_config(settings.engine.model)
    mode = resolve_mode(workload, mode)
    config = simulated_engine_config(workload, settings, cost_model)
    control = build_control_plane(config, cost_model)
    transfer = control.transfer
    kv_bytes_per_block = model_config.kv_bytes_per_token(config.cache.kv_dtype) * config.cache.block_size

    reserved = _reserved_token_ids(model_config)
    workload = prepare_workload(workload, model_config.vocab_size, reserved, settings.token_seed)
    if workload.max_total_len > config.scheduler.max_model_len:
        raise ValueError(f"workload {workload.name!r} has a request of {workload.max_total_len} tokens, above "
                         f"max_model_len {config.scheduler.max_model_len}")
    trace = IterationTrace() if record_iterations else None
    executor = _VirtualExecutor(cost_model, transfer.bytes_per_token, kv_bytes_per_block, transfer.to_cpu_fraction,
                                _sampled_token_id(model_config, reserved), trace)
    clock = VirtualClock()
    engine = VirtualEngine(config, control.scheduler, executor, clock, scheduler_overhead)
    records, end = drive(engine, workload, mode, clock)

    snapshot = control.stats.snapshot()
    run_stats = {"iterations": snapshot["iterations"], "preemptions": snapshot["preemptions"],
                 "mode_counts": {k: v for k, v in snapshot["mode_counts"].items() if v}}
    provenance = _provenance(workload, settings, mode, experiment, resolved=resolved_settings(config, device),
                             stats=run_stats, cost_model=cost_model, model_config=model_config)
    simulation_seconds = time.perf_counter() - started
    extra = {
        "settings": settings.to_dict(),
        "stats": {**run_stats, **{k: snapshot[k] for k in ("prefill_tokens", "gpu_decode_tokens", "cpu_decode_tokens")}},
        "executor": EXECUTOR,
        "virtual_time_s": end,
        "simulation_seconds": simulation_seconds,
        "scheduler_overhead": scheduler_overhead,
        "transfer_bytes_per_cpu_token": transfer.bytes_per_token,
        "kv_bytes_per_block": kv_bytes_per_block,
        "policy_options": dataclasses.asdict(config.policy_options),
        "cost_model": _describe_cost_model(cost_model),
        "cost_model_extrapolations": dict(getattr(cost_model, "extrapolations", {}) or {}),
    }
    result = finish_result(provenance, records, end, extra=extra)
    # finish_result keeps the real runner's columns; the simulator's own follow them.
    ordered = dict(result.provenance)
    ordered.update({key: value for key, value in provenance.items() if key not in PROVENANCE_COLUMNS})
    logger.info("simulated %d requests, %d iterations, %.3f virtual s in %.2f s", len(records),
                run_stats["iterations"], end, simulation_seconds)
    return SimulationResult(experiment=result.experiment, provenance=ordered, records=result.records,
                            summary=result.summary, wall_time_s=result.wall_time_s, extra=result.extra,
                            iterations=trace if trace is not None else IterationTrace())
