"""``LLMEngine``: ``add_request`` / ``step`` / ``abort_request``; ``step`` = schedule -> execute -> update.

Initialisation protocol: read the checkpoint's config -> choose device and dtype -> load the
weights -> measure the device memory left -> size the KV pools -> allocate them -> build the
runner and the scheduler. Everything a request needs is validated in ``add_request`` before it
is queued, so a bad request raises there and the requests already accepted keep being served.
"""

from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from apexlib.attention.backends import select_backend
from apexlib.config import EngineConfig, ModelConfig
from apexlib.engine.args import EngineArgs, activation_reserve_bytes
from apexlib.engine.clock import clock
from apexlib.engine.plan import IterationPlan
from apexlib.engine.scheduler import Scheduler
from apexlib.engine.stats import EngineStats
from apexlib.kvcache.storage import KVStorage
from apexlib.model.weights import TORCH_DTYPES, load_model
from apexlib.policies import PROFILED_POLICIES, policy_from_config
from apexlib.profiling.cost_model import (
    CostModel,
    ModelShape,
    RooflineCostModel,
    ZeroCostModel,
    load_cost_model,
)
from apexlib.request import CompletionOutput, Request, RequestMetrics, RequestOutput, SamplingParams
from apexlib.runner.model_runner import ModelRunner
from apexlib.runner.overlap import CpuAttentionWorker

logger = logging.getLogger(__name__)

PromptType = str | dict[str, Any] | list[int]


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


