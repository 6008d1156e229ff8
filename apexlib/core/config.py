"""Frozen, validated configuration objects.

Every config is a frozen dataclass validated in ``__post_init__`` and never mutated after
construction; derived values are computed once by the factory (``EngineArgs.create_engine_config``).
This module imports no torch: the control plane reads it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
SUPPORTED_DTYPES = ("float32", "float16", "bfloat16")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
GIB = 1024**3
#: Seconds the engine waits for one CPU-attention job (one layer's attention: milliseconds) before it
#: declares the worker stuck (``EngineArgs.cpu_attention_timeout``).
DEFAULT_CPU_JOB_TIMEOUT = 300.0


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: str) -> int:
    """K and V bytes of one token over all layers (the one definition; ``ModelConfig`` and the cost
    models' ``ModelShape`` both ask it)."""
    return 2 * num_layers * num_kv_heads * head_dim * DTYPE_BYTES[dtype]


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass(frozen=True)
class ModelConfig:
    """The architecture of a LLaMA-family checkpoint, read from its ``config.json``."""

    path: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: tuple[tuple[str, Any], ...] | None
    tie_word_embeddings: bool
    checkpoint_dtype: str
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    attention_bias: bool = False
    mlp_bias: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            _require(getattr(self, name) >= 1, f"config.json field {name} must be >= 1, got {getattr(self, name)}")
        _require(self.num_heads % self.num_kv_heads == 0,
                 f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads "
                 f"({self.num_kv_heads})")
        _require(self.checkpoint_dtype in SUPPORTED_DTYPES,
                 f"config.json torch_dtype {self.checkpoint_dtype!r} is not one of {SUPPORTED_DTYPES}")
        rope_type = self.rope_type
        _require(rope_type in SUPPORTED_ROPE_TYPES,
                 f"config.json rope_scaling type {rope_type!r} is not supported (supported: {SUPPORTED_ROPE_TYPES})")

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return dict(self.rope_scaling) if self.rope_scaling is not None else None

    @property
    def rope_type(self) -> str:
        scaling = self.rope_scaling_dict
        if not scaling:
            return "default"
        return str(scaling.get("rope_type", scaling.get("type", "default")))

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 for MHA)."""
        return self.num_heads // self.num_kv_heads

    def kv_bytes_per_token(self, dtype: str) -> int:
        """K and V bytes of one token over all layers."""
        return kv_bytes_per_token(self.num_layers, self.num_kv_heads, self.head_dim, dtype)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        """Read ``<path>/config.json``; raise FileNotFoundError / ValueError with the field at fault."""
        directory = Path(path).expanduser()
        if not directory.exists():
            raise FileNotFoundError(f"model path {str(directory)!r} does not exist")
        config_file = directory / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"model path {str(directory)!r} has no config.json")
        try:
            raw = json.loads(config_file.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{config_file}: not valid JSON ({error})") from error
        if not isinstance(raw, dict):
            raise ValueError(f"{config_file}: expected a JSON object")
        # Multimodal / nested configs keep the language model under text_config.
        architectures = raw.get("architectures") or []
        if not any(arch in SUPPORTED_ARCHITECTURES for arch in architectures):
            raise ValueError(
                f"{config_file}: architectures {architectures} is not supported "
                f"(supported: {list(SUPPORTED_ARCHITECTURES)})"
            )

        def need(key: str) -> Any:
            if key not in raw:
                raise ValueError(f"{config_file}: missing field {key!r}")
            return raw[key]

        num_heads = int(need("num_attention_heads"))
        hidden_size = int(need("hidden_size"))
        head_dim = raw.get("head_dim") or hidden_size // num_heads
        eos = raw.get("eos_token_id")
        eos_ids = tuple(int(e) for e in eos) if isinstance(eos, list) else ((int(eos),) if eos is not None else ())
        rope_scaling = raw.get("rope_scaling")
        # transformers >= 5 may store rope parameters under rope_parameters.
        rope_parameters = raw.get("rope_parameters")
        rope_theta = raw.get("rope_theta")
        if isinstance(rope_parameters, dict):
            rope_theta = rope_parameters.get("rope_theta", rope_theta)
            if rope_scaling is None and rope_parameters.get("rope_type", "default") != "default":
                rope_scaling = {k: v for k, v in rope_parameters.items() if k != "rope_theta"}
        dtype = raw.get("torch_dtype") or raw.get("dtype") or "float32"
        return cls(
            path=str(directory.resolve()),
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden_size,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=num_heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rope_scaling=tuple(sorted(rope_scaling.items())) if rope_scaling else None,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            checkpoint_dtype=str(dtype),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
            attention_bias=bool(raw.get("attention_bias", False)),
            mlp_bias=bool(raw.get("mlp_bias", False)),
        )


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache: block size and the number of blocks in each tier."""

    block_size: int
    num_gpu_blocks: int
    num_cpu_blocks: int
    kv_dtype: str

    def __post_init__(self) -> None:
        _require(1 <= self.block_size <= 1024, f"block_size must be in [1, 1024], got {self.block_size}")
        _require(self.num_gpu_blocks >= 1, f"num_gpu_blocks must be >= 1, got {self.num_gpu_blocks}")
        _require(self.num_cpu_blocks >= 0, f"num_cpu_blocks must be >= 0, got {self.num_cpu_blocks}")
        _require(self.kv_dtype in SUPPORTED_DTYPES, f"kv dtype must be one of {SUPPORTED_DTYPES}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous-batching limits and the name of the placement/overlap policy (validated, with the
    policy's own options, by ``apexlib.policies.registry`` when ``EngineArgs`` is built)."""

    max_model_len: int
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True
    policy: str = "gpu_only"
    #: the policy keeps requests' KV in the CPU tier (its registry entry's ``uses_cpu_tier``)
    uses_cpu_tier: bool = False

    def __post_init__(self) -> None:
        _require(self.max_model_len >= 2, f"max_model_len must be >= 2, got {self.max_model_len}")
        _require(self.max_num_seqs >= 1, f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        _require(self.max_num_batched_tokens >= 1,
                 f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if not self.enable_chunked_prefill:
            _require(self.max_num_batched_tokens >= self.max_model_len,
                     f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_model_len "
                     f"({self.max_model_len}) when chunked prefill is disabled")
        _require(isinstance(self.policy, str) and bool(self.policy), f"policy must be a name, got {self.policy!r}")


@dataclass(frozen=True)
class EngineConfig:
    """Everything an engine needs; ``apexlib.engine.args.EngineArgs`` builds it from user arguments."""

    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    dtype: str
    device: str
    seed: int = 0
    cpu_attention_threads: int | None = None
    cpu_attention_cpus: tuple[int, ...] | None = None
    profile_subtasks: bool = False
    cpu_attention_timeout: float = DEFAULT_CPU_JOB_TIMEOUT
    #: The policy's validated options dataclass (``apexlib.policies.options``; typed ``Any`` here because
    #: this contract sits below the policies).
    policy_options: Any = None

    def __post_init__(self) -> None:
        _require(math.isfinite(self.cpu_attention_timeout) and self.cpu_attention_timeout > 0,
                 f"cpu_attention_timeout must be a finite number of seconds > 0, got {self.cpu_attention_timeout!r}")
        _require(self.dtype in SUPPORTED_DTYPES, f"dtype must be one of {SUPPORTED_DTYPES}, got {self.dtype!r}")
        _require(self.device in ("cpu", "cuda") or self.device.startswith("cuda:"),
                 f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.cpu_attention_threads is not None:
            _require(self.cpu_attention_threads >= 1,
                     f"cpu_attention_threads must be >= 1, got {self.cpu_attention_threads}")
        if self.scheduler.uses_cpu_tier:
            _require(self.cache.num_cpu_blocks * self.cache.block_size >= self.scheduler.max_model_len,
                     f"policy {self.scheduler.policy!r} needs a CPU KV tier that holds one maximum-length request: "
                     f"{self.cache.num_cpu_blocks} blocks x {self.cache.block_size} < max_model_len "
                     f"{self.scheduler.max_model_len}; raise num_cpu_blocks/cpu_kv_gib")
        max_len = self.scheduler.max_model_len
        _require(max_len <= self.model.max_position_embeddings,
                 f"max_model_len ({max_len}) exceeds the checkpoint's max_position_embeddings "
                 f"({self.model.max_position_embeddings})")
        gpu_tokens = self.cache.num_gpu_blocks * self.cache.block_size
        _require(gpu_tokens >= max_len,
                 f"the GPU KV budget holds {self.cache.num_gpu_blocks} blocks x {self.cache.block_size} = "
                 f"{gpu_tokens} tokens, less than one maximum-length request (max_model_len={max_len}); "
                 f"raise num_gpu_blocks/gpu_kv_gib or lower max_model_len")


def blocks_from_gib(gib: float, model: ModelConfig, kv_dtype: str, block_size: int, field_name: str) -> int:
    """Number of KV blocks that fit in ``gib`` GiB; ValueError naming ``field_name`` when below one."""
    _require(gib > 0, f"{field_name} must be > 0 GiB, got {gib}")
    block_bytes = model.kv_bytes_per_token(kv_dtype) * block_size
    blocks = int(gib * GIB // block_bytes)
    _require(blocks >= 1,
             f"{field_name}={gib} GiB cannot hold a single KV block ({block_bytes} bytes for block_size "
             f"{block_size} with this model)")
    return blocks
