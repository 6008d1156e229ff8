"""``LLMEngine``: ``add_request`` / ``step`` / ``abort_request``; ``step`` = schedule -> execute -> update.

Initialisation protocol: read the checkpoint's config -> choose device and dtype -> load the
weights -> measure the device memory left -> size the KV pools -> allocate them -> build the
runner and the scheduler. Everything a request needs is validated in ``add_request`` before it
is queued, so a bad request raises there and the requests already accepted keep being served.

Failures after a request is accepted (see ``apexlib.engine.scheduler`` for the details):

- an error that belongs to one request (sampling it, applying its result, detokenizing it) finishes
  that request with finish_reason ``"error"`` (``RequestOutput.error`` says why) and frees its blocks;
- an error of the whole iteration (scheduling, the block copies of tier moves, the forward, a CPU
  job, a CPU-worker timeout) raises :class:`IterationError` from ``step()`` after the iteration was
  discarded: no request advanced, and the requests whose KV blocks were being moved between tiers
  (which may hold nothing) are failed. ``step()`` may be called again: the others run on unchanged.

Threads: one thread owns the engine and calls ``step()`` (a serving loop talks to it through
queues). ``add_request``, ``abort_request`` and ``step`` hold one engine lock, so a call from
another thread waits for the current step to end instead of corrupting the queues.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from apexlib.attention.backends import select_backend
from apexlib.core.clock import clock
from apexlib.core.config import GIB, EngineConfig, ModelConfig
from apexlib.core.plan import IterationPlan
from apexlib.core.request import Request, RequestOutput, SamplingParams, request_output
from apexlib.costs import (
    ModelShape,
)
from apexlib.engine.args import EngineArgs, activation_reserve_bytes
from apexlib.engine.assemble import build_control_plane
from apexlib.engine.prompts import PromptType, prompt_token_ids
from apexlib.model.catalog import resolve_checkpoint
from apexlib.model.weights import TORCH_DTYPES, load_model
from apexlib.policies.registry import policy_spec
from apexlib.runner.kv_storage import KVStorage
from apexlib.runner.machine import machine_cost_model
from apexlib.runner.model_runner import ModelRunner
from apexlib.runner.overlap import CpuAttentionWorker

logger = logging.getLogger(__name__)



class IterationError(RuntimeError):
    """One engine iteration failed as a whole and was discarded (no request advanced); ``stage`` is
    where it failed, ``failed_request_ids`` the requests it had to fail. ``step()`` may be called again."""

    def __init__(self, iteration: int | None, stage: str, error: BaseException, failed_request_ids: list[str]):
        self.stage = stage
        self.failed_request_ids = failed_request_ids
        where = f"iteration {iteration}" if iteration is not None else "the next iteration"
        failed = (f"; {len(failed_request_ids)} request(s) whose KV blocks were being moved between tiers "
                  f"failed: {failed_request_ids}" if failed_request_ids else "")
        super().__init__(f"{where} failed in {stage}: {type(error).__name__}: {error}. It was discarded "
                         f"(no request advanced){failed}; step() may be called again")


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but torch sees no CUDA device (torch {torch.__version__})")
    return device


def load_tokenizer(path: str):
    """The checkpoint's tokenizer when it ships one (tokenizer.json / tokenizer.model), else None."""
    directory = Path(path)
    if not any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))


@dataclass(frozen=True)
class StepRecord:
    """One ``LLMEngine.step``: its plan, when it started (``clock()``), how long scheduling, the runner
    and the scheduler's update took, and the runner's subtask seconds (if profiled). What the step and
    its caller spend besides (outputs, the caller's loop) is the gap to the next record's start."""

    plan: IterationPlan
    started: float
    schedule_seconds: float
    execute_seconds: float
    update_seconds: float
    subtask_seconds: dict[str, float] | None


