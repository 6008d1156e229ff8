"""User-facing engine arguments (vLLM's names) and their resolution into an ``EngineConfig``.

Torch-free: the facts about the device (its kind, free memory) come in as arguments, measured by
the engine after the weights are loaded.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from apexlib.core.config import (
    DEFAULT_CPU_JOB_TIMEOUT,
    DTYPE_BYTES,
    GIB,
    SUPPORTED_DTYPES,
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
    blocks_from_gib,
)
from apexlib.costs.base import CostModel
from apexlib.policies.registry import POLICIES, PolicyOptions, policy_options, policy_spec

logger = logging.getLogger(__name__)

# Share of the device memory left free after loading the weights that a sized GPU KV pool takes.
DEVICE_MEMORY_UTILIZATION = 0.9
# Default KV budget when the "GPU" tier lives in host memory (device="cpu"), capped by what can be used.
DEFAULT_HOST_KV_GIB = 2.0


#: One line of help per ``EngineArgs`` field: the CLI builds every engine flag of ``generate``, ``serve``,
#: ``bench``, ``simulate`` and ``profile`` from the fields and this table (``apexlib.cli.add_engine_arguments``).
ENGINE_ARG_HELP: dict[str, str] = {
    "model": "checkpoint directory, named checkpoint (smollm2: built once into the model cache) or tiny preset (demo)",
    "dtype": "float32, float16, bfloat16 or auto (the checkpoint's; float16 runs as bfloat16 on a CPU)",
    "device": "cpu, cuda, cuda:N or auto",
    "block_size": "tokens per KV block",
    "num_gpu_blocks": "GPU-tier KV blocks (default: sized from free device memory)",
    "num_cpu_blocks": "CPU-tier KV blocks (default: 2 GiB worth for vllm_offload and the hybrid policies, 0 for gpu_only)",
    "gpu_kv_gib": "GPU-tier KV budget in GiB (instead of --num-gpu-blocks)",
    "cpu_kv_gib": "CPU-tier KV budget in GiB (instead of --num-cpu-blocks)",
    "policy": "; ".join(f"{name}: {spec.help}" for name, spec in POLICIES.items()),
    "max_model_len": "longest prompt + output in tokens (default: the checkpoint's, or the workload's)",
    "max_num_seqs": "requests running at once",
    "max_num_batched_tokens": "token budget of one iteration",
    "enable_chunked_prefill": "split long prompts across iterations",
    "seed": "engine seed (sampling)",
    "cpu_attention_threads": "threads of the CPU-attention worker",
    "cpu_attention_cpus": "comma-separated CPU ids of the CPU-attention worker",
    "policy_options": "a policy option NAME=VALUE (repeatable): hybrid: hybrid_mode, cpu_placement; "
                      "apex: iteration_time_bound, enable_pipeline, max_stall_iterations",
    "profile_subtasks": "time every subtask of every iteration",
    "attention_backend": "attention backend (auto picks by device)",
    "cost_model": "neo/neo_published/apex: a profile JSON, 'roofline:<hardware>' or 'zero'",
    "cpu_attention_timeout": "seconds one CPU-attention job may take before the iteration fails",
}


@dataclass(frozen=True)
class EngineArgs:
    model: str
    dtype: str = "auto"
    device: str = "auto"
    block_size: int = 16
    num_gpu_blocks: int | None = None
    num_cpu_blocks: int | None = None
    gpu_kv_gib: float | None = None
    cpu_kv_gib: float | None = None
    policy: str = "gpu_only"
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    enable_chunked_prefill: bool = True
    seed: int = 0
    cpu_attention_threads: int | None = None
    cpu_attention_cpus: tuple[int, ...] | None = None
    # The policy's own options (apexlib.policies.options): a mapping of option name -> value or the
    # options dataclass; validated here into that dataclass (e.g. {"hybrid_mode": "asymmetric_pipeline"}).
    policy_options: Mapping[str, Any] | PolicyOptions | None = None
    profile_subtasks: bool = False
    attention_backend: str = "auto"
    # neo/neo_published/apex: a CostModel, a profile JSON from `apex profile`, "roofline:<hardware>"
    # (apexlib.costs.hardware) or "zero" (apexlib.costs.load_cost_model).
    cost_model: str | CostModel | None = None
    # Seconds the engine waits for one CPU-attention job before it raises (a stuck worker would hang step()).
    cpu_attention_timeout: float = DEFAULT_CPU_JOB_TIMEOUT

    def __post_init__(self) -> None:
        """Types and ranges of every numeric argument, naming the argument (0 is never "use the default")."""
        def integer(name: str, minimum: int, optional: bool = False) -> None:
            value = getattr(self, name)
            if value is None and optional:
                return
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an integer{' or None' if optional else ''}, got "
                                f"{type(value).__name__} {value!r}")
            if value < minimum:
                raise ValueError(f"{name} must be >= {minimum}, got {value}")

        def number(name: str, optional: bool = False) -> None:
            value = getattr(self, name)
            if value is None and optional:
                return
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number{' or None' if optional else ''}, got "
                                f"{type(value).__name__} {value!r}")
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")

        if not isinstance(self.model, str) or not self.model:
            raise TypeError(f"model must be a checkpoint path (str), got {type(self.model).__name__} {self.model!r}")
        integer("block_size", 1)
        integer("num_gpu_blocks", 1, optional=True)
        integer("num_cpu_blocks", 0, optional=True)
        integer("max_model_len", 2, optional=True)
        integer("max_num_seqs", 1)
        integer("max_num_batched_tokens", 1, optional=True)
        integer("seed", 0)
        integer("cpu_attention_threads", 1, optional=True)
        number("gpu_kv_gib", optional=True)
        number("cpu_kv_gib", optional=True)
        number("cpu_attention_timeout")
        for name in ("enable_chunked_prefill", "profile_subtasks"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.cost_model is not None and not isinstance(self.cost_model, (str, CostModel)):
            raise TypeError(f"cost_model must be a CostModel, a profile path, 'roofline:<hardware>' or 'zero', got "
                            f"{type(self.cost_model).__name__} {self.cost_model!r}")
        # the policy's name and options, validated once (the frozen field holds the options dataclass)
        object.__setattr__(self, "policy_options", policy_options(self.policy, self.policy_options))

    @classmethod
    def from_kwargs(cls, **kwargs) -> EngineArgs:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown engine argument(s) {unknown}; known: {sorted(known)}")
        return cls(**kwargs)

    def resolve_dtype(self, model_config: ModelConfig, device: str,
                      compute_capability: tuple[int, int] | None = None) -> str:
        """The dtype the engine runs in. ``compute_capability``: the CUDA device's (major, minor), None on a CPU.

        Below compute capability 8.0 (a T4 is 7.5) bfloat16 has no tensor cores and no fused attention
        (torch emulates it), so ``auto`` maps a bfloat16 checkpoint to float16 there and an explicit
        bfloat16 is kept with a warning (vLLM refuses bfloat16 on such devices)."""
        old_gpu = compute_capability is not None and tuple(compute_capability) < (8, 0)
        where = f"compute capability {compute_capability[0]}.{compute_capability[1]}" if old_gpu else ""
        if self.dtype != "auto":
            if self.dtype not in SUPPORTED_DTYPES:
                raise ValueError(f"dtype must be 'auto' or one of {SUPPORTED_DTYPES}, got {self.dtype!r}")
            if self.dtype == "bfloat16" and old_gpu:
                logger.warning("dtype bfloat16 on a device of %s: bfloat16 is emulated there (no tensor cores, no "
                               "fused attention), much slower than float16; consider --dtype float16", where)
            return self.dtype
        dtype = model_config.checkpoint_dtype
        if dtype == "float16" and device == "cpu":
            logger.info("dtype auto: float16 checkpoint on CPU runs in bfloat16")
            return "bfloat16"
        if dtype == "bfloat16" and old_gpu:
            logger.warning("dtype auto: bfloat16 checkpoint on a device of %s (no bfloat16 tensor cores) runs in "
                           "float16", where)
            return "float16"
        return dtype

    def resolve_limits(self, model_config: ModelConfig) -> tuple[int, int]:
        """(max_model_len, max_num_batched_tokens) as the engine will use them."""
        max_model_len = model_config.max_position_embeddings if self.max_model_len is None else self.max_model_len
        if max_model_len > model_config.max_position_embeddings:
            raise ValueError(f"max_model_len ({max_model_len}) exceeds the checkpoint's max_position_embeddings "
                             f"({model_config.max_position_embeddings})")
        if self.max_num_batched_tokens is not None:
            return max_model_len, self.max_num_batched_tokens
        # without chunked prefill a whole prompt is one iteration's work
        return max_model_len, max(2048, max_model_len if not self.enable_chunked_prefill else 0)

    def create_engine_config(self, model_config: ModelConfig, device: str, dtype: str,
                             free_device_bytes: int | None) -> EngineConfig:
        """Resolve defaults; ``free_device_bytes`` is the memory left for the GPU KV pool (None: host)."""
        max_model_len, max_num_batched_tokens = self.resolve_limits(model_config)
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        useful_blocks = self.max_num_seqs * math.ceil(max_model_len / self.block_size)
        if self.num_gpu_blocks is not None:
            num_gpu_blocks = self.num_gpu_blocks
        elif self.gpu_kv_gib is not None:
            num_gpu_blocks = blocks_from_gib(self.gpu_kv_gib, model_config, dtype, self.block_size, "gpu_kv_gib")
        elif free_device_bytes is not None:
            budget_gib = free_device_bytes * DEVICE_MEMORY_UTILIZATION / GIB
            num_gpu_blocks = min(useful_blocks, blocks_from_gib(budget_gib, model_config, dtype, self.block_size,
                                                                "free device memory for the KV cache"))
        else:
            num_gpu_blocks = min(useful_blocks, blocks_from_gib(DEFAULT_HOST_KV_GIB, model_config, dtype,
                                                                self.block_size, "default host KV budget"))
        if self.num_cpu_blocks is not None:
            num_cpu_blocks = self.num_cpu_blocks
        elif self.cpu_kv_gib is not None:
            num_cpu_blocks = blocks_from_gib(self.cpu_kv_gib, model_config, dtype, self.block_size, "cpu_kv_gib")
        elif policy_spec(self.policy).uses_cpu_tier:
            num_cpu_blocks = min(useful_blocks, blocks_from_gib(DEFAULT_HOST_KV_GIB, model_config, dtype,
                                                                self.block_size, "default host KV budget"))
        else:
            num_cpu_blocks = 0
        cache = CacheConfig(block_size=self.block_size, num_gpu_blocks=num_gpu_blocks,
                            num_cpu_blocks=num_cpu_blocks, kv_dtype=dtype)
        scheduler = SchedulerConfig(
            max_model_len=max_model_len,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            enable_chunked_prefill=self.enable_chunked_prefill,
            policy=self.policy,
            uses_cpu_tier=policy_spec(self.policy).uses_cpu_tier,
        )
        return EngineConfig(model=model_config, cache=cache, scheduler=scheduler, dtype=dtype, device=device,
                            seed=self.seed, cpu_attention_threads=self.cpu_attention_threads,
                            cpu_attention_cpus=tuple(self.cpu_attention_cpus) if self.cpu_attention_cpus else None,
                            profile_subtasks=self.profile_subtasks,
                            cpu_attention_timeout=float(self.cpu_attention_timeout),
                            policy_options=self.policy_options)


def activation_reserve_bytes(model_config: ModelConfig, max_num_batched_tokens: int | None,
                             max_model_len: int | None = None, dtype: str = "float16") -> int:
    """Device memory kept free for the largest iteration (a coarse upper bound): activations and logits
    of ``max_num_batched_tokens`` tokens (None: 2048), the attention's working set
    (:func:`attention_workspace_bytes`) and 512 MiB for the allocator and the CUDA libraries."""
    tokens = 2048 if max_num_batched_tokens is None else max_num_batched_tokens
    per_token = 4 * (model_config.hidden_size * 4 + model_config.intermediate_size * 3 + model_config.vocab_size)
    context = model_config.max_position_embeddings if max_model_len is None else max_model_len
    return tokens * per_token + attention_workspace_bytes(model_config, tokens, context, dtype) + 512 * 1024**2


#: Padded (rows x longest context) tokens whose K/V the reference decode attention gathers at once:
#: a larger decode batch runs in row groups (``apexlib.attention.base``), so the gather has this bound.
DECODE_GATHER_TOKENS = 8192


def attention_workspace_bytes(model_config: ModelConfig, tokens: int, max_model_len: int,
                              dtype: str = "float16") -> int:
    """The reference attention's largest temporary tensors in one layer (fused SDPA kernels: no score matrix).

    A prefill chunk of ``tokens`` rows that starts late gathers its whole context (up to
    ``max_model_len`` tokens) of K and V, repeated to every query head where the fused kernel has no
    grouped-query support, next to its query and output; a decode group gathers K and V of
    ``max(DECODE_GATHER_TOKENS, max_model_len)`` padded tokens at the KV heads. The larger of the two."""
    head_bytes = model_config.head_dim * DTYPE_BYTES[dtype]
    chunk = min(tokens, max_model_len)
    prefill = (2 * max_model_len * model_config.num_heads + 2 * chunk * model_config.num_heads) * head_bytes
    decode = 2 * max(DECODE_GATHER_TOKENS, max_model_len) * model_config.num_kv_heads * head_bytes
    return max(prefill, decode)
