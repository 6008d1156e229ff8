"""``TableCostModel``: the measured tables of a profile JSON (``apex profile``), interpolated piecewise-linearly."""

from __future__ import annotations

import bisect
import json
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apexlib.core.plan import OverlapMode
from apexlib.costs.base import CostModel, _check_direction
from apexlib.costs.shape import DIRECTIONS, IDEAL_OVERLAP, HybridAdjustment, ModelShape
from apexlib.costs.validate import validate_profile

# ----------------------------------------------------------------------------------------------
# interpolation
# ----------------------------------------------------------------------------------------------
logger = logging.getLogger(__name__)

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

    def set_hybrid_adjustment(self, mode: OverlapMode | str, adjustment: HybridAdjustment) -> None:
        """Replace one mode's calibration: the profiler's fit evaluates thousands of candidates on one model."""
        self._hybrid[OverlapMode(mode)] = adjustment

    def engine_step_overhead(self, num_sequences: int) -> float:
        if self._step_overhead is None:
            return 0.0
        return self._step_overhead[0] + self._step_overhead[1] * num_sequences


def _grid_points(table: Mapping[str, Any]) -> list[tuple[float, float, float]]:
    return [(b * c, b, table["seconds"][i][j]) for i, b in enumerate(table["batch"])
            for j, c in enumerate(table["context_length"])]