@dataclass(frozen=True)
class DeviceMemory:
    """What the KV auto-sizing of a CUDA engine saw (bytes): the device's total, the free memory after the
    weights were loaded and torch's cached blocks were returned, the activation reserve taken from it."""

    total: int
    free_after_load: int
    activation_reserve: int

    @property
    def kv_budget(self) -> int:
        return max(0, self.free_after_load - self.activation_reserve)


def measure_device_memory(device: str, activation_reserve: int) -> DeviceMemory:
    """Free memory of a CUDA ``device`` as the KV pool may use it: blocks torch caches for tensors already
    freed (an earlier engine's pools, the load's temporaries) are returned first, or they would count as used."""
    gc.collect()  # a closed engine caught in a reference cycle still holds its tensors
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    free_bytes, total_bytes = torch.cuda.mem_get_info(torch.device(device))
    return DeviceMemory(total=int(total_bytes), free_after_load=int(free_bytes), activation_reserve=activation_reserve)


def compute_capability(device: str) -> tuple[int, int] | None:
    """(major, minor) of a CUDA ``device``; None for the CPU."""
    if not device.startswith("cuda"):
        return None
    return tuple(torch.cuda.get_device_capability(torch.device(device)))


class LLMEngine:
    def __init__(self, args: EngineArgs) -> None:
        self._step_log: list[StepRecord] | None = None
        self._closed = False
        model_config = ModelConfig.from_pretrained(resolve_checkpoint(args.model))
        device = resolve_device(args.device)
        if torch.device(device).type == "cuda" and torch.device(device).index is not None:
            # cuda:N becomes this thread's current device (what an index-less stream or event call uses);
            # plain "cuda" already is the current one, and set_device refuses a device without an index
            torch.cuda.set_device(torch.device(device))
        dtype = args.resolve_dtype(model_config, device, compute_capability(device))
        self.model = load_model(model_config, dtype, device)
        self.device_memory: DeviceMemory | None = None
        free_bytes = None
        if device.startswith("cuda"):
            max_model_len, max_num_batched_tokens = args.resolve_limits(model_config)
            reserve = activation_reserve_bytes(model_config, max_num_batched_tokens, max_model_len, dtype)
            self.device_memory = measure_device_memory(device, reserve)
            free_bytes = self.device_memory.kv_budget
            logger.info("device memory: %.2f GiB total, %.2f GiB free after the weights, %.2f GiB activation "
                        "reserve", self.device_memory.total / GIB, self.device_memory.free_after_load / GIB,
                        reserve / GIB)
        self.config: EngineConfig = args.create_engine_config(model_config, device, dtype, free_bytes)
        self.tokenizer = load_tokenizer(model_config.path)
        cache = self.config.cache
        torch_dtype = TORCH_DTYPES[cache.kv_dtype]
        self.gpu_storage = KVStorage(model_config.num_layers, cache.num_gpu_blocks, cache.block_size,
                                     model_config.num_kv_heads, model_config.head_dim, torch_dtype, device)
        self.cpu_storage = None
        if cache.num_cpu_blocks:
            # ordinary host memory (huge pages), never pinned: swaps stage through a bounded pinned buffer
            self.cpu_storage = KVStorage(model_config.num_layers, cache.num_cpu_blocks, cache.block_size,
                                         model_config.num_kv_heads, model_config.head_dim, torch_dtype, "cpu")
        cost_model = None
        if policy_spec(self.config.scheduler.policy).needs_cost_model:
            cost_model = machine_cost_model(args.cost_model, ModelShape.from_config(model_config), dtype, device)
        control = build_control_plane(self.config, cost_model)
        self.scheduler, self.stats, self.cost_model = control.scheduler, control.stats, control.cost_model
        worker = None
        if self.cpu_storage is not None:
            worker = CpuAttentionWorker(self.config.cpu_attention_cpus, self.config.cpu_attention_threads,
                                        timeout=self.config.cpu_attention_timeout)
            if device == "cpu":
                # The "GPU" side is torch on the CPU: keep it off the worker's cores, or the two OpenMP
                # teams oversubscribe the machine and every barrier waits for a descheduled thread.
                main_cpus = len(os.sched_getaffinity(0) - set(worker.cpu_ids)) if hasattr(os, "sched_getaffinity") else 1
                torch.set_num_threads(max(1, main_cpus))
                logger.info("device=cpu with a CPU-attention worker on CPUs %s: torch uses %d thread(s)",
                            worker.cpu_ids, torch.get_num_threads())
        self.runner = ModelRunner(self.model, self.gpu_storage, self.cpu_storage,
                                  select_backend(device, args.attention_backend),
                                  torch.device(device), self.config.seed, worker=worker,
                                  profile=self.config.profile_subtasks)
        self.last_subtask_seconds: dict[str, float] = {}
        self._request_counter = itertools.count()
        self._lock = threading.RLock()  # add_request / abort_request / step: one at a time (module docstring)
        logger.info("engine ready: %s on %s (%s), %d GPU-tier blocks, %d CPU-tier blocks, policy %s",
                    model_config.path, device, dtype, cache.num_gpu_blocks, cache.num_cpu_blocks,
                    self.config.scheduler.policy)

    @classmethod
    def from_engine_args(cls, **kwargs: Any) -> LLMEngine:
        return cls(EngineArgs.from_kwargs(**kwargs))

    # -- requests ------------------------------------------------------------------------------
    def next_request_id(self) -> str:
        return str(next(self._request_counter))

    def prompt_token_ids(self, prompt: PromptType) -> tuple[list[int], str | None]:
        """Validate a prompt and return its token ids (and its text when given as a string)."""
        return prompt_token_ids(prompt, self.config.model, self.config.scheduler.max_model_len, self.tokenizer)

    def add_request(self, request_id: str | None, prompt: PromptType, sampling_params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> str:
        """Validate and queue one request; returns its id (``str(request_id)``, or a new one for None)."""
        with self._lock:
            self._check_open()
            return self._add_request(request_id, prompt, sampling_params, arrival_time)

    def _add_request(self, request_id: str | None, prompt: PromptType, sampling_params: SamplingParams | None,
                     arrival_time: float | None) -> str:
        sampling_params = sampling_params if sampling_params is not None else SamplingParams()
        if not isinstance(sampling_params, SamplingParams):
            raise ValueError(f"sampling_params must be SamplingParams, got {type(sampling_params).__name__}")
        token_ids, text = self.prompt_token_ids(prompt)
        request_id = self.next_request_id() if request_id is None else str(request_id)
        request = Request(
            request_id=request_id,
            prompt_token_ids=token_ids,
            sampling_params=sampling_params,
            arrival_time=clock() if arrival_time is None else arrival_time,
            prompt=text,
            eos_token_ids=self.config.model.eos_token_ids,
        )
        self.scheduler.add_request(request)
        return request_id

    def abort_request(self, request_id: str | list[str], report: bool = True) -> None:
        """Abort one request or several (ids as ``add_request`` returned them; an int is taken as its
        string, as ``add_request`` does). Unknown or finished ids are ignored. Each aborted request
        comes back once from the next ``step()``, finished with finish_reason ``"abort"`` (unless
        ``report=False``: the caller needs no output)."""
        ids = [request_id] if isinstance(request_id, (str, int)) else request_id
        try:
            ids = list(ids)
        except TypeError:
            raise TypeError(f"abort_request takes a request id (str) or a list of them, got "
                            f"{type(request_id).__name__} {request_id!r}") from None
        for index, one in enumerate(ids):
            if isinstance(one, bool) or not isinstance(one, (str, int)):
                raise TypeError(f"abort_request: request id {index} must be a str (as add_request returned it), "
                                f"got {type(one).__name__} {one!r}")
        with self._lock:
            now = clock()
            for one in ids:
                request = self.scheduler.abort_request(str(one), report=report)
                if request is not None:
                    request.finish_time = now

    @contextlib.contextmanager
    def recording_steps(self) -> Iterator[list[StepRecord]]:
        """A list that receives one :class:`StepRecord` per ``step()`` while the block runs."""
        records: list[StepRecord] = []
        with self._lock:
            previous, self._step_log = self._step_log, records
        try:
            yield records
        finally:
            with self._lock:
                self._step_log = previous

    def close(self) -> None:
        """Stop the CPU-attention worker thread and release the weights and the KV tiers (on CUDA the
        cached device memory is returned too), so that the next engine of this process sizes its pools
        from memory this one no longer holds. Idempotent; the engine serves no request afterwards
        (``config``, ``stats`` and ``device_memory`` stay readable). The worker is also stopped at
        interpreter exit (a daemon thread)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self.runner.close()
            self.model = self.gpu_storage = self.cpu_storage = None
        gc.collect()
        if self.config.device.startswith("cuda"):
            torch.cuda.empty_cache()
        logger.info("engine closed: weights and KV tiers released")

    def __enter__(self) -> LLMEngine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this LLMEngine was closed (close() released its weights and KV cache)")

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def get_num_unfinished_requests(self) -> int:
        return self.scheduler.num_unfinished_requests

    # -- the loop ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One iteration: schedule -> execute -> update. Returns outputs of requests that advanced
        (``final_only`` requests: only when they finish).

        Inside ``with engine.recording_steps() as records:`` each step appends one :class:`StepRecord`
        (the profiler's calibration and accuracy runs read the plans and the measured times from them).

        Requests aborted or failed since the previous step come back once, finished. An error of the
        whole iteration raises :class:`IterationError` after discarding the iteration (module docstring).
        """
        with self._lock:
            self._check_open()
            return self._step()

    def _step(self) -> list[RequestOutput]:
        log = self._step_log
        scheduler = self.scheduler
        started = clock()
        plan = None
        stage = "schedule"
        try:
            plan = scheduler.schedule(started)
            scheduled = clock()
            stage = "swaps"
            swap_seconds = self.runner.apply_swaps(plan) if plan.swap_in or plan.swap_out else {}
            scheduler.commit_swaps()
            stage = "execute"
            output = self.runner.execute(plan, apply_swaps=False)
        except Exception as error:
            failed = scheduler.fail_uncommitted_swaps(f"{type(error).__name__}: {error}", clock())
            logger.error("iteration %s failed in %s: %s: %s", plan.iteration if plan else None, stage,
                         type(error).__name__, error)
            raise IterationError(plan.iteration if plan else None, stage, error,
                                 [r.request_id for r in failed]) from error
        except BaseException:  # KeyboardInterrupt and the like: discard the iteration the same way, re-raise
            scheduler.fail_uncommitted_swaps("interrupted", clock())
            raise
        if swap_seconds:
            output.subtask_seconds.update(swap_seconds)
        self.last_subtask_seconds = output.subtask_seconds
        executed = clock()
        updated = scheduler.update_from_output(plan, output, executed)
        if log is not None:
            log.append(StepRecord(plan, started, scheduled - started, executed - scheduled, clock() - executed,
                                  output.subtask_seconds))
        outputs = [self._output(request) for request in updated
                   if request.sampling_params.output_kind == "cumulative" or request.is_finished]
        outputs.extend(self._output(request) for request in scheduler.take_finished_elsewhere())
        return outputs

    def _output(self, request: Request) -> RequestOutput:
        text = ""
        error = request.error
        if request.is_finished and self.tokenizer is not None:
            try:
                text = self.tokenizer.decode(request.output_token_ids, skip_special_tokens=True)
            except Exception as decode_error:  # this request's problem: its tokens still come back
                error = f"detokenizing failed: {type(decode_error).__name__}: {decode_error}"
                logger.warning("request %s: %s", request.request_id, error)
        return request_output(request, text, error)