class LLMEngine:
    def __init__(self, args: EngineArgs) -> None:
        self.step_log: list[StepRecord] | None = None
        model_config = ModelConfig.from_pretrained(args.model)
        device = resolve_device(args.device)
        dtype = args.resolve_dtype(model_config, device)
        self.model = load_model(model_config, dtype, device)
        free_bytes = None
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
            free_bytes, _ = torch.cuda.mem_get_info(torch.device(device))
            free_bytes = max(0, free_bytes - activation_reserve_bytes(model_config, args.max_num_batched_tokens))
        self.config: EngineConfig = args.create_engine_config(model_config, device, dtype, free_bytes)
        self.tokenizer = load_tokenizer(model_config.path)
        cache = self.config.cache
        torch_dtype = TORCH_DTYPES[cache.kv_dtype]
        self.gpu_storage = KVStorage(model_config.num_layers, cache.num_gpu_blocks, cache.block_size,
                                     model_config.num_kv_heads, model_config.head_dim, torch_dtype, device)
        self.cpu_storage = None
        if cache.num_cpu_blocks:
            self.cpu_storage = KVStorage(model_config.num_layers, cache.num_cpu_blocks, cache.block_size,
                                         model_config.num_kv_heads, model_config.head_dim, torch_dtype, "cpu",
                                         pin_memory=torch.cuda.is_available())
        self.stats = EngineStats()
        self.cost_model = None
        transfer_bytes, transfer_fraction = 0, 0.75
        if self.config.scheduler.policy in PROFILED_POLICIES:
            self.cost_model = build_cost_model(args.cost_model, model_config, dtype, device)
            to_cpu, back = ModelShape.from_config(model_config).cpu_token_transfer_bytes(dtype)
            transfer_fraction = to_cpu / (to_cpu + back)
            if device != "cpu":  # with device=cpu the CPU rows are already in host memory: nothing moves
                transfer_bytes = to_cpu + back
        self.scheduler = Scheduler(self.config.scheduler, cache,
                                   policy_from_config(self.config.scheduler, self.cost_model, transfer_bytes,
                                                      transfer_fraction),
                                   self.stats)
        worker = None
        if self.cpu_storage is not None:
            worker = CpuAttentionWorker(self.config.cpu_attention_cpus, self.config.cpu_attention_threads)
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
        vocab_size = self.config.model.vocab_size
        text = None
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            if self.tokenizer is None:
                raise ValueError(f"prompt is a string but the checkpoint at {self.config.model.path} has no "
                                 f"tokenizer; pass {{'prompt_token_ids': [...]}}")
            text = prompt
            token_ids = list(self.tokenizer(prompt)["input_ids"])
        elif isinstance(prompt, dict):
            if "prompt_token_ids" not in prompt:
                raise ValueError(f"prompt dict needs the field 'prompt_token_ids', got fields {sorted(prompt)}")
            token_ids = list(prompt["prompt_token_ids"])
            text = prompt.get("prompt")
        elif isinstance(prompt, (list, tuple)):
            token_ids = list(prompt)
        else:
            raise ValueError(f"prompt must be a string or {{'prompt_token_ids': [...]}}, got {type(prompt).__name__}")
        if not token_ids:
            raise ValueError("prompt is empty (prompt_token_ids has no tokens)")
        for index, token in enumerate(token_ids):
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size:
                raise ValueError(f"prompt_token_ids[{index}]={token!r} is outside the vocabulary "
                                 f"[0, {vocab_size})")
        max_model_len = self.config.scheduler.max_model_len
        if len(token_ids) >= max_model_len:
            raise ValueError(f"prompt has {len(token_ids)} tokens; max_model_len is {max_model_len} (the prompt "
                             f"plus at least one generated token must fit)")
        return token_ids, text

    def add_request(self, request_id: str | None, prompt: PromptType, sampling_params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> str:
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

    def abort_request(self, request_id: str | list[str]) -> None:
        for one in [request_id] if isinstance(request_id, str) else request_id:
            request = self.scheduler.abort_request(one)
            if request is not None:
                request.finish_time = clock()

    def close(self) -> None:
        """Stop the CPU-attention worker thread (also happens at interpreter exit: it is a daemon)."""
        self.runner.close()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def get_num_unfinished_requests(self) -> int:
        return self.scheduler.num_unfinished_requests

    # -- the loop ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One iteration: schedule -> execute -> update. Returns outputs of requests that advanced
        (``final_only`` requests: only when they finish).

        Set ``engine.step_log`` to a list to receive one :class:`StepRecord` per step (the profiler's
        calibration runs measure the engine's own per-step overhead with it)."""
        log = self.step_log
        started = clock()
        plan = self.scheduler.schedule(started)
        scheduled = clock()
        output = self.runner.execute(plan)
        self.last_subtask_seconds = output.subtask_seconds
        executed = clock()
        updated = self.scheduler.update_from_output(plan, output, executed)
        if log is not None:
            log.append(StepRecord(plan, started, scheduled - started, executed - scheduled, clock() - executed,
                                  output.subtask_seconds))
        return [self._output(request) for request in updated
                if request.sampling_params.output_kind == "cumulative" or request.is_finished]

    def _output(self, request: Request) -> RequestOutput:
        finished = request.is_finished
        text = ""
        if finished and self.tokenizer is not None:
            text = self.tokenizer.decode(request.output_token_ids, skip_special_tokens=True)
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=tuple(request.prompt_token_ids),
            outputs=(CompletionOutput(index=0, text=text, token_ids=tuple(request.output_token_ids),
                                      finish_reason=request.status.finish_reason),),
            finished=finished,
            metrics=RequestMetrics(
                arrival_time=request.arrival_time,
                first_scheduled_time=request.first_scheduled_time,
                first_token_time=request.token_times[0] if request.token_times else None,
                finished_time=request.finish_time,
                token_times=tuple(request.token_times),
                num_preemptions=request.num_preemptions,
            ),
        )


def build_cost_model(spec: str | None, model_config: ModelConfig, dtype: str, device: str) -> CostModel:
    """A profile JSON path (measured by ``apex profile``, or a datasheet profile), ``roofline:<hardware>``,
    or ``zero``; None: a roofline of this machine (device=cpu), logged as a stand-in until ``apex profile``
    has been run."""
    from apexlib.profiling.hardware import get_hardware

    shape = ModelShape.from_config(model_config)
    if spec == "zero":
        return ZeroCostModel()
    if spec is not None and spec.startswith("roofline:"):
        return RooflineCostModel(get_hardware(spec.split(":", 1)[1]), shape, dtype)
    if spec is not None:
        return load_cost_model(spec, shape, dtype)
    if device != "cpu":
        raise ValueError("policies neo/apex on a GPU need cost_model=<profile from `apex profile`> or "
                         "'roofline:<hardware>'")
    logger.warning("no cost_model given: predicting from a roofline of this machine; run `apex profile` for "
                   "measured tables")
    return RooflineCostModel(get_hardware("this-machine"), shape, dtype)
