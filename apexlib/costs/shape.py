"""The model's shape as the cost models see it, and the hybrid calibration's adjustment type."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apexlib.core.config import DTYPE_BYTES, kv_bytes_per_token

DIRECTIONS = ("d2h", "h2d")


# ----------------------------------------------------------------------------------------------
# model shape
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    """The shapes that set a LLaMA model's costs (torch-free; see ``ModelConfig`` for the full config)."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    @classmethod
    def from_config(cls, config: Any, name: str | None = None) -> ModelShape:
        """From a ``ModelConfig`` (or anything with its field names)."""
        return cls(name=name or Path(str(getattr(config, "path", "model"))).name,
                   hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                   num_layers=config.num_layers, num_heads=config.num_heads, num_kv_heads=config.num_kv_heads,
                   head_dim=config.head_dim, vocab_size=config.vocab_size)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelShape:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @property
    def pre_attention_parameters(self) -> int:
        """Per layer: the QKV projection."""
        return self.hidden_size * (self.num_heads + 2 * self.num_kv_heads) * self.head_dim

    @property
    def post_attention_parameters(self) -> int:
        """Per layer: the output projection and the gated MLP."""
        return self.num_heads * self.head_dim * self.hidden_size + 3 * self.hidden_size * self.intermediate_size

    @property
    def layer_parameters(self) -> int:
        return self.pre_attention_parameters + self.post_attention_parameters

    @property
    def pre_attention_fraction(self) -> float:
        """Share of a layer's linear work done before attention (by weight count)."""
        return self.pre_attention_parameters / self.layer_parameters

    def kv_bytes_per_token(self, dtype: str) -> int:
        """K and V of one token, all layers."""
        return kv_bytes_per_token(self.num_layers, self.num_kv_heads, self.head_dim, dtype)

    def cpu_token_transfer_bytes(self, dtype: str) -> tuple[int, int]:
        """(to the CPU: q, k, v; back: the attention output) of one CPU-decode token, all layers."""
        element = DTYPE_BYTES[dtype]
        to_cpu = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim * element * self.num_layers
        back = self.num_heads * self.head_dim * element * self.num_layers
        return to_cpu, back




@dataclass(frozen=True)
class HybridAdjustment:
    """Measured departures from ideal overlap in iterations with CPU decodes (see ``predict_iteration``).

    ``per_job_seconds``: device-thread time per CPU job (one per layer and sub-batch) to hand the rows
    to the worker and collect the result; ``device_slowdown`` (>= 1): factor on device work while the
    worker runs (on device=cpu both share the cores); ``serial_fraction`` in [0, 1]: the share of the
    shorter of (device attention, CPU job) that does not overlap the longer (async overlap only);
    ``cpu_slowdown`` (>= 1): factor on CPU attention while the device thread works beside it (measured
    on device=cpu: the worker's core shares the cache, memory and the interpreter lock with it).
    """

    per_job_seconds: float = 0.0
    device_slowdown: float = 1.0
    serial_fraction: float = 0.0
    cpu_slowdown: float = 1.0


IDEAL_OVERLAP = HybridAdjustment()

# The CPU-side launch cost NEO's published predictor charges per pipeline stage and layer
# (swiftllm/perfpredictor.py, TablePerfPredictor.__init__: ``self.lnch_T = 0.8``, in ms).
NEO_LAUNCH_SECONDS = 0.8e-3


