"""The machine's limit for one engine run: the same linear-layer GEMMs timed alone, and the weights' stream.

An engine's iteration over ``n`` new tokens must at least run every decoder layer's four projections
(fused QKV, O, fused gate/up, down) on ``n`` rows and the LM head on the rows it samples, and it must
read every weight once. :func:`time_linears` times exactly that work alone: ``torch.nn.functional.linear``
(what the engine's ``nn.Linear`` layers call) over a fresh weight buffer per layer, so that the weights
stream from memory as the model's do, in the engine's dtype and threads, for each distinct
``(tokens, sampled rows)`` shape of the run. :func:`roofline_seconds` sums, over the run's iterations,
the larger of that GEMM time and the weights' bytes at the DRAM read bandwidth measured in the same run.

That sum is a lower bound on the run's time for any engine that uses these GEMMs: attention, norms,
RoPE, sampling, scheduling and Python add to it, and none of them is in it. ``roofline / engine`` is the
fraction of the machine's linear-layer limit the engine reaches.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from apexlib.core.config import ModelConfig
from apexlib.core.plan import IterationPlan


@dataclass(frozen=True)
class StepShape:
    """One iteration's linear work: rows through the decoder layers, rows through the LM head."""

    tokens: int
    sampled: int


def step_shape(plan: IterationPlan) -> StepShape:
    return StepShape(plan.num_tokens, sum(1 for s in plan.sequences if s.sample))


def layer_linear_shapes(config: ModelConfig) -> list[tuple[int, int]]:
    """(in_features, out_features) of one decoder layer's projections, as :class:`apexlib.model.llama`
    fuses them."""
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    return [(config.hidden_size, q + 2 * kv), (q, config.hidden_size),
            (config.hidden_size, 2 * config.intermediate_size), (config.intermediate_size, config.hidden_size)]


def weight_bytes(config: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of every linear weight an iteration reads (the layers' projections and the LM head)."""
    per_layer = sum(i * o for i, o in layer_linear_shapes(config))
    elements = per_layer * config.num_layers + config.vocab_size * config.hidden_size
    return elements * torch.tensor([], dtype=dtype).element_size()


class LinearProbe:
    """A model's linear layers with random weights (one buffer per layer), timed alone per step shape."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)

        def weight(rows: int, cols: int) -> torch.Tensor:
            return (torch.randn(rows, cols, generator=generator) / cols ** 0.5).to(dtype)

        self.config, self.dtype = config, dtype
        self.layers = [[weight(o, i) for i, o in layer_linear_shapes(config)] for _ in range(config.num_layers)]
        self.lm_head = weight(config.vocab_size, config.hidden_size)

    def run(self, shape: StepShape) -> None:
        """The linear work of one iteration of ``shape`` (outputs discarded)."""
        config = self.config
        hidden = torch.randn(shape.tokens, config.hidden_size).to(self.dtype)
        q = config.num_heads * config.head_dim
        attention = torch.randn(shape.tokens, q).to(self.dtype)
        inner = torch.randn(shape.tokens, config.intermediate_size).to(self.dtype)
        with torch.inference_mode():
            for qkv, out, gate_up, down in self.layers:
                torch.nn.functional.linear(hidden, qkv)
                torch.nn.functional.linear(attention, out)
                torch.nn.functional.linear(hidden, gate_up)
                torch.nn.functional.linear(inner, down)
            if shape.sampled:
                torch.nn.functional.linear(hidden[: shape.sampled], self.lm_head)

    def time(self, shape: StepShape, repeats: int = 3) -> float:
        """Median seconds of :meth:`run` over ``repeats`` timed runs after one untimed run."""
        self.run(shape)
        times = []
        for _ in range(max(1, repeats)):
            started = time.perf_counter()
            self.run(shape)
            times.append(time.perf_counter() - started)
        return statistics.median(times)


def time_linears(config: ModelConfig, dtype: torch.dtype, shapes: Iterable[StepShape],
                 repeats: int = 3) -> dict[StepShape, float]:
    """Seconds of each distinct shape's linear work alone (:class:`LinearProbe`)."""
    probe = LinearProbe(config, dtype)
    return {shape: probe.time(shape, repeats) for shape in sorted(set(shapes), key=lambda s: (s.tokens, s.sampled))}


def roofline_seconds(steps: Iterable[StepShape], gemm_seconds: Mapping[StepShape, float],
                     stream_seconds: float) -> float:
    """Sum over the run's iterations of max(its GEMMs alone, one stream of the weights)."""
    return sum(max(gemm_seconds[shape], stream_seconds) for shape in steps)
